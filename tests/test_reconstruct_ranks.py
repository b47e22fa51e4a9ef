"""Reconstruction on several processes (real torchrun ranks, gloo): the output tree is byte-identical
to one process's; the report counts every file once and gives slices/s per rank; a rank killed
mid-run leaves only complete outputs, and a rerun finishes the rest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from finetune.rank_share import share

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nproc: int, inp: Path, out: Path, backbone: Path) -> list[str]:
    sets = [f"input={inp}", f"out={out}", f"backbone={backbone}", "batch_size=2", "progress=false"]
    args = [a for s in sets for a in ("--set", s)]
    if nproc == 1:                              # plain python: the one-process path, no process group
        return [sys.executable, "-m", "finetune.reconstruct", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "finetune.reconstruct", *args]


def env() -> dict[str, str]:
    # one thread per process everywhere (torchrun's default): the same float arithmetic in every run
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("reconstruct_report.json", "reconstruct_config.toml")}


@pytest.fixture(scope="module")
def single(synthetic_root: Path, tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("one") / "recon"
    inp = synthetic_root / "ChallengeData_ValSet"
    subprocess.run(command(1, inp, out, tiny_backbone), env=env(), cwd=ROOT, check=True, timeout=600)
    return out, json.loads((out / "reconstruct_report.json").read_text())


def test_two_ranks_write_the_same_bytes_as_one_process(synthetic_root: Path, tiny_backbone: Path, single,
                                                       tmp_path: Path) -> None:
    one, one_report = single
    out = tmp_path / "recon"
    run = subprocess.run(command(2, synthetic_root / "ChallengeData_ValSet", out, tiny_backbone), env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = tree(one)
    assert len(expected) == one_report["written"] >= 4
    assert tree(out) == expected                                          # byte for byte, file for file
    report = json.loads((out / "reconstruct_report.json").read_text())
    for key in ("files", "written", "errors", "slices", "adapters", "notes"):
        assert report[key] == one_report[key], key
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and all(r["files"] >= 1 for r in report["ranks"])
    assert sum(r["slices"] for r in report["ranks"]) == report["slices"]
    assert "rank 0/2" in run.stderr and "rank 1/2" in run.stderr and "slices/s in total" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".recon.lock") == ["recon"]   # stage swapped in


@pytest.mark.slow
def test_a_killed_rank_leaves_complete_files_and_a_rerun_finishes(synthetic_root: Path, tiny_backbone: Path, single,
                                                                 tmp_path: Path) -> None:
    one, _ = single
    expected = tree(one)
    out, inp = tmp_path / "recon", synthetic_root / "ChallengeData_ValSet"
    proc = subprocess.Popen(command(2, inp, out, tiny_backbone), env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        lines = next(tmp_path.glob(".recon.resume-*/.journal/rank1-of-2.jsonl"), None)
        if lines is not None and lines.read_text().count("\n") >= 1:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        victim = child
                except psutil.Error:
                    continue
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    log = proc.communicate(timeout=120)[0]
    assert victim is not None, f"rank 1 finished before it could be killed:\n{log[-2000:]}"
    assert proc.returncode != 0
    assert not out.exists()                                  # nothing of the killed run is visible as `out`
    (stage,) = tmp_path.glob(".recon.resume-*")
    partial = {k: v for k, v in tree(stage).items() if not k.startswith(".journal/")}
    assert partial and len(partial) < len(expected), sorted(partial)
    for name, data in partial.items():
        assert data == expected[name], f"{name} differs from the one-process output"   # only whole files
    rerun = subprocess.run(command(2, inp, out, tiny_backbone), env=env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree(out) == expected
    report = json.loads((out / "reconstruct_report.json").read_text())
    assert report["written"] == len(expected) and 1 <= report["resumed"] <= len(partial)
    assert f"resuming: {report['resumed']} of" in rerun.stderr
    assert not stage.exists() and not (out / ".journal").exists()


def test_share_is_deterministic_balanced_and_complete(tmp_path: Path) -> None:
    sizes = [50, 40, 30, 20, 10, 10, 5]
    paths = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * n)
        paths.append(p)
    parts = [share(paths, r, 3) for r in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(paths)                  # each file once
    assert all(part == sorted(part, key=paths.index) for part in parts)                 # input order kept
    loads = sorted(sum(p.stat().st_size for p in part) for part in parts)
    # largest first, each to the least loaded rank (ties: lower rank): 50+10 | 40+10+5 | 30+20
    assert loads == [50, 55, 60]


def test_journal_trusts_only_unchanged_inputs_and_whole_lines(tmp_path: Path) -> None:
    from finetune.rank_share import Journal

    inputs = []
    for name in ("a", "b", "c"):
        p = tmp_path / f"{name}.mat"
        p.write_bytes(name.encode() * 10)
        inputs.append(p)
    stage = tmp_path / ".recon.resume-0123"
    writer = Journal(stage, 0, 2)
    for p in inputs:
        writer.record({"path": str(p), "slices": 1})
    with open(writer.file, "a") as f:
        f.write('{"input": [], "outcome": {"pa')                    # a line cut by a kill
    assert set(Journal(stage, 1, 2).done()) == {str(p) for p in inputs}   # any rank reads every rank's file
    inputs[1].write_bytes(b"changed input, other size")
    assert set(Journal(stage, 0, 1).done()) == {str(inputs[0]), str(inputs[2])}
    Journal(stage, 0, 1).remove()
    assert not (stage / ".journal").exists()
