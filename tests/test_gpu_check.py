"""launch/gpu_check.sh / bench/gpu_check.py, the one prepared GPU check: its plan puts the shipped 1b
config and the ZeRO stages first and compile last; it runs end to end on this CPU in its dry-run mode
(the same job code, tiny scale) and prints one table; it fails soft: a job that fails or has no
budget left is a row saying so, the others still report, the exit status is 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import GpuCheckConfig, dry, plan
from launch.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_runs_the_shipped_1b_config_and_zero_first_and_compile_last() -> None:
    names = [j.name for j in plan(GpuCheckConfig())]
    assert names[:5] == ["peak", "step/1b/0/0", "zero/1b/1", "zero/1b/3", "zero/1b/2"]
    assert names[-3:] == ["step/small/0/1", "step/base/0/1", "step/1b/0/1"]
    for size in ("1b", "base", "small", "tiny"):
        assert f"step/{size}/0/0" in names and f"step/{size}/1/0" in names
    cfg = parse_args(GpuCheckConfig, ["--set", "dry_run=true", "--set", "budget_s=100"])
    small = dry(cfg)
    assert (small.sizes, small.micro_batch, small.compile_sizes, small.budget_s) == (["tiny"], 1, [], 100.0)
    kept = dry(parse_args(GpuCheckConfig, ["--set", "dry_run=true", "--set", "zero_stages=", "--set", "sizes=tiny,small"]))
    assert (kept.zero_stages, kept.sizes, kept.ny) == ([], ["tiny", "small"], 32)
    # the default budget ends inside 9 minutes with the shell wrapper's margin (timeout 530 s)
    assert GpuCheckConfig().budget_s <= 480 and "timeout 530" in (ROOT / "launch" / "gpu_check.sh").read_text()


def _run(tmp_path: Path, *sets: str, timeout: int = 540) -> tuple[str, dict]:
    """launch/gpu_check.sh in its dry-run mode; on a timeout its whole process group is ended."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OUT=str(tmp_path), CMRFM_PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--set", "dry_run=true",
                             *[a for s in sets for a in ("--set", s)]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"gpu_check.sh still running after {timeout} s:\n{stdout[-2000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert (tmp_path / "gpu_check.log").read_text() == stdout
    return stdout, json.loads((tmp_path / "results.json").read_text())


@pytest.mark.timeout(600)
def test_the_dry_run_prints_one_table_of_every_step(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "zero_stages=")
    table = out.split("The table", 1)[1]
    rows = [ln for ln in table.splitlines() if ln.startswith("| step")]
    assert len(rows) == 2 and all(r.endswith("| ok |") for r in rows), table
    assert "| peak | cpu |" in table
    assert set(results["results"]) == {"peak", "flops", "step/tiny/0/0", "step/tiny/1/0"}
    assert results["results"]["flops"]["flops"]["tiny"] > 0
    assert results["results"]["step/tiny/0/0"]["seconds"] > 0


@pytest.mark.timeout(600)
def test_a_failing_job_and_an_exhausted_budget_are_rows_not_the_end(tmp_path: Path) -> None:
    out, results = _run(tmp_path / "a", "zero_stages=", "sizes=tiny,nosuch")
    table = out.split("The table", 1)[1]
    assert "| step | tiny | off | off | - | 1 | " in table and "| ok |" in table
    assert "| step | nosuch |" in table and "unknown model size" in table
    assert "error" in results["results"]["step/nosuch/0/0"]
    out, results = _run(tmp_path / "b", "zero_stages=", "budget_s=12")
    assert out.count("skipped:") >= 2 and "The table" in out           # 12 s leave no job 10 s


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_dry_run_with_a_zero1_step_through_pretrain_engine(tmp_path: Path) -> None:
    """DeepSpeed on the CPU (gloo, one rank; its shm extension is built on first use: minutes)."""
    out, results = _run(tmp_path, "budget_s=800", timeout=880)
    assert "seconds" in results["results"]["zero/tiny/1"], results["results"]["zero/tiny/1"]
    assert "| zero | tiny | off | off | ZeRO-1 | 1 |" in out
