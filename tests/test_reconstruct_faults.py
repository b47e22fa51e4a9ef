"""finetune.reconstruct under user mistakes, re-runs and kills (issue 11 items 2, 3, 4, 10, 11, 12):
the input is never touched, baselines never land inside the submission tree, a re-run leaves no output
it did not write, config errors are one line before any work, symlinked folders are read, exit codes
tell a script when files were skipped, and a SIGKILL midway leaves the previous tree whole."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.reconstruct import main
from challenge.submission import parse_kus_path
from launch.outputs import EXIT_SKIPPED, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]


def cine_tree(synthetic_root: Path, dest: Path) -> Path:
    src = next((synthetic_root / "ChallengeData_ValSet").rglob("MultiCoil/Cine"))
    shutil.copytree(src, dest / src.relative_to(synthetic_root))
    return dest


def digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (what "untouched" means)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def args(inp, out, backbone: Path, *extra: str) -> list[str]:
    return ["--set", f"input={inp}", "--set", f"out={out}", "--set", f"backbone={backbone}", "--set", "progress=false",
            *extra]


def kus_rel(root: Path) -> set[str]:
    return {str(parse_kus_path(p).relative_path()) for p in root.rglob("*_kus_*.mat") if "UnderSample_" in str(p)}


@pytest.mark.parametrize("how", ["same", "trailing_slash", "symlink", "inside", "containing"])
def test_an_out_that_is_inside_or_contains_the_input_is_refused_and_the_input_untouched(
        synthetic_root: Path, tiny_backbone: Path, tmp_path: Path, how: str, capsys) -> None:
    inp = cine_tree(synthetic_root, tmp_path / "D")
    before = digest(inp)
    out = {"same": inp, "trailing_slash": f"{inp}/", "symlink": tmp_path / "link",
           "inside": inp / "recon", "containing": tmp_path}[how]
    if how == "symlink":
        os.symlink(inp, tmp_path / "link")
    assert main(args(inp, out, tiny_backbone)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("is inside the input" in err or "contains the input" in err), err
    assert digest(inp) == before                                  # not one byte of the input changed
    assert not (inp / "recon").exists()


def test_baselines_are_written_beside_the_resolved_out_never_inside_it(
        synthetic_root: Path, tiny_backbone: Path, tmp_path: Path, monkeypatch) -> None:
    inp = cine_tree(synthetic_root, tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    assert main(args(inp, "rs/", tiny_backbone, "--set", "methods=cmrfm,zero_filled")) == 0
    assert not (tmp_path / "rs" / "_zero_filled").exists()
    assert kus_rel(tmp_path / "rs_zero_filled") == kus_rel(inp) == kus_rel(tmp_path / "rs")


def test_a_rerun_leaves_no_output_it_did_not_write_and_exits_3(synthetic_root: Path, tiny_backbone: Path,
                                                               tmp_path: Path) -> None:
    """Item 4: input b becomes unreadable; the re-run skips it, and b's old output is gone, not kept
    to be scored as the new model's. Item 12: exit status 3 says something was skipped."""
    inp = cine_tree(synthetic_root, tmp_path / "in")
    out = tmp_path / "recon"
    assert main(args(inp, out, tiny_backbone)) == 0
    kus = sorted(p for p in inp.rglob("*_kus_*.mat"))
    assert len(kus) >= 2
    broken = kus[0]
    broken.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    assert main(args(inp, out, tiny_backbone)) == EXIT_SKIPPED
    rel = parse_kus_path(broken).relative_path()
    assert not (out / rel).exists()
    assert kus_rel(out) == kus_rel(inp) - {str(rel)}
    report = (out / "reconstruct_report.json").read_text()
    assert str(broken) in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".recon.")] or \
        [p.name for p in tmp_path.iterdir() if p.name.startswith(".recon.")] == [".recon.lock"]


@pytest.mark.parametrize("mistake", ["no_backbone", "unknown_method", "missing_input", "empty_input", "bad_backbone"])
def test_config_mistakes_end_in_one_line_before_any_work(synthetic_root: Path, tiny_backbone: Path, tmp_path: Path,
                                                         mistake: str, capsys, monkeypatch) -> None:
    """Item 10: each mistake is one line and exit status 2, and nothing is reconstructed or written
    (the unknown method is refused before the cmrfm reconstruction runs)."""
    import finetune.reconstruct as R

    ran: list[str] = []
    monkeypatch.setattr(R, "ModelBank", lambda *a, **k: ran.append("model") or pytest.fail("work started"))
    inp = cine_tree(synthetic_root, tmp_path / "in")
    out = tmp_path / "recon"
    argv = {"no_backbone": args(inp, out, "")[:-2] + ["--set", "progress=false", "--set", "backbone="],
            "unknown_method": args(inp, out, tiny_backbone, "--set", "methods=cmrfm,zero_filed"),
            "missing_input": args(tmp_path / "nope", out, tiny_backbone),
            "empty_input": args(tmp_path, out, tiny_backbone)[:0] + args(tmp_path / "empty", out, tiny_backbone),
            "bad_backbone": args(inp, out, tmp_path / "in")}[mistake]
    (tmp_path / "empty").mkdir()
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert {"no_backbone": "backbone: not set", "unknown_method": "unknown method 'zero_filed'",
            "missing_input": "input folder does not exist", "empty_input": "no *_kus_*.mat",
            "bad_backbone": "backbone not found"}[mistake] in err
    assert not out.exists() and not ran


def test_symlinked_folders_are_followed_and_broken_links_reported(synthetic_root: Path, tiny_backbone: Path,
                                                                   tmp_path: Path) -> None:
    """Item 11: a tree assembled with symlinked folders is read in full; a broken link is named in the
    report and the exit status is 3."""
    real = cine_tree(synthetic_root, tmp_path / "real")
    inp = tmp_path / "in"
    centers = next(real.rglob("UnderSample_TaskR1"))
    linked = inp / centers.relative_to(real)
    linked.mkdir(parents=True)
    for center in centers.iterdir():
        os.symlink(center, linked / center.name)                   # every center folder is a link
    mask_dir = centers.parent / "Mask_TaskR1"
    os.symlink(mask_dir, linked.parent / "Mask_TaskR1")
    out = tmp_path / "recon"
    assert main(args(inp, out, tiny_backbone)) == 0
    assert kus_rel(out) == kus_rel(real) and kus_rel(out)
    os.symlink(tmp_path / "gone", linked / "Center099")
    assert main(args(inp, out, tiny_backbone)) == EXIT_SKIPPED
    assert "Center099: broken symlink" in (out / "reconstruct_report.json").read_text()
    assert kus_rel(out) == kus_rel(real)


def test_sigkill_midway_leaves_the_previous_tree_whole_and_a_rerun_completes(
        synthetic_root: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    """Kill -9 while the second run is writing: `out` is still exactly the first run's tree (no
    half-written or mixed file visible); the next run resumes the dead run's staging folder (same
    configuration: finetune.rank_share.shared_stage) and finishes."""
    inp = cine_tree(synthetic_root, tmp_path / "in")
    assert len(kus_rel(inp)) >= 2                                 # one written, at least one to go at the kill
    out = tmp_path / "recon"
    assert main(args(inp, out, tiny_backbone)) == 0
    first = digest(out)
    cmd = [sys.executable, "-m", "finetune.reconstruct", *args(inp, out, tiny_backbone)]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".recon.resume-*/**/*_kus_*.mat")):
        assert p.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert digest(out) == first                                   # the previous tree, whole
    assert list(tmp_path.glob(".recon.resume-*"))                 # the dead run's staging, not visible as out
    assert main(args(inp, out, tiny_backbone)) == 0               # the rerun resumes it and completes
    assert not list(tmp_path.glob(".recon.resume-*"))
    assert set(digest(out)) == set(first)
