"""DistEnv from the DeepSpeed launcher / torchrun, SLURM and plain runs (pretrain/dist_env.py)."""

from __future__ import annotations

import pytest

from pretrain.dist_env import DistEnv, first_slurm_host, read_dist_env


def test_plain_python_is_one_cpu_rank() -> None:
    assert read_dist_env("cpu", env={}) == DistEnv(0, 0, 1, "127.0.0.1", 29500, "cpu", "gloo")


def test_deepspeed_launcher_and_torchrun_variables() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "12345"}
    d = read_dist_env("cuda", env=env)
    assert d == DistEnv(3, 1, 4, "node7", 12345, "cuda:1", "nccl")
    assert not d.is_main


def test_slurm_variables_and_master_from_the_nodelist() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[003-006,9]"}
    d = read_dist_env("cpu", env=env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.backend) == (5, 1, 8, "gpu003", "gloo")


def test_launcher_variables_win_over_slurm_and_master_addr_over_the_nodelist() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "a[1-2]", "MASTER_ADDR": "b9"}
    d = read_dist_env("cpu", env=env)
    assert (d.rank, d.world_size, d.master_addr) == (1, 2, "b9")


@pytest.mark.parametrize("nodelist,host", [("n1", "n1"), ("n[01-04]", "n01"), ("cpu-a[7,9],gpu1", "cpu-a7"),
                                           ("x1,x2", "x1")])
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="RANK"):
        read_dist_env("cpu", env={"RANK": "x"})
    with pytest.raises(ValueError, match="outside world size"):
        read_dist_env("cpu", env={"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="run.device"):
        read_dist_env("tpu", env={})
