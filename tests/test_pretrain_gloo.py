"""2 real gloo ranks with ZeRO-2 and ZeRO-3 reproduce a 1-process run with the same global batch.

Three processes at once (this file run as a script, torchrun-style variables): a 2-rank group trains
with ZeRO-2, then with ZeRO-3 (a global batch of 4 = 2 ranks x 2), while a 1-rank group trains
with the whole batch of 4 (ZeRO-2 on a 1-rank group). Every rank reads
the same global batches (a 1-rank loader over the session's shards, batches of 4) and keeps its
slice, so the three runs see identical data; the Θ/Λ splits are seeded per sample key.

Tolerance: the 2-rank gradient is the mean of two per-rank means (all-reduce), the 1-process one a
mean over 4 samples; the sums differ only in float32 rounding order, which Adam's normalised update
can amplify early on. Measured: losses differ by <= 1.2e-7 (one float32 ulp), parameters by <= 3.3e-6
after 4 steps, while training moved them by up to 2.6e-3 (lr 1e-3). Asserted: losses within rtol
1e-5, parameters within atol 1e-5, and a parameter change > 1e-3 (so the tolerance is not vacuous).

Helpers here (free port, launching ranks, reading results) are shared with test_pretrain_faults.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The torchrun variables for one rank (what pretrain.dist_env reads), threads split over ranks."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def start_ranks(argv: list[str], world: int, log_dir: Path, name: str) -> list[subprocess.Popen]:
    """Start `python <argv>` once per rank; stdout+stderr of rank r go to <log_dir>/<name>.rank<r>.log."""
    port = free_port()
    procs = []
    for r in range(world):
        log = open(log_dir / f"{name}.rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env(r, world, port),
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def read_log(log_dir: Path, name: str, rank: int) -> str:
    return (log_dir / f"{name}.rank{rank}.log").read_text()


# ---------------------------------------------------------------------------------------------------- worker


def worker(shards: str, out: str) -> None:
    """One rank of the launch described in the module docstring; rank 0 writes <out>.json."""
    import torch
    import torch.distributed as tdist

    from pretrain import engine as E
    from pretrain.checkpoint import consolidated_state_dict
    from pretrain.dist_env import DistEnv, read_dist_env
    from pretrain.objective import ssdu_step_loss
    from pretrain.settings import PretrainConfig
    from shards.loader import LoaderConfig, make_loader

    torch.set_num_threads(1)
    loader = make_loader(LoaderConfig(shards=shards, split="train", micro_batch=4, bucket_limit=64), 0, 1)
    batches = []
    for b in loader:                                   # the same global batches on every rank
        if len(b["meta"]) == 4:
            batches.append(b)
        if len(batches) == STEPS:
            break

    def run(dist: DistEnv, stage: int) -> dict:
        cfg = PretrainConfig()
        cfg.model.size = "tiny"
        cfg.data.micro_batch = 4 // dist.world_size
        cfg.deepspeed.zero_stage = stage
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.run.steps = 1e-3, 0, STEPS
        engine = E.build_engine(cfg, dist, E.ds_config(cfg, dist.world_size))
        flat = lambda state: None if state is None else torch.cat(  # noqa: E731
            [v.flatten().float() for _, v in sorted(state.items())]).tolist()
        init = flat(consolidated_state_dict(engine))
        n, losses = cfg.data.micro_batch, []
        for step, b in enumerate(batches, start=1):
            mine = {k: v[dist.rank * n:(dist.rank + 1) * n] for k, v in b.items()}   # this rank's slice
            loss = ssdu_step_loss(engine, mine, cfg.objective, cfg.run.seed, step)
            engine.backward(loss)
            engine.step()
            total = loss.detach().reshape(1) * n
            tdist.all_reduce(total)
            losses.append(float(total) / 4)
        return {"losses": losses, "params": flat(consolidated_state_dict(engine)), "init": init}

    dist = read_dist_env("cpu")
    E.init_distributed(dist)
    results = {"single": run(dist, 2)} if dist.world_size == 1 else {"zero2": run(dist, 2), "zero3": run(dist, 3)}
    tdist.barrier()
    if dist.rank == 0:
        Path(out).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------------- test


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_zero2_and_zero3_match_one_process(shard_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    pair, single = tmp_path / "pair.json", tmp_path / "single.json"
    procs = start_ranks([str(Path(__file__)), "worker", str(shard_dir), str(pair)], 2, tmp_path, "pair")
    procs += start_ranks([str(Path(__file__)), "worker", str(shard_dir), str(single)], 1, tmp_path, "single")
    codes = wait_all(procs)
    assert codes == [0, 0, 0], "\n".join(read_log(tmp_path, n, r)[-3000:] for n, r in (("pair", 0), ("pair", 1), ("single", 0)))
    r = {**json.loads(pair.read_text()), **json.loads(single.read_text())}
    single = np.array(r["single"]["params"])
    assert len(r["single"]["losses"]) == STEPS
    assert r["single"]["losses"][0] != r["single"]["losses"][-1]            # it trained
    for stage in ("zero2", "zero3"):
        np.testing.assert_allclose(r[stage]["losses"], r["single"]["losses"], rtol=1e-5)
        np.testing.assert_allclose(np.array(r[stage]["params"]), single, rtol=0, atol=1e-5)
    # ... while training moved the parameters far more than that tolerance
    assert np.abs(single - np.array(r["single"]["init"])).max() > 1e-3


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
