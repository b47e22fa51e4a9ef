"""launch/*.sbatch, launch/hostfile.py and launch/accelerate_*.yaml on a real SLURM cluster.

The cluster (munge, slurmctld, two slurmd "nodes" in their own network namespaces) is started once
for this module by tests/slurm_cluster.py and torn down by pid afterwards; its teardown fails the
module if any daemon, namespace or job process survived. Jobs run the project's environment
($CMRFM_VENV, else the interpreter running the tests: its bin/ first on the job's PATH) and read the repo in place (one machine: a shared filesystem).

The pretraining runs are the tiny CPU config with one gloo rank per node: the production header
of launch/pretrain.sbatch is kept and only its sizes are overridden on the sbatch command line
(-N2 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=1; the nodes have fake GPUs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import NETNS, REPO, JobDeadline, SlurmCluster, venv_dir

ONE_RANK_PER_NODE = ("-N2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1")
JOB_DEADLINE_S = 120  # generous: a loaded CI machine; the jobs take a fraction of it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"left behind after the SLURM tests: {left}"


@pytest.fixture
def slurm(cluster: SlurmCluster):
    """The cluster, and after the test (passed or failed): no job left queued and no job process left on a node."""
    yield cluster
    subprocess.run(["scancel", "--user=root"], env=cluster.env, capture_output=True, timeout=10)
    daemons = {p.pid for p in cluster.procs.values()}
    end = time.monotonic() + 20
    while True:
        queued = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=cluster.env, capture_output=True,
                                text=True, timeout=10).stdout.split("\n")
        strays = [pid for ns in NETNS.values()
                  for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                            timeout=10).stdout.split() if int(pid) not in daemons]
        if not any(q.strip() for q in queued) and not strays:
            break
        assert time.monotonic() < end, f"after the test: jobs {queued} and processes {strays} still on the nodes"
        time.sleep(0.2)


def job_env(**extra: str) -> dict[str, str]:
    """What a user exports before sbatch: the environment and repo to use, DeepSpeed on CPU. CMRFM_VENV
    is passed on only when set (the sbatch scripts then activate it); otherwise the running
    interpreter's bin/ leads PATH, which the scripts use as they are (a conda env has no bin/activate)."""
    env = {"CMRFM_ROOT": str(REPO), "DS_ACCELERATOR": "cpu",
           "PATH": f"{venv_dir() / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    if os.environ.get("CMRFM_VENV"):
        env["CMRFM_VENV"] = os.environ["CMRFM_VENV"]
    return env


def test_jobs_default_to_the_running_interpreters_environment(monkeypatch) -> None:
    """No CMRFM_VENV: jobs use sys.prefix (any venv or conda env), not <repo>/.venv (exit 127 before)."""
    monkeypatch.delenv("CMRFM_VENV", raising=False)
    assert venv_dir() == Path(sys.prefix) and (venv_dir() / "bin" / "python").exists()
    env = job_env()
    assert "CMRFM_VENV" not in env and env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    monkeypatch.setenv("CMRFM_VENV", "/opt/env")
    assert venv_dir() == Path("/opt/env") and job_env()["CMRFM_VENV"] == "/opt/env"


def pretrain_args(shard_dir: Path, run_dir: Path, steps: int, every: int) -> list[str]:
    """`--set` overrides for a few steps of the tiny config, logging every step to TensorBoard."""
    sets = {"data.shards": str(shard_dir), "run.dir": str(run_dir), "run.steps": steps, "run.device": "cpu",
            "checkpoint.every": every, "log.every": 1, "log.tensorboard": "true", "log.eval_shards": ""}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def logged_steps(run_dir: Path) -> list[list[int]]:
    """Steps logged to TensorBoard (train/loss), one list per event file, i.e. per run of the job, in order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    runs = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        steps = [e.step for e in EventFileLoader(str(path)).Load()
                 if any(v.tag == "train/loss" for v in e.summary.value)]
        runs.append(steps)
    return runs


def latest_step(run_dir: Path) -> int:
    """Step of the checkpoint that `<run>/checkpoints/latest` names (tag stepNNNNNNNN, folder present)."""
    ckdir = run_dir / "checkpoints"
    tag = (ckdir / "latest").read_text().strip()
    assert (ckdir / tag).is_dir(), f"latest names {tag}, which is not a folder in {ckdir}"
    match = re.fullmatch(r"step(\d{8})", tag)
    assert match, f"unexpected tag {tag!r} in {ckdir / 'latest'}"
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------- pretrain
@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_sbatch_two_nodes_one_gloo_rank_each(slurm: SlurmCluster, shard_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = slurm.submit(REPO / "launch/pretrain.sbatch", *pretrain_args(shard_dir, run, steps=2, every=2),
                       env=job_env(CMRFM_CONFIG="configs/pretrain_tiny.toml"), sbatch_args=ONE_RANK_PER_NODE)
    state = slurm.wait(job, JOB_DEADLINE_S)
    log = slurm.output(job).read_text(errors="replace")
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), slurm.describe(job)
    assert "2 ranks on node[1-2], master node1:" in log, log
    assert re.search(r"^0: world 2 x micro-batch", log, re.M), log  # one process group over both nodes
    assert state.fields["NodeList"] == "node[1-2]"
    for rank in (0, 1):  # srun --label: every line of rank r starts with "r: "
        assert re.search(rf"^{rank}: ", log, re.M), f"no output from rank {rank}\n{log}"
    assert latest_step(run) == 2
    assert logged_steps(run) == [[1, 2]]


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_preempted_checkpoints_requeues_and_resumes_exactly(slurm: SlurmCluster, shard_dir: Path,
                                                                     tmp_path: Path) -> None:
    run, steps = tmp_path / "run", 3
    job = slurm.submit(REPO / "launch/pretrain.sbatch", *pretrain_args(shard_dir, run, steps=steps, every=100),
                       env=job_env(CMRFM_CONFIG="configs/pretrain_tiny.toml"), sbatch_args=ONE_RANK_PER_NODE)
    # run.py prints its plan once its signal handlers are installed: then send what --signal=B:USR1@120 sends.
    slurm.wait_for_output(job, r"world 2 x .*fresh start", JOB_DEADLINE_S)
    slurm.signal(job, "USR1")
    state = slurm.wait(job, JOB_DEADLINE_S)
    log = slurm.output(job).read_text(errors="replace")
    assert (state.state, state.exit_code, state.restarts) == ("COMPLETED", "0:0", 1), slurm.describe(job)
    assert "USR1: checkpoint and requeue" in log and f"requeueing job {job}" in log, log
    assert "restart 1:" in log, f"the requeued run did not start\n{log}"
    first, second = logged_steps(run)
    assert first and first == list(range(1, len(first) + 1)), first
    assert len(first) < steps, f"the signal came too late to interrupt the run: {first}"
    # The requeued run starts right after the preemption checkpoint: no step repeated, none lost.
    assert second == list(range(first[-1] + 1, steps + 1)), (first, second)
    assert latest_step(run) == steps


# ---------------------------------------------------------------------------------------------- finetune
@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised backbone in pretrain's export format (what finetune.train loads)."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from models.sizes import build_model
    from pretrain.checkpoint import BACKBONE, MODEL_CONFIG

    folder = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    model = build_model("tiny")
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(folder / BACKBONE))
    (folder / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config)))
    return folder


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_finetune_array_trains_one_adapter_per_task(slurm: SlurmCluster, shard_dir: Path, backbone: Path,
                                                    tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# contrast pattern\ncine ktRadial\n\ncine Uniform  # second task\n")
    bank, runs = tmp_path / "adapters", tmp_path / "runs"
    sets = {"data.shards": shard_dir, "run.steps": 2, "run.tensorboard": "false", "run.progress": "false"}
    job = slurm.submit(REPO / "launch/finetune.sbatch", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
                       env=job_env(CMRFM_CONFIG="configs/finetune_tiny.toml", CMRFM_PAIRS=str(pairs),
                                   CMRFM_BACKBONE=str(backbone), CMRFM_ADAPTERS=str(bank), CMRFM_RUN_DIR=str(runs)),
                       sbatch_args=("--array=0-1", "--cpus-per-task=1"))
    tasks = slurm.wait_all(job, JOB_DEADLINE_S)
    assert sorted(t.fields["ArrayTaskId"] for t in tasks) == ["0", "1"]
    for task in tasks:
        assert (task.state, task.exit_code) == ("COMPLETED", "0:0"), slurm.describe(task.job_id)
    # hidden `.<entry>.lock` files beside each entry: the per-entry write locks (launch.outputs.FolderLock)
    assert sorted(p.name for p in bank.iterdir() if not p.name.startswith(".")) == ["cine_Uniform", "cine_ktRadial"]
    assert not [p for p in bank.iterdir() if ".partial-" in p.name]      # no staging folder left behind
    for name in ("cine_Uniform", "cine_ktRadial"):
        assert (bank / name / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((bank / name / "adapter_config.json").read_text())
        assert (runs / name).is_dir()  # each task its own run folder (resumable state never shared)


@pytest.mark.slurm
@pytest.mark.distributed
def test_finetune_array_rejects_a_task_without_a_pair(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = slurm.submit(REPO / "launch/finetune.sbatch", env=job_env(CMRFM_PAIRS="cine:ktRadial"),
                       sbatch_args=("--array=1", "--cpus-per-task=1"))
    state = slurm.wait(job, JOB_DEADLINE_S)
    log = slurm.output(state.job_id).read_text()
    assert (state.state, state.exit_code) == ("FAILED", "2:0"), slurm.describe(job)
    assert "array task 1: cine:ktRadial lists only 1 pairs (submit with --array=0-0)" in log, log


# ---------------------------------------------------------------------------------------------- reconstruct
@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_reconstruct_sbatch_two_nodes_writes_the_one_process_tree(slurm: SlurmCluster, synthetic_root: Path,
                                                                  backbone: Path, tmp_path: Path) -> None:
    inp = synthetic_root / "ChallengeData_ValSet"
    one, out = tmp_path / "one", tmp_path / "recon"
    sets = ["--set", f"input={inp}", "--set", f"backbone={backbone}", "--set", "progress=false"]
    subprocess.run([sys.executable, "-m", "finetune.reconstruct", *sets, "--set", f"out={one}"], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    job = slurm.submit(REPO / "launch/reconstruct.sbatch",
                       env=job_env(CMRFM_INPUT=str(inp), CMRFM_OUT=str(out), CMRFM_BACKBONE=str(backbone),
                                   CMRFM_DEVICE="cpu"),
                       sbatch_args=("-N2", "--ntasks-per-node=1", "--gpus-per-task=1", "--cpus-per-task=1"))
    state = slurm.wait(job, JOB_DEADLINE_S)
    log = slurm.output(job).read_text(errors="replace")
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), slurm.describe(job)
    assert "2 reconstruction ranks on node[1-2]" in log, log
    for rank in (0, 1):
        assert re.search(rf"^{rank}: \[reconstruct rank {rank}/2\] \d+ files", log, re.M), log

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.mat"))}

    assert files(out) == files(one) and len(files(one)) >= 4
    report = json.loads((out / "reconstruct_report.json").read_text())
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and report["written"] == len(files(one))


# ---------------------------------------------------------------------------------------------- scheduling
@pytest.mark.slurm
@pytest.mark.distributed
def test_unschedulable_job_is_cancelled_at_the_deadline_with_slurms_reason(slurm: SlurmCluster) -> None:
    job = slurm.submit(REPO / "launch/pretrain.sbatch", env=job_env(),
                       sbatch_args=("-N3", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"))
    started = time.monotonic()
    with pytest.raises(JobDeadline) as caught:
        slurm.wait(job, deadline_s=3)
    assert 3 <= time.monotonic() - started < 20
    assert caught.value.state.state == "PENDING"
    assert caught.value.state.reason == "PartitionNodeLimit"
    assert "Reason=PartitionNodeLimit" in str(caught.value)
    assert slurm.job(job).state == "CANCELLED"  # the deadline cancelled it: nothing waits in the queue


# ---------------------------------------------------------------------------------------------- hostfile
@pytest.mark.slurm
@pytest.mark.distributed
def test_hostfile_inside_a_two_node_allocation(slurm: SlurmCluster, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    script = tmp_path / "hostfile.sbatch"
    script.write_text(f"#!/bin/bash\nexec {venv_dir()}/bin/python -m launch.hostfile --output {hostfile}\n")
    job = slurm.submit(script, env=job_env(), sbatch_args=("-N2", "--ntasks-per-node=1", "--gpus-per-node=2"))
    state = slurm.wait(job, JOB_DEADLINE_S)
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), slurm.describe(job)
    assert hostfile.read_text() == "node1 slots=2\nnode2 slots=2\n"


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.parametrize("nodelist", ["node[1-3,7],gpu[01-02]", "rack[1-2]-n[08-10]", "a,b[1-2]", "n[098-101]"])
def test_expand_nodelist_agrees_with_scontrol(slurm: SlurmCluster, nodelist: str) -> None:
    from launch.hostfile import expand_nodelist

    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=slurm.env, capture_output=True,
                          text=True, timeout=10, check=True)
    assert expand_nodelist(nodelist) == proc.stdout.split()


# ---------------------------------------------------------------------------------------------- accelerate
PROBE = """\
import os
from accelerate import Accelerator
acc = Accelerator(cpu=True)  # what finetune.train does for run.device = "cpu"
# one write(2) per line: the ranks share the launcher's stdout
os.write(1, f"rank {acc.process_index} world {acc.num_processes} type {acc.distributed_type.value}\\n".encode())
"""


def test_accelerate_configs_are_valid_for_this_accelerate() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu": (1, 2, "no"), "multigpu": (1, 8, "bf16"), "multinode": (2, 16, "bf16")}
    for name, (machines, processes, precision) in expected.items():
        cfg = load_config_from_file(str(REPO / f"launch/accelerate_{name}.yaml"))  # unknown keys raise
        assert (cfg.num_machines, cfg.num_processes, cfg.mixed_precision) == (machines, processes, precision), name
        assert cfg.distributed_type.value == "MULTI_GPU", name


@pytest.mark.distributed
def test_accelerate_cpu_config_starts_two_gloo_ranks(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "launch/accelerate_cpu.yaml"),
                           str(probe)], env=_plain_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(re.findall(r"rank \d world \d type \w+", proc.stdout))
    assert lines == ["rank 0 world 2 type MULTI_CPU", "rank 1 world 2 type MULTI_CPU"], proc.stdout + proc.stderr[-3000:]


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_multinode_config_under_srun(slurm: SlurmCluster, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    script = tmp_path / "accelerate.sbatch"
    script.write_text(f"""#!/bin/bash
export PATH={venv_dir()}/bin:$PATH
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
srun --ntasks-per-node=1 bash -c 'accelerate launch --config_file {REPO}/launch/accelerate_multinode.yaml \\
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$SLURM_NNODES" \\
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --mixed_precision no {probe}'
""")
    job = slurm.submit(script, env=job_env(),
                       sbatch_args=("-N2", "--ntasks-per-node=1", "--cpus-per-task=1"))
    state = slurm.wait(job, JOB_DEADLINE_S)
    log = slurm.output(job).read_text(errors="replace")
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), slurm.describe(job)
    ranks = sorted(re.findall(r"rank \d world \d type \w+", log))
    assert ranks == ["rank 0 world 2 type MULTI_CPU", "rank 1 world 2 type MULTI_CPU"], log


def _plain_env() -> dict[str, str]:
    """This process's environment without launcher variables (pytest itself might run under SLURM)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_"))}

