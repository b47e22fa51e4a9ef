"""What a run tells the world: rank-0 tqdm with samples/s, TensorBoard scalars, eval JSON lines,
and the loud stop on a non-finite loss.

Scalars (TensorBoard, every `log.every` steps): train/loss, train/lr, train/grad_norm,
train/samples_per_s, data/skipped_samples; evaluation results go to eval/* and to
<run>/eval.jsonl (one JSON object per evaluation, what bench/pretrain_curve.py plots).

A non-finite loss is checked collectively before `backward` (one all-reduce of a flag), so every
rank stops at the same step instead of one rank raising while the others wait in a collective; the
error names the step, the loss and the `__key__`/`__url__` of the samples of the rank that saw it.
Nothing is saved after it, so `latest` still names the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from tqdm import tqdm

from pretrain.dist_env import DistEnv
from pretrain.settings import LogConfig


class NonFiniteLossError(FloatingPointError):
    """The loss of some rank at some step was nan/inf; the message names the step and the sample keys."""


def sample_keys(meta: list[dict]) -> list[str]:
    """"url#key" of every sample of a batch (what to look at when its loss blows up)."""
    return [f"{m.get('__url__', '?')}#{m.get('__key__', m.get('key', '?'))}" for m in meta]


def check_finite(loss: torch.Tensor, step: int, meta: list[dict]) -> None:
    """Raise NonFiniteLossError on every rank if the loss is not finite on any rank (collective)."""
    value = float(loss.detach())
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=loss.device)   # NCCL: on the GPU
    distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    if distributed:
        tdist.all_reduce(bad)
    if bad.item() == 0:
        return
    if math.isfinite(value):
        raise NonFiniteLossError(f"step {step}: non-finite loss on another rank (this rank: {value:.4g}); "
                                 "training stopped, `latest` still names the last good checkpoint")
    raise NonFiniteLossError(f"step {step}: loss is {value} for samples {sample_keys(meta)}; training stopped, "
                             "`latest` still names the last good checkpoint")


class Logbook:
    """Progress bar and TensorBoard writer on rank 0; a silent no-op on the other ranks."""

    def __init__(self, dist: DistEnv, cfg: LogConfig, run_dir: str | os.PathLike, start_step: int, steps: int) -> None:
        self.cfg, self.main = cfg, dist.is_main
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not self.main:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter   # imported here: slow, and only rank 0 needs it
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)
        self._tick = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float], skipped: int) -> None:
        """After optimizer step `step`: advance the bar; write scalars every `log.every` steps."""
        if not self.main:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             samples_s=f"{metrics['samples_per_s']:.1f}", skipped=skipped)
        if self.writer is not None and (step % max(self.cfg.every, 1) == 0):
            for name in ("loss", "lr", "grad_norm", "samples_per_s"):
                self.writer.add_scalar(f"train/{name}", metrics[name], step)
            self.writer.add_scalar("data/skipped_samples", skipped, step)

    def mix(self, step: int, mixed: dict[str, dict[str, float]]) -> None:
        """Every `log.every` steps with more than one mix group: this rank's realised share of each
        group next to the configured one (TensorBoard data/mix/*, a line in mix.jsonl)."""
        if not self.main or len(mixed) < 2 or step % max(self.cfg.every, 1):
            return
        with open(self.run_dir / "mix.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "groups": mixed}) + "\n")
        if self.writer is not None:
            for name, v in mixed.items():
                self.writer.add_scalars(f"data/mix/{name}", {"configured": v["configured"], "realised": v["realised"]}, step)

    def evaluation(self, step: int, results: dict[str, float]) -> None:
        """Record one held-out evaluation: TensorBoard eval/*, a line in eval.jsonl, one printed line."""
        if not self.main:
            return
        line = {"step": step, **results}
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for name, value in results.items():
                self.writer.add_scalar(f"eval/{name}", value, step)
        self.print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def print(self, text: str) -> None:
        """A line on rank 0 that does not break the progress bar."""
        if self.main:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def step_metrics(loss: float, lr: float, grad_norm: float, samples: int, seconds: float) -> dict[str, Any]:
    """The scalars of one optimizer step (samples = global samples of the step)."""
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples / max(seconds, 1e-9)}
