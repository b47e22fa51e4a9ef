"""A real SLURM cluster on this one machine for the tests: munge, slurmctld and two slurmd "nodes".

Recipe and pitfalls: docs/slurm.md §5 (network-namespace variant). Each slurmd runs in its own
network, UTS and mount namespace, so the two nodes are real hosts to the jobs: `node1` (10.250.0.11)
and `node2` (10.250.0.12) on a private bridge `br-slurm` (10.250.0.1, the controller). No route
leaves the bridge: the only addresses ever contacted are the ones this module creates (the network
rule of docs/slurm.md). Everything is torn down by pid, and `SlurmCluster.leftovers()` says what
survived, so the fixture can assert that nothing did.

Why the choices (docs/slurm.md pitfall numbers in brackets):
- daemons run in the foreground (`-D`, `munged -F`) as our own children: the pid is the daemon, not a
  pid file that a failed second slurmd may delete, and `Popen.wait` reaps zombies [4, 10];
- slurmd starts through `nsenter --net` + `unshare --uts --mount`, never `ip netns exec`, which
  remounts /sys and breaks slurmd's cgroup plugin [1];
- job state is polled with `scontrol show job -o` under a deadline, never `sbatch --wait` [4, 6];
- every submission has `--chdir` and `--output` [11];
- two fake GPUs per node (gres files made with mknod, nothing opens them) and
  `SlurmdParameters=config_overrides`, so production headers (`--gpus-per-node`) are accepted [7];
- `AuthInfo=cred_expire=5`: a requeued job may only start again after the credential of its previous
  run expired (120 s by default, far too long for a test); 5 s is the least SLURM 22.05 accepts
  (a smaller value silently falls back to 120 s).

Only root can do this (namespaces, mknod, apt-get); the CI machine and the dev machines run as root.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES = ("node1", "node2")
NETNS = {"node1": "slurm-n1", "node2": "slurm-n2"}
BRIDGE = "br-slurm"
CONTROLLER_IP = "10.250.0.1"
NODE_IP = {"node1": "10.250.0.11", "node2": "10.250.0.12"}
GPUS_PER_NODE = 2  # fake gres devices per node
CPUS_PER_NODE = 2  # what each node advertises (config_overrides: the machine has 2 cores in total)
LOCK = Path("/run/cmrfm-slurm-fixture.lock")  # one cluster per machine: fixed names and ports
PIDS = Path("/run/cmrfm-slurm-fixture.pids")  # "pid starttime" of our daemons, for a crashed run's cleanup
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


class SlurmError(RuntimeError):
    """The cluster could not be started, or a SLURM command failed; the message carries its output."""


@dataclass(frozen=True)
class JobState:
    """One line of `scontrol show job -o`: the fields a test looks at, plus all of them in `fields`."""

    job_id: str
    state: str  # JobState, e.g. "COMPLETED", "PENDING"
    reason: str  # Reason, e.g. "None", "PartitionNodeLimit", "BeginTime"
    exit_code: str  # ExitCode "rc:signal", e.g. "0:0"
    restarts: int  # how many times the job was requeued
    fields: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def active(self) -> bool:
        """Still queued or running (not yet in a terminal state)."""
        return self.state in ACTIVE_STATES

    @classmethod
    def parse(cls, line: str) -> "JobState":
        # `-o` prints "Key=value" pairs separated by spaces; values we read contain no spaces.
        fields = dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))
        return cls(fields.get("JobId", "?"), fields.get("JobState", "?"), fields.get("Reason", "?"),
                   fields.get("ExitCode", "?"), int(fields.get("Restarts", "0") or 0), fields)


class JobDeadline(AssertionError):
    """A job was still active at its deadline; it has been cancelled. `state` is what SLURM reported then."""

    def __init__(self, state: JobState, deadline_s: float, log: str):
        self.state = state
        super().__init__(f"job {state.job_id} still {state.state} after {deadline_s:.0f} s "
                         f"(Reason={state.reason}); cancelled it\n{log}")


def venv_dir() -> Path:
    """The environment the jobs must use: $CMRFM_VENV, else the one running these tests (sys.prefix:
    a venv anywhere, a conda env), as the sbatch scripts default to the python on PATH."""
    return Path(os.environ.get("CMRFM_VENV") or sys.prefix)


def _run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float = 60,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} -> rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in ticks): tells a live process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie counts as gone (kill -0 lies) [4]


def _alive(pid: int) -> bool:
    return _start_time(pid) is not None


def ensure_packages() -> None:
    """Install Debian's SLURM, munge (and iproute2) when a binary is missing (docs/slurm.md §1: ~10 s cold)."""
    wanted = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge", "ip": "iproute2"}
    missing = sorted({pkg for binary, pkg in wanted.items() if not shutil.which(binary)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env, timeout=300)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=600)


class SlurmCluster:
    """munged + slurmctld + two slurmd in network namespaces, all children of this process.

    Usage: `cluster = SlurmCluster(tmpdir); cluster.start(); ...; cluster.stop()` (the pytest fixture
    does this); `submit`, `job`, `wait`, `output` are what tests use.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock_fd: int | None = None
        self._logs: list = []

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, deadline_s: float = 120) -> "SlurmCluster":
        """Install if needed, then bring up munge, the namespaces, slurmctld and both slurmd until idle."""
        if os.geteuid() != 0:
            raise SlurmError("the SLURM test cluster needs root (network namespaces, mknod, apt-get)")
        self._take_lock(deadline_s)
        _cleanup_crashed_run()
        ensure_packages()
        for d in ("state", "log", "run", "out", "dev", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._write_files()
        self._start_munge()
        self._make_namespaces()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in NODES:
            # Private /etc/hosts (node names resolve) and /etc/resolv.conf (a resolver on the node's own
            # loopback): no name lookup from a job can go to any address outside the namespaces.
            script = (f"hostname {node} && mount --bind {self.root / 'hosts'} /etc/hosts && "
                      f"{{ [ ! -e /etc/resolv.conf ] || mount --bind {self.root / 'resolv.conf'} /etc/resolv.conf; }} && "
                      f"exec slurmd -D -f {self.conf} -N {node}")
            self._spawn(f"slurmd-{node}", ["nsenter", f"--net=/run/netns/{NETNS[node]}", "unshare", "--uts",
                                           "--mount", "--propagation", "private", "sh", "-c", script])
        self._wait_idle(time.monotonic() + 30)
        return self

    def stop(self, deadline_s: float = 30) -> list[str]:
        """Cancel every job, stop every daemon we started, delete the namespaces; return `leftovers()`."""
        end = time.monotonic() + deadline_s
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            _run(["scancel", "--user=root"], env=self.env, check=False, timeout=10)
            while time.monotonic() < end - 15 and self._squeue():
                time.sleep(0.2)
        # slurmd first (their job steps die with a TERM), then the controller, then munge.
        for name in [f"slurmd-{n}" for n in NODES] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(1.0, end - time.monotonic() - 5))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for node in NODES:  # job processes (slurmstepd, srun, python) live in the node namespaces
            _kill_netns_pids(NETNS[node])
        _delete_network()
        for handle in self._logs:
            handle.close()
        PIDS.unlink(missing_ok=True)
        left = self.leftovers()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return left

    def leftovers(self) -> list[str]:
        """What of this cluster is still there: live daemons, namespaces, their processes, the bridge."""
        left = [f"{name} pid {p.pid}" for name, p in self.procs.items() if _alive(p.pid)]
        names = _run(["ip", "netns", "list"], check=False).stdout
        left += [f"netns {ns}" for ns in NETNS.values() if re.search(rf"^{ns}\b", names, re.M)]
        if _run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
            left.append(f"bridge {BRIDGE}")
        return left

    # ---- jobs --------------------------------------------------------------------------------
    def submit(self, script: str | os.PathLike, *args: str, env: dict[str, str] | None = None,
               sbatch_args: tuple[str, ...] | list[str] = ()) -> str:
        """`sbatch --parsable` `script` with `args` from the repo root; return the job id.

        `env` is added to the submitting environment (sbatch exports it to the job); `sbatch_args`
        override the script's #SBATCH header (e.g. ("-N2", "--ntasks-per-node=1")).
        """
        cmd = ["sbatch", "--parsable", f"--chdir={self.root / 'out'}",
               f"--output={self.root / 'out' / '%x-%j.out'}", *sbatch_args, str(script), *args]
        proc = _run(cmd, env={**self.env, **(env or {})}, timeout=30)
        return proc.stdout.strip().split(";")[0]

    def output(self, job_id: str) -> Path:
        """The job's output file (one per job id: array tasks have their own ids, see `array_outputs`)."""
        hits = sorted((self.root / "out").glob(f"*-{job_id}.out"))
        return hits[0] if hits else self.root / "out" / f"unknown-{job_id}.out"

    def jobs(self, job_id: str) -> list[JobState]:
        """`scontrol show job -o` for a job (one entry per array task)."""
        proc = _run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, timeout=10)
        return [JobState.parse(line) for line in proc.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> JobState:
        return self.jobs(job_id)[0]

    def wait(self, job_id: str, deadline_s: float, poll_s: float = 0.2) -> JobState:
        """Poll until the job (every task of an array) is no longer active; cancel it at the deadline.

        Returns the (first task's) final state; raises JobDeadline, after `scancel`, when time runs out.
        """
        return self.wait_all(job_id, deadline_s, poll_s)[0]

    def wait_all(self, job_id: str, deadline_s: float, poll_s: float = 0.2) -> list[JobState]:
        """Like `wait`, for a job array: the final state of every task."""
        end = time.monotonic() + deadline_s
        while True:
            states = self.jobs(job_id)
            if not any(s.active for s in states):
                return states
            if time.monotonic() > end:
                self.cancel(job_id)
                raise JobDeadline(next(s for s in states if s.active), deadline_s, self.describe(job_id))
            time.sleep(poll_s)

    def wait_for_output(self, job_id: str, pattern: str, deadline_s: float, poll_s: float = 0.1) -> re.Match:
        """Poll the job's output file until `pattern` (a regex, multiline) appears; fail with the log."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            path = self.output(job_id)
            match = re.search(pattern, path.read_text(errors="replace"), re.M) if path.exists() else None
            if match:
                return match
            if not any(s.active for s in self.jobs(job_id)):
                break
            time.sleep(poll_s)
        raise AssertionError(f"{pattern!r} never appeared in job {job_id}'s output\n{self.describe(job_id)}")

    def cancel(self, job_id: str, deadline_s: float = 15) -> JobState:
        """scancel and wait until SLURM has finished the job (so nothing of it runs on)."""
        _run(["scancel", str(job_id)], env=self.env, check=False, timeout=10)
        end = time.monotonic() + deadline_s
        states = self.jobs(job_id)
        while any(s.active for s in states) and time.monotonic() < end:
            time.sleep(0.2)
            states = self.jobs(job_id)
        return states[0]

    def signal(self, job_id: str, signame: str, batch_only: bool = True) -> None:
        """`scancel --signal=SIG [--batch]`: what `#SBATCH --signal=B:SIG@t` does before the time limit."""
        _run(["scancel", f"--signal={signame}", *(["--batch"] if batch_only else []), str(job_id)],
             env=self.env, timeout=10)

    def describe(self, job_id: str) -> str:
        """Job record + output + daemon log tails, for assertion messages."""
        parts = []
        try:
            parts += [f"scontrol: {s.fields}" for s in self.jobs(job_id)]
        except SlurmError as exc:
            parts.append(str(exc))
        for path in [*sorted((self.root / "out").glob(f"*-{job_id}*.out")), *sorted((self.root / "log").glob("*.log"))]:
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (tail) ---\n{text[-3000:]}")
        return "\n".join(parts)

    # ---- internals ---------------------------------------------------------------------------
    def _take_lock(self, deadline_s: float) -> None:
        self._lock_fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        end = time.monotonic() + deadline_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > end:
                    raise SlurmError(f"another test cluster holds {LOCK} for more than {deadline_s} s") from None
                time.sleep(0.5)

    def _write_files(self) -> None:
        r, ctl = self.root, socket.gethostname().split(".")[0]  # SlurmctldHost must be `hostname -s` [8]
        for i in range(GPUS_PER_NODE):
            dev = r / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o600 | 0o020000, os.makedev(195, i))  # char device, never opened
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={NODE_IP[n]} CPUs={CPUS_PER_NODE} RealMemory=4000 "
            f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""\
ClusterName=cmrfmtest
SlurmctldHost={ctl}({CONTROLLER_IP})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
GresTypes=gpu
{nodes}
PartitionName=debug Nodes={NODES[0][:-1]}[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(
            f"NodeName={NODES[0][:-1]}[1-{len(NODES)}] Name=gpu File={r}/dev/nvidia[0-{GPUS_PER_NODE - 1}]\n")
        (r / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (r / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n{CONTROLLER_IP} {ctl}\n"
                                 + "".join(f"{NODE_IP[n]} {n}\n" for n in NODES))

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "w")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        with PIDS.open("a") as f:
            f.write(f"{self.procs[name].pid} {_start_time(self.procs[name].pid)}\n")

    def _start_munge(self) -> None:
        if _run(["sh", "-c", "munge -n | unmunge"], check=False, timeout=10).returncode == 0:
            return  # a munged is already serving this machine: use it, and leave it running
        if not Path("/etc/munge/munge.key").exists():
            _run(["runuser", "-u", "munge", "--", "mungekey", "--create"])
        _run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"])
        self._spawn("munged", ["/usr/sbin/munged", "-F"], user="munge", group="munge")
        end = time.monotonic() + 10
        while _run(["sh", "-c", "munge -n | unmunge"], check=False, timeout=10).returncode != 0:
            if time.monotonic() > end or self.procs["munged"].poll() is not None:
                raise SlurmError("munged did not come up:\n" + (self.root / "log/munged.stderr").read_text())
            time.sleep(0.1)

    def _make_namespaces(self) -> None:
        cmds = [["ip", "link", "add", BRIDGE, "type", "bridge"],
                ["ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", BRIDGE],
                ["ip", "link", "set", BRIDGE, "up"]]
        for i, node in enumerate(NODES, start=1):
            ns = NETNS[node]
            cmds += [["ip", "netns", "add", ns],
                     ["ip", "link", "add", f"veth-h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns],
                     ["ip", "link", "set", f"veth-h{i}", "master", BRIDGE],
                     ["ip", "link", "set", f"veth-h{i}", "up"],
                     ["ip", "-n", ns, "addr", "add", f"{NODE_IP[node]}/24", "dev", "eth0"],
                     ["ip", "-n", ns, "link", "set", "eth0", "up"],
                     ["ip", "-n", ns, "link", "set", "lo", "up"]]
        for cmd in cmds:
            _run(cmd, timeout=10)

    def _wait_idle(self, end: float) -> None:
        while True:
            states = _run(["sinfo", "-h", "-o", "%t"], env=self.env, check=False, timeout=10).stdout.split()
            if states and all(s == "idle" for s in states):
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > end:
                logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                                 for p in sorted((self.root / "log").iterdir()))
                raise SlurmError(f"nodes not idle (sinfo: {states}, exited: {dead})\n{logs}")
            time.sleep(0.2)

    def _squeue(self) -> list[str]:
        return _run(["squeue", "-h", "-o", "%i"], env=self.env, check=False, timeout=10).stdout.split()


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process still inside one of our namespaces (leftover job steps)."""
    pids = _run(["ip", "netns", "pids", ns], check=False, timeout=10).stdout.split()
    for pid in map(int, pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while any(_alive(int(p)) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)


def _delete_network() -> None:
    _run(["ip", "link", "del", BRIDGE], check=False, timeout=10)  # takes the veth pairs with it
    for ns in NETNS.values():
        _run(["ip", "netns", "del", ns], check=False, timeout=10)


def _cleanup_crashed_run() -> None:
    """A killed pytest leaves its daemons and namespaces: stop exactly those (by recorded pid), then start clean."""
    if PIDS.exists():
        for line in PIDS.read_text().splitlines():
            pid, start = line.split()
            if _start_time(int(pid)) == start:  # same process, not a reused pid
                os.kill(int(pid), signal.SIGKILL)
        PIDS.unlink()
    for ns in NETNS.values():
        if Path(f"/run/netns/{ns}").exists():
            _kill_netns_pids(ns)
    _delete_network()
