"""pretrain/run.py from a user's side, one real process each (issue 11 items 6, 7, 8): a shard path that
does not exist says so and which commands make it; shards that all vanished stop the run with an
error instead of a hang; `checkpoint.every=0` means "only at the end"."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_pretrain_gloo import ROOT, free_port, rank_env

pytestmark = pytest.mark.slow


def run(tmp_path: Path, *sets: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "pretrain/run.py", "--config", str(ROOT / "configs/pretrain_tiny.toml"),
           "--set", f"run.dir={tmp_path / 'run'}", "--set", "log.eval_shards=", "--set", "log.tensorboard=false",
           *[x for s in sets for x in ("--set", s)]]
    return subprocess.run(cmd, cwd=ROOT, env=rank_env(0, 1, free_port()), capture_output=True, text=True,
                          timeout=timeout)


def test_missing_shards_say_so_and_how_to_make_them(tmp_path: Path) -> None:
    r = run(tmp_path, f"data.shards={tmp_path / 'out' / 'shards'}")
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert f"{tmp_path / 'out' / 'shards'}: does not exist" in text and "python -m shards.convert" in text, text[-3000:]
    assert "smaller shard_samples" not in text


@pytest.mark.timeout(300)
def test_shards_gone_under_a_valid_manifest_stop_the_run_instead_of_hanging(shard_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    for p in copy.glob("train-*.tar"):
        p.write_bytes(b"garbage, not a tar " * 40)                  # every training shard unreadable
    r = run(tmp_path, f"data.shards={copy}", "run.steps=3")
    assert r.returncode != 0
    assert "no usable sample in" in r.stdout + r.stderr and "train-000000.tar" in r.stdout + r.stderr


def test_checkpoint_every_zero_saves_only_at_the_end(shard_dir: Path, tmp_path: Path) -> None:
    r = run(tmp_path, f"data.shards={shard_dir}", "run.steps=3", "checkpoint.every=0")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ckdir = tmp_path / "run" / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step00000003"
    assert sorted(p.name for p in ckdir.iterdir() if p.is_dir()) == ["step00000003"]
    # Item 1, through the real entry point: `latest` deleted "to start fresh", resume=false. The old
    # complete tag survives (latest recovered, said in the log); the new run's step 3 moves it aside.
    first = sorted(p.name for p in (ckdir / "step00000003").iterdir())
    (ckdir / "latest").unlink()
    r = run(tmp_path, f"data.shards={shard_dir}", "run.steps=3", "checkpoint.every=0", "checkpoint.resume=false")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "recovered it from the newest complete checkpoint step00000003" in r.stdout + r.stderr
    aside = [p for p in ckdir.iterdir() if p.name.startswith("step00000003.superseded-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == first
    assert (ckdir / "latest").read_text().strip() == "step00000003"
