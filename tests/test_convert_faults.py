"""shards.convert under faults and user mistakes (issue 11 items 2, 11, 12, 13): exit codes a script can
read, an out inside the input refused, one converter per folder, symlinked folders converted, and a
converter killed mid-shard leaves nothing half-written visible; the rerun completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.outputs import EXIT_SKIPPED, EXIT_USAGE, FolderLock, OutputError
from shards.convert import ConvertConfig, convert
from shards.loader import LoaderConfig, make_loader
from shards.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
SCANNER = ("Center005", "Siemens_30T_Vida")


def cli(*sets: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards.convert", *[x for s in sets for x in ("--set", s)],
                           "--set", "progress=false"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_exit_status_3_when_a_file_failed_and_2_for_an_out_inside_the_input(tree, tmp_path: Path) -> None:
    tree.train_file("Cine", *SCANNER, "P001", "cine_sax", tree.kspace(nz=2))
    bad = tree.train_file("Cine", *SCANNER, "P002", "cine_sax", tree.kspace(nz=2))
    bad.write_bytes(bad.read_bytes()[:600])                         # truncated
    out = tmp_path / "shards"
    r = cli(f"input={tree.root}", f"out={out}")
    assert r.returncode == EXIT_SKIPPED, r.stderr[-2000:]
    assert "P002" in r.stdout and Manifest.read(out).samples() == 2   # the good file is converted
    inside = cli(f"input={tree.root}", f"out={tree.root}/shards/")
    assert inside.returncode == EXIT_USAGE and "is inside the input" in inside.stderr
    assert "Traceback" not in inside.stderr and not (tree.root / "shards").exists()


def test_a_second_converter_into_the_same_folder_is_refused(tree, tmp_path: Path) -> None:
    tree.train_file("Cine", *SCANNER, "P001", "cine_sax", tree.kspace(nz=2))
    out = tmp_path / "shards"
    with FolderLock(out):                                           # another converter is writing here
        with pytest.raises(OutputError, match="another process"):
            convert(ConvertConfig(input=str(tree.root), out=str(out), progress=False, workers=1))
    assert not list(out.glob("*.tar*")) if out.exists() else True
    assert convert(ConvertConfig(input=str(tree.root), out=str(out), progress=False, workers=1)).samples() == 2


def test_symlinked_folders_are_converted_and_broken_links_named(tree, tmp_path: Path) -> None:
    tree.train_file("Cine", *SCANNER, "P001", "cine_sax", tree.kspace(nz=2))
    elsewhere = tmp_path / "elsewhere"
    tree.root, real_root = elsewhere, tree.root
    tree.train_file("Cine", "Center001", "UIH_30T_umr780", "P007", "cine_sax", tree.kspace(nz=3))
    tree.root = real_root
    fullsample = next(real_root.rglob("FullSample"))
    os.symlink(next(elsewhere.rglob("FullSample")) / "Center001", fullsample / "Center001")
    os.symlink(tmp_path / "gone", fullsample / "Center009")
    m = convert(ConvertConfig(input=str(real_root), out=str(tmp_path / "shards"), progress=False, workers=1))
    assert m.samples() == 5 and any("Center001" in s for s in m.sources)
    assert any("Center009" in e["source"] and "broken symlink" in e["problem"] for e in m.errors), m.errors


def test_converter_killed_mid_shard_leaves_nothing_half_written_and_a_rerun_completes(
        synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    args = [f"input={synthetic_root}", f"out={out}", "shard_samples=2", "workers=1"]
    cmd = [sys.executable, "-m", "shards.convert", *[x for s in args for x in ("--set", s)], "--set", "progress=false"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (list(out.glob("*.tar.tmp")) and list(out.glob("*.tar"))) if out.exists() else True:
        assert p.poll() is None, "the converter finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)                                   # mid-shard: a .tar.tmp is open
    p.wait()
    assert not (out / "manifest.json").exists()                      # nothing claims to be converted
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    m = Manifest.read(out)
    assert not list(out.glob("*.tmp")) and "interrupted conversion" in r.stderr
    assert len({s.name for s in m.shards}) == len(m.shards)
    fresh = convert(ConvertConfig(input=str(synthetic_root), out=str(tmp_path / "fresh"), shard_samples=2,
                                  progress=False, workers=1))
    assert m.samples() == fresh.samples() and set(m.sources) == set(fresh.sources)
    keys = {mm["__key__"] for split in ("train", "val") for b in make_loader(LoaderConfig(
        shards=str(out), split=split, mode="eval", micro_batch=1)) for mm in b["meta"]}
    assert len(keys) == fresh.samples("train") + fresh.samples("val")   # every sample readable, none twice
