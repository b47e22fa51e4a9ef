"""pretrain run.init: a fresh run starts from exported weights (the README demo starts from the shipped
backbone), and refuses ZeRO-3, where each rank builds only its partition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_pretrain_gloo import ROOT, free_port

pytestmark = [pytest.mark.distributed]


def _pretrain(shard_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    cmd = [sys.executable, str(ROOT / "pretrain/run.py"), "--config", str(ROOT / "configs/pretrain_tiny.toml"),
           "--set", f"data.shards={shard_dir}", "--set", f"run.dir={run_dir}", "--set", "run.steps=1",
           "--set", "log.eval_shards=", "--set", "log.tensorboard=false", "--set", "checkpoint.every=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_fresh_run_starts_from_the_exported_weights(shard_dir: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    # learning rate 0 (and so no weight decay step): the exported backbone must be the init, bit for bit
    done = _pretrain(shard_dir, tmp_path / "run", "--set", f"run.init={tiny_backbone}", "--set", "optim.lr=0",
                     "--set", "optim.weight_decay=0")
    assert done.returncode == 0, done.stderr[-3000:]
    start, end = load_file(str(tiny_backbone / "backbone.safetensors")), load_file(str(tmp_path / "run/backbone.safetensors"))
    assert start.keys() == end.keys()
    assert all(torch.equal(start[k], end[k]) for k in start)
    # and a random init (no run.init) differs from it
    other = _pretrain(shard_dir, tmp_path / "other", "--set", "optim.lr=0", "--set", "optim.weight_decay=0",
                      "--set", "run.seed=7")
    assert other.returncode == 0, other.stderr[-3000:]
    rand = load_file(str(tmp_path / "other/backbone.safetensors"))
    assert any(not torch.equal(start[k], rand[k]) for k in start)


def test_init_under_zero3_is_refused_naming_the_weights(shard_dir: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    done = _pretrain(shard_dir, tmp_path / "run", "--set", f"run.init={tiny_backbone}", "--set", "deepspeed.zero_stage=3")
    assert done.returncode != 0
    assert "run.init" in done.stderr and "ZeRO stage 0-2" in done.stderr
