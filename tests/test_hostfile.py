"""launch/hostfile.py: the pure-Python SLURM hostlist expander, GPU-count parsing and the atomic write.

(The comparison with `scontrol show hostnames` itself runs in tests/test_slurm.py, where the test
cluster provides a configured scontrol.)
"""

from __future__ import annotations

import pytest

from launch.hostfile import expand_nodelist, gpus_per_node, hostnames, main, render, write_hostfile


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-3,7],gpu[01-02]", ["node1", "node2", "node3", "node7", "gpu01", "gpu02"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),  # the lower bound's width is kept across the decade
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),  # scontrol's order
    ("x[1-2]-y[3],a", ["x1-y3", "x2-y3", "a"]),
    (" gpu-a100-[5] ", ["gpu-a100-5"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad, problem", [
    ("n[3-1]", "backwards"),
    ("n[1-2", "without ']'"),
    ("n1-2]", "without '['"),
    ("n[a-b]", "bad range"),
    ("n[1,,2]", "bad range"),
    ("n1,,n2", "empty host"),
    ("n[[1]]", "nested"),
    ("n[1-2]-a", "after the last ']'"),  # scontrol: "Invalid hostlist"
])
def test_expand_nodelist_rejects_bad_syntax(bad: str, problem: str) -> None:
    with pytest.raises(ValueError, match="nodelist") as err:
        expand_nodelist(bad)
    assert problem in str(err.value) and bad in str(err.value)  # names the expression and the problem


def test_hostnames_without_slurm_conf_uses_the_expander() -> None:
    # No slurm.conf: scontrol is not asked (it would look for a controller in DNS).
    assert hostnames("gpu[01-02]", env={"SLURM_CONF": "/nonexistent/slurm.conf"}) == ["gpu01", "gpu02"]


@pytest.mark.parametrize("env, gpus", [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "gpu:4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:2"}, 2),
    ({"SLURM_GPUS_ON_NODE": "1", "SLURM_GPUS_PER_NODE": "8"}, 1),  # what this node got wins
    ({}, None),
])
def test_gpus_per_node(env: dict[str, str], gpus: int | None) -> None:
    assert gpus_per_node(env) == gpus


def test_gpus_per_node_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="SLURM_GPUS_PER_NODE"):
        gpus_per_node({"SLURM_GPUS_PER_NODE": "lots"})


def test_write_hostfile_is_atomic_and_deepspeed_shaped(tmp_path) -> None:
    path = tmp_path / "run" / "hostfile"
    path.parent.mkdir()
    path.write_text("old content that must be replaced whole\n")
    write_hostfile(path, ["node1", "node2"], 8)
    assert path.read_text() == "node1 slots=8\nnode2 slots=8\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["hostfile"]  # no temporary left behind
    with pytest.raises(ValueError, match="slots"):
        render(["node1"], 0)


def test_main_reads_the_slurm_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")  # no scontrol: the pure expander
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "gpu:h100:4")
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    out = tmp_path / "hostfile"
    assert main(["--output", str(out)]) == 0
    assert out.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    assert main(["--output", str(out), "--slots", "2", "--nodelist", "a,b[1-2]"]) == 0
    assert out.read_text() == "a slots=2\nb1 slots=2\nb2 slots=2\n"
