"""Where this process sits in the job: rank, local rank, world size, rendezvous address, device, backend.

One function knows every launcher's variables (open_clip's `world_info_from_env`), so the rest of
pretrain/ never reads the environment:

    launcher                 rank            local rank       world size       master address
    deepspeed / torchrun     RANK            LOCAL_RANK       WORLD_SIZE       MASTER_ADDR / MASTER_PORT
    SLURM (srun, 1 task/GPU) SLURM_PROCID    SLURM_LOCALID    SLURM_NTASKS     first host of SLURM_JOB_NODELIST
    plain `python run.py`    0               0                1                127.0.0.1

RANK/WORLD_SIZE win over the SLURM variables: `srun deepspeed ...` or `srun torchrun ...` set both, and
the inner launcher's numbering is the one the process group uses. The backend follows the device:
gloo on CPU, NCCL on CUDA (`docs/toolchain.md`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; `device` is "cpu" or "cuda:<local_rank>"."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    device: str = "cpu"
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes pointers and TensorBoard files."""
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: "gpu[003-005,7],cpu1" -> "gpu003" (what `scontrol show hostnames | head -1` gives)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot parse a host name from it")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # keep zero padding: "003" stays "003"
    return prefix + first


def _first_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return default


def read_dist_env(device: str = "cpu", env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (table in the module docstring) into a validated `DistEnv`.

    Args:
        device: "cpu" or "cuda" (the run config's `run.device`); CUDA ranks get `cuda:<local_rank>`.
        env: the environment to read (default `os.environ`); tests pass a dict.
    """
    env = os.environ if env is None else env
    rank = _first_int(env, ("RANK", "SLURM_PROCID"), 0)
    local_rank = _first_int(env, ("LOCAL_RANK", "SLURM_LOCALID"), 0)
    world = _first_int(env, ("WORLD_SIZE", "SLURM_NTASKS"), 1)
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif env.get("SLURM_JOB_NODELIST"):
        addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    else:
        addr = "127.0.0.1"
    port = _first_int(env, ("MASTER_PORT",), DEFAULT_PORT)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world} (check RANK/SLURM_PROCID and WORLD_SIZE/SLURM_NTASKS)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"run.device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        return DistEnv(rank, local_rank, world, addr, port, f"cuda:{local_rank}", "nccl")
    return DistEnv(rank, local_rank, world, addr, port, "cpu", "gloo")


def cpu_threads(requested: int = 0, env: Mapping[str, str] | None = None) -> int:
    """Threads per rank: `requested`, or the node's cores shared by its ranks (LOCAL_WORLD_SIZE / LOCAL_SIZE /
    SLURM_NTASKS_PER_NODE: torchrun, the DeepSpeed launcher, SLURM)."""
    if requested > 0:
        return requested
    env = os.environ if env is None else env
    local_world = _first_int(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world, 1))


def export_for_torch(dist: DistEnv) -> None:
    """Write the torchrun variables back, so that `init_process_group(init_method="env://")` finds them under srun."""
    os.environ.update(RANK=str(dist.rank), LOCAL_RANK=str(dist.local_rank), WORLD_SIZE=str(dist.world_size),
                      MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port))
