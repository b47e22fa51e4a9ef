"""DeepSpeed hostfile from a SLURM allocation: one `host slots=N` line per node, N = GPUs per node.

For users who start DeepSpeed's own multi-node runner inside an allocation instead of
`launch/pretrain.sbatch` (which uses srun and needs no hostfile)::

    python -m launch.hostfile --output "$RUN_DIR/hostfile"        # inside salloc/sbatch
    deepspeed --hostfile "$RUN_DIR/hostfile" --no_ssh_check pretrain/run.py --config ...

Hosts come from `scontrol show hostnames "$SLURM_JOB_NODELIST"` when scontrol exists, else from the
pure-Python `expand_nodelist` (same grammar: `node[1-3,7],gpu[01-02]`, zero padding kept, several
bracket groups per name). Slots come from `--slots`, else SLURM_GPUS_ON_NODE, else
SLURM_GPUS_PER_NODE (`8`, `gpu:8` or `gpu:a100:8`). The file is written under a temporary name and
renamed, so a reader never sees half a hostfile.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nodelist {text!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"nodelist {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"nodelist {text!r}: '[' without ']'")
    parts.append("".join(current))
    return parts


def _expand_ranges(spec: str, whole: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]; the width of the lower bound is kept ("08-10" -> 08, 09, 10)."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m:
            raise ValueError(f"nodelist {whole!r}: bad range {item!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"nodelist {whole!r}: range {item!r} goes backwards")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression into host names, in order.

    "node[1-3,7],gpu[01-02]" -> ["node1", "node2", "node3", "node7", "gpu01", "gpu02"];
    "rack[1-2]-n[1-2]" -> ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"] (what scontrol prints);
    like scontrol, a name may not go on after its last bracket group ("n[1-2]-a" is an error).
    Raises ValueError naming the expression on bad syntax.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        part = part.strip()
        if not part:
            raise ValueError(f"nodelist {nodelist!r}: empty host name")
        pieces = re.split(r"\[([^\]]*)\]", part)  # literal, ranges, literal, ranges, ..., literal
        if len(pieces) > 1 and pieces[-1]:
            raise ValueError(f"nodelist {nodelist!r}: text after the last ']' in {part!r} (SLURM allows none)")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def hostnames(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Hosts of `nodelist`: `scontrol show hostnames` inside a SLURM installation (the reference), else `expand_nodelist`.

    scontrol is asked only when its slurm.conf exists ($SLURM_CONF, set in every job, else
    /etc/slurm/slurm.conf): without one it goes looking for the controller in DNS.
    """
    env = os.environ if env is None else env
    configured = Path(env.get("SLURM_CONF") or "/etc/slurm/slurm.conf").is_file()
    if configured and shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=30, env=dict(env))
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()
    return expand_nodelist(nodelist)


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs per node from SLURM_GPUS_ON_NODE or SLURM_GPUS_PER_NODE ("8", "gpu:8", "gpu:a100:8"); None if unset."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(name, "").strip()
        if value:
            m = re.fullmatch(r"(?:[\w.-]+:)*(\d+)", value.split(",")[0])
            if not m:
                raise ValueError(f"environment variable {name}={value!r}: cannot read a GPU count from it")
            return int(m.group(1))
    return None


def render(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile text: "node1 slots=8\\nnode2 slots=8\\n"."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def write_hostfile(path: str | os.PathLike, hosts: list[str], slots: int) -> Path:
    """Write the hostfile atomically (temporary name in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(hosts, slots))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"),
                        help="SLURM hostlist (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--slots", type=int, default=None,
                        help="GPUs per node (default: $SLURM_GPUS_ON_NODE, then $SLURM_GPUS_PER_NODE)")
    parser.add_argument("--output", default=None, help="hostfile path (default: print to stdout)")
    args = parser.parse_args(argv)
    if not args.nodelist:
        parser.error("no --nodelist and SLURM_JOB_NODELIST is not set (run inside an allocation)")
    try:
        slots = args.slots if args.slots is not None else gpus_per_node(os.environ)
        if slots is None:
            parser.error("no --slots and neither SLURM_GPUS_ON_NODE nor SLURM_GPUS_PER_NODE is set")
        hosts = hostnames(args.nodelist)
        if args.output:
            write_hostfile(args.output, hosts, slots)
        else:
            sys.stdout.write(render(hosts, slots))
    except ValueError as exc:
        parser.exit(2, f"hostfile: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
