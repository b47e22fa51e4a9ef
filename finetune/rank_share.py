"""Reconstruction on several processes: which inputs each rank takes, what is already done, one report.

    torchrun --nproc_per_node 8 -m finetune.reconstruct --set input=TREE --set out=DIR --set device=cuda
    srun python -m finetune.reconstruct ...                      (launch/reconstruct.sbatch)

Every rank lists the same inputs (sorted), drops those a previous run of the same configuration
finished, and takes its share of the rest: largest file first, each to the rank with the fewest
bytes so far (ties to the lower rank), so the split is deterministic and balanced by size. A file
is reconstructed by exactly one rank, with the same code and the same batches as on one process,
so the output tree does not depend on the number of ranks.

Progress journal. After a rank has renamed an output into place it appends one JSON line (the
file's outcome, the input file's size and time, and the run's fingerprint) to its own file in
`<out parent>/.<out name>.journal/` and fsyncs it. A rerun with the same fingerprint (the
configuration fields that change outputs, and the backbone and adapter files' sizes and times)
treats a journalled input whose output exists and whose file is unchanged as done: a rank that died
leaves its finished files and the journal lines for them; the rerun does the rest. A line cut by a kill does not parse and its input is simply redone. When every input was
written, rank 0 removes the journal (a folder of this tool's own name, holding only its files); when
some failed it stays, so that a rerun redoes only those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

JOURNAL_SUFFIX = ".journal"


def share(paths: list[Path], rank: int, world: int) -> list[Path]:
    """Rank `rank`'s inputs, in input order (greedy largest-first by bytes; see the module doc)."""
    load = [0] * world
    owner: dict[Path, int] = {}
    for p in sorted(paths, key=lambda q: (-q.stat().st_size, str(q))):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[p] = r
        load[r] += p.stat().st_size
    return [p for p in paths if owner[p] == rank]


def _stat(path: str) -> list[Any]:
    """(name, size, mtime_ns) of a file, or of every file below a folder; [] when absent."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return [[str(q.relative_to(p) if p.is_dir() else q.name), q.stat().st_size, q.stat().st_mtime_ns] for q in files]


def fingerprint(settings: dict[str, Any], backbone: str, adapters: str) -> str:
    """What a resumed run must share with the interrupted one: output-changing settings and weights."""
    blob = json.dumps({"settings": settings, "backbone": _stat(backbone), "adapters": _stat(adapters) if adapters else []},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Journal:
    """The progress journal of one output tree (module doc)."""

    def __init__(self, out: str | os.PathLike, fingerprint: str, rank: int, world: int) -> None:
        out = Path(out).resolve()
        self.folder = out.parent / f".{out.name}{JOURNAL_SUFFIX}"
        self.fingerprint = fingerprint
        self.file = self.folder / f"rank{rank}-of-{world}.jsonl"

    def done(self) -> dict[str, dict[str, Any]]:
        """input path -> outcome of every input journalled by a run with this fingerprint, whose input
        file has not changed since (size and modification time)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.folder.is_dir():
            return out
        for f in sorted(self.folder.glob("rank*-of-*.jsonl")):
            for line in f.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue                      # a line cut by a kill: that input is redone
                if isinstance(entry, dict) and entry.get("fingerprint") == self.fingerprint \
                        and entry.get("input") == _stat(entry["outcome"]["path"]):
                    out[entry["outcome"]["path"]] = entry["outcome"]
        return out

    def record(self, outcome: dict[str, Any]) -> None:
        """Append one finished input (its output already renamed into place), durably."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "input": _stat(outcome["path"]),
                                "outcome": outcome}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """The tree is complete: drop the journal (only our own rank*.jsonl files; the folder if then empty)."""
        if not self.folder.is_dir():
            return
        for f in self.folder.glob("rank*-of-*.jsonl"):
            f.unlink()
        if not any(self.folder.iterdir()):
            shutil.rmtree(self.folder)
