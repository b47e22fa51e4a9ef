"""Faults with real processes: nothing lost (pretrain/run.py, pretrain/checkpoint.py).

Every run here is the real entry point on 2 gloo ranks, 8 steps of the tiny model with a checkpoint
every 2 steps, started either by the DeepSpeed launcher (`deepspeed --num_gpus 2 pretrain/run.py`) or
torchrun-style (one `python pretrain/run.py` per rank; per-rank exit codes are visible). Faults that
must strike at an exact point (half-way through a checkpoint file, a nan at step 5) are injected by
this file run as a wrapper around `pretrain.run.main`: `python tests/test_pretrain_faults.py inject
FAULT STEP RANK -- <run.py arguments>`.

Bitwise: a killed-and-resumed run ends with exactly the parameters of the uninterrupted run (CPU,
fp32, ZeRO-2): the weights, optimizer partitions, scheduler, every rank's RNG and loader position
are restored, and the Θ/Λ splits are seeded per (step, sample key).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pretrain_gloo import ROOT, free_port, read_log, start_ranks, wait_all

STEPS, EVERY = 8, 2
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run_args(shard_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/pretrain_tiny.toml"), "--set", f"data.shards={shard_dir}",
            "--set", f"run.dir={run_dir}", "--set", f"run.steps={STEPS}", "--set", f"checkpoint.every={EVERY}",
            "--set", "log.eval_shards=", "--set", "log.tensorboard=false", "--set", "optim.warmup_steps=2", *extra]


def deepspeed_launch(args: list[str], log: Path) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 pretrain/run.py ARGS`, as the README runs it."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "pretrain/run.py", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(condition, timeout: float = 180, what: str = "") -> None:
    """Poll a condition (not a sleep for timing: the test proceeds as soon as it holds)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.02)


def latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def backbone(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "backbone.safetensors"))


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    import psutil

    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        m = re.search(r"--local_rank=(\d)", " ".join(child.cmdline()))
        if m and "pretrain/run.py" in " ".join(child.cmdline()):
            out[int(m.group(1))] = child.pid
    return out


@pytest.fixture(scope="module")
def reference(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (DeepSpeed launcher), with the end-of-run evaluation."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    p = deepspeed_launch(run_args(shard_dir, run_dir, "--set", f"log.eval_shards={shard_dir}",
                                  "--set", "log.tensorboard=true"), run_dir.parent / "launch.log")
    assert p.wait(timeout=240) == 0, (run_dir.parent / "launch.log").read_text()[-4000:]
    return run_dir


def test_uninterrupted_run_writes_everything(reference: Path) -> None:
    import json

    assert latest(reference) == f"step{STEPS:08d}"
    assert sorted(p.name for p in (reference / "checkpoints").glob("step*")) == ["step00000006", "step00000008"]
    ds = json.loads((reference / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 2 * 2 and ds["zero_optimization"]["stage"] == 2
    assert "[run]" in (reference / "config.toml").read_text()
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (reference / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == STEPS and evals[-1]["scored"] > 0 and evals[-1]["psnr"] > 0
    assert json.loads((reference / "model_config.json").read_text())["size"] == "tiny"
    log = (reference.parent / "launch.log").read_text()
    assert "global batch 4" in log and "samples_s=" in log


def test_sigkill_one_rank_then_relaunch_ends_bitwise_equal(reference: Path, shard_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = deepspeed_launch(run_args(shard_dir, run_dir), tmp_path / "killed.log")
    wait_for(lambda: latest(run_dir) == "step00000004" or p.poll() is not None, what="checkpoint at step 4")
    pids = rank_pids(p)
    assert p.poll() is None and set(pids) == {0, 1}, (tmp_path / "killed.log").read_text()[-3000:]
    os.kill(pids[1], signal.SIGKILL)                              # rank 1 dies mid-run
    assert p.wait(timeout=120) != 0
    resumed_from = latest(run_dir)
    assert resumed_from in {"step00000004", "step00000006"}       # whatever was complete

    p = deepspeed_launch(run_args(shard_dir, run_dir), tmp_path / "resumed.log")
    assert p.wait(timeout=240) == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / resumed_from}" in (tmp_path / "resumed.log").read_text()
    got, want = backbone(run_dir), backbone(reference)
    assert set(got) == set(want)
    assert all((got[k] == want[k]).all() for k in want), "resumed run differs from the uninterrupted one"


def test_sigterm_saves_at_the_next_step_and_exits_zero(shard_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    procs = start_ranks(["pretrain/run.py", *run_args(shard_dir, run_dir)], 2, tmp_path, "term")
    wait_for(lambda: latest(run_dir) == "step00000002" or procs[0].poll() is not None, what="checkpoint at step 2")
    procs[1].send_signal(signal.SIGTERM)                          # one rank is enough: the flag is all-reduced
    assert wait_all(procs) == [0, 0], read_log(tmp_path, "term", 0)[-3000:]
    log = read_log(tmp_path, "term", 0)
    m = re.search(r"preempted: checkpoint \S+ written at step (\d+)", log)
    assert m, log[-3000:]
    step = int(m.group(1))
    assert 2 < step < STEPS and latest(run_dir) == f"step{step:08d}"
    assert not (run_dir / "backbone.safetensors").exists()        # a preempted run is not finished


def test_crash_while_writing_a_checkpoint_leaves_the_previous_latest(reference: Path, shard_dir: Path,
                                                                    tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    wrapper = [str(Path(__file__)), "inject", "crash_in_save", "4", "1", "--"]
    procs = start_ranks([*wrapper, *run_args(shard_dir, run_dir)], 2, tmp_path, "crash")
    assert procs[1].wait(timeout=240) == -signal.SIGKILL, read_log(tmp_path, "crash", 1)[-3000:]
    procs[0].kill()                                               # the job dies with it (as srun/the launcher do)
    procs[0].wait()
    assert latest(run_dir) == "step00000002"
    partial = run_dir / "checkpoints" / "step00000004.incomplete"
    assert partial.is_dir()                                       # half-written, not pointed to
    assert not (run_dir / "checkpoints" / "step00000004").exists()   # never visible under its tag name

    procs = start_ranks(["pretrain/run.py", *run_args(shard_dir, run_dir)], 2, tmp_path, "after")
    assert wait_all(procs) == [0, 0], read_log(tmp_path, "after", 0)[-3000:]
    log = read_log(tmp_path, "after", 0)
    assert f"removed incomplete checkpoint {partial}" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step00000002'}" in log
    got, want = backbone(run_dir), backbone(reference)
    assert all((got[k] == want[k]).all() for k in want)


def test_nonfinite_loss_stops_naming_step_and_samples_and_keeps_the_last_good_checkpoint(
        shard_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    wrapper = [str(Path(__file__)), "inject", "nan_loss", "5", "1", "--"]
    procs = start_ranks([*wrapper, *run_args(shard_dir, run_dir)], 2, tmp_path, "nan")
    codes = wait_all(procs)
    assert all(c != 0 for c in codes)
    bad, other = read_log(tmp_path, "nan", 1), read_log(tmp_path, "nan", 0)
    m = re.search(r"NonFiniteLossError: step 5: loss is nan for samples \[(.*?)\]", bad)
    assert m and ".tar#" in m.group(1), bad[-3000:]               # shard url + sample key
    assert "step 5: non-finite loss on another rank" in other
    assert latest(run_dir) == "step00000004"                      # the last good one, untouched
    assert not (run_dir / "checkpoints" / "step00000005").exists()


# ---------------------------------------------------------------------------------------------------- injection


def inject(fault: str, step: int, rank: int, argv: list[str]) -> int:
    """Run pretrain.run.main(argv) with one fault planted at `step` on `rank`."""
    import torch

    import pretrain.run as run
    from pretrain import engine

    me = int(os.environ.get("RANK", "0"))
    if fault == "nan_loss":
        real = run.ssdu_step_loss

        def poisoned(model, batch, cfg, seed, at):
            loss = real(model, batch, cfg, seed, at)
            return loss * torch.tensor(float("nan")) if (at == step and me == rank) else loss

        run.ssdu_step_loss = poisoned
    elif fault == "crash_in_save":
        real_save = engine.WeightsOnlyCheckpointEngine.save

        def dying_save(self, state_dict, path):
            if me == rank and f"step{step:08d}" in str(path) and "optim_states" in str(path):
                real_save(self, state_dict, path)
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])     # half the file on disk ...
                os.kill(os.getpid(), signal.SIGKILL)              # ... and the process is gone
            return real_save(self, state_dict, path)

        engine.WeightsOnlyCheckpointEngine.save = dying_save
    return run.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "inject":
        split = sys.argv.index("--")
        sys.exit(inject(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[split + 1:]))
