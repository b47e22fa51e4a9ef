"""Reconstruction on several processes: which inputs each rank takes, what is already done, one report.

    torchrun --nproc_per_node 8 -m finetune.reconstruct --set input=TREE --set out=DIR --set device=cuda
    srun python -m finetune.reconstruct ...                      (launch/reconstruct.sbatch)

Every rank lists the same inputs (sorted), drops those a previous run of the same configuration
finished, and takes its share of the rest: largest file first, each to the rank with the fewest
bytes so far (ties to the lower rank), so the split is deterministic and balanced by size. A file
is reconstructed by exactly one rank, with the same code and the same batches as on one process,
so the output tree does not depend on the number of ranks.

Staging and resume (launch.outputs' rules: nothing half-written is ever visible, a rerun leaves no
output it did not write). Rank 0 locks `out` and prepares a staging folder beside it named after the
run's fingerprint, `.<out name>.resume-<fingerprint>` (the configuration fields that change outputs,
and the backbone and adapter files' sizes and times); every rank writes its outputs there; when all
are done rank 0 writes the report and swaps the folder in for `out` in one step. A killed run leaves
`out` untouched and its staging folder in place; a rerun of the same configuration finds it and
resumes. Stagings of other configurations are removed (provably ours, and never to be resumed).

Progress journal. After a rank has written an output it appends one JSON line (the file's
outcome, the input file's size and time) to its own file in `<staging>/.journal/` and fsyncs it. An
input counts as done when its line is there, its output exists and the input file is unchanged; any
other output found in the staging folder is removed before its input is redone. A line cut by a
kill does not parse and its input is simply redone. The journal is removed before the swap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as tdist

from launch.outputs import FolderLock, OutputError, publish_dir, remove_stale_staging

JOURNAL = ".journal"


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
    """The progress journal inside a staging folder (module doc)."""

    def __init__(self, stage: str | os.PathLike, rank: int, world: int) -> None:
        self.folder = Path(stage) / JOURNAL
        self.file = self.folder / f"rank{rank}-of-{world}.jsonl"

    def done(self) -> dict[str, dict[str, Any]]:
        """input path -> outcome of every journalled input whose file has not changed since."""
        out: dict[str, dict[str, Any]] = {}
        if not self.folder.is_dir():
            return out
        for f in sorted(self.folder.glob("rank*-of-*.jsonl")):
            for line in f.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    path = entry["outcome"]["path"]
                except (ValueError, KeyError, TypeError):
                    continue                      # a line cut by a kill: that input is redone
                if entry.get("input") == _stat(path):
                    out[path] = entry["outcome"]
        return out

    def record(self, outcome: dict[str, Any]) -> None:
        """Append one finished input (its output already written), durably."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as f:
            f.write(json.dumps({"input": _stat(outcome["path"]), "outcome": outcome}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Drop the journal (only our own rank*.jsonl files; the folder if then empty)."""
        if not self.folder.is_dir():
            return
        for f in self.folder.glob("rank*-of-*.jsonl"):
            f.unlink()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def _from_rank0(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def shared_stage(final: str | os.PathLike, marker: str, fp: str, rank: int, world: int) -> Iterator[Path]:
    """The staging folder every rank writes into; swapped in for `final` by rank 0 when the block
    ends on every rank. Kept when the block raises, for a rerun of the same configuration."""
    final = Path(final)
    stage = final.parent / f".{final.name}.resume-{fp}"
    lock, problem = None, None
    if rank == 0:
        try:
            lock = FolderLock(final).acquire()
            if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / marker).is_file())):
                raise OutputError(f"out {final} exists and is not an output of this stage (no {marker}): refusing "
                                  f"to replace it; choose a new folder or remove it yourself")
            remove_stale_staging(final)
            for other in final.parent.glob(f".{final.name}.resume-*"):
                if other != stage and other.is_dir():
                    shutil.rmtree(other)          # another configuration's staging: never resumed
            stage.mkdir(parents=True, exist_ok=True)
        except (OutputError, OSError) as exc:
            problem = str(exc)
    problem = _from_rank0(problem, world)
    try:
        if problem:
            raise OutputError(problem)
        yield stage
        if world > 1:
            tdist.barrier()
        if rank == 0:
            Journal(stage, 0, 1).remove()
            publish_dir(stage, final)
        if world > 1:
            tdist.barrier()
    finally:
        if lock is not None:
            lock.release()
