"""The archive the organisers accept (`Submission.zip`), checked before it is written, and read back.

Layout (CMRxRecon2025 `Submission/Readme.md`, `Format_TaskR1.txt`, `Format_TaskR2.txt`; docs/cmrxrecon.md
§6.4): the zip holds, from its root,

    <Task>/MultiCoil/<Modality>/ValidationSet/UnderSample_<Task>/<Center>/<Vendor>/P###/<file>_kus_<Pattern><R>.mat

one file per input kus file, same name, holding one variable `img4ranking`, single precision, MAT v5/v7
(a v7.3 file is read by the validation scorer through h5py without transposing and fails its shape
check). The validation scorer unpacks the archive and scores the first folder that holds a Task folder;
any reconstruction without a ground-truth file stops it ("Extra file submitted").

`plan_archive` checks a reconstruction tree (every expected file present when the input tree is
given, nothing extra, each file's format) without writing anything; `write_archive` packs a plan
that has no problem (temporary name, fsync, rename; never over an existing archive);
`extract_archive` unpacks an archive safely and returns the folder the scorers would score.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import scipy.io

from challenge.submission import IMG4RANKING_KEY, SubmissionError, mat_version, parse_kus_path
from launch.trees import find_files

ARCHIVE_NAME = "Submission.zip"
TASKS = ("TaskR1", "TaskR2", "TaskS1", "TaskS2")


@dataclass
class ArchivePlan:
    """What would go into the archive, and every reason it must not be written."""

    tree: Path
    files: list[tuple[str, Path]] = field(default_factory=list)  # (name in the zip, file)
    problems: list[str] = field(default_factory=list)  # each names a file
    left_out: list[Path] = field(default_factory=list)  # outside the task folders (reports, configs)
    counts: Counter = field(default_factory=Counter)  # (task, modality) -> files

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.files)


def check_img4ranking_file(path: Path) -> list[str]:
    """Problems of one submission file: MAT v5/v7, exactly one variable `img4ranking`, single, >= 2-D."""
    try:
        version = mat_version(path)
    except SubmissionError as exc:
        return [str(exc)]
    if version != "v5":
        return [f"{path}: MAT {version} file; the validation scorer reads it through h5py without transposing "
                "and drops it as a shape mismatch: save MAT v5/v7 (challenge.submission.save_img4ranking)"]
    try:
        variables = scipy.io.whosmat(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file, named
        return [f"{path}: not a readable MAT file ({exc})"]
    names = [name for name, _, _ in variables]
    if names != [IMG4RANKING_KEY]:
        return [f"{path}: holds {names}; exactly one variable {IMG4RANKING_KEY!r} is expected"]
    _, shape, cls = variables[0]
    problems = []
    if cls != "single":
        problems.append(f"{path}: {IMG4RANKING_KEY} is {cls}, single precision (float32) is expected")
    if len(shape) < 2:
        problems.append(f"{path}: {IMG4RANKING_KEY} has shape {shape}, at least 2-D is expected")
    return problems


def _task_root(tree: Path) -> Path:
    """The folder holding the Task folders: `tree` itself or, as the scorer searches, the first below it."""
    if any((tree / t).is_dir() for t in TASKS):
        return tree
    for dirpath, dirnames, _ in sorted(os.walk(tree)):
        if any(t in dirnames for t in TASKS):
            return Path(dirpath)
    return tree


def plan_archive(tree: str | os.PathLike, inputs: str | os.PathLike | None = None) -> ArchivePlan:
    """Check the reconstruction `tree` against the input tree `inputs` (UnderSample_<Task> kus files).

    Without `inputs` nothing can be missing, and extra files cannot be told apart: the plan then has
    a problem saying so only if the tree holds no task folder.
    """
    tree = Path(tree)
    plan = ArchivePlan(tree)
    if not tree.is_dir():
        plan.problems.append(f"{tree}: reconstruction folder does not exist")
        return plan
    root = _task_root(tree)
    expected: dict[str, Path] = {}
    if inputs is not None:
        in_root = _task_root(Path(inputs))
        kus, unwalked = find_files(inputs, "*_kus_*.mat")   # symlinked folders followed
        plan.problems += [f"{entry} (input tree)" for entry in unwalked]
        for p in kus:
            try:
                parse_kus_path(p)
            except SubmissionError:
                continue
            expected[p.relative_to(in_root).as_posix()] = p
        if not expected:
            plan.problems.append(f"{inputs}: no input kus files in the challenge layout")
    found: set[str] = set()
    files, unwalked = find_files(tree)                        # symlinked folders followed, none skipped silently
    plan.problems += [f"{entry} (reconstruction tree)" for entry in unwalked]
    for p in files:
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else ""
        if not rel or rel.split("/")[0] not in TASKS:
            plan.left_out.append(p)
            continue
        try:
            case = parse_kus_path(p)
        except SubmissionError as exc:
            plan.problems.append(f"{exc} (extra file in the submission tree)")
            continue
        if expected and rel not in expected:
            plan.problems.append(f"{p}: no input file {rel} (extra file: the validation scorer stops on it)")
            continue
        found.add(rel)
        plan.problems += check_img4ranking_file(p)
        plan.files.append((rel, p))
        plan.counts[(case.task, case.modality)] += 1
    for rel, p in sorted(expected.items()):
        if rel not in found:
            plan.problems.append(f"{tree / rel}: missing (input {p})")
    if not plan.files:
        plan.problems.append(f"{tree}: no reconstruction files <Task>/MultiCoil/.../<file>_kus_<Pattern><R>.mat")
    return plan


def write_archive(plan: ArchivePlan, out: str | os.PathLike) -> Path:
    """Pack a plan without problems into `out` (a temporary name, fsync, rename; never over a file)."""
    out = Path(out)
    if plan.problems:
        raise SubmissionError(out, f"not written: {len(plan.problems)} problem(s), first: {plan.problems[0]}")
    if out.exists():
        raise SubmissionError(out, "exists already; remove it or choose another name (never replaced)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for name, path in plan.files:
                    z.write(path, name)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: nothing is replaced
        except FileExistsError:
            raise SubmissionError(out, "appeared while packing; not replaced") from None
        except OSError:  # a filesystem without hard links: rename, after checking again
            if out.exists():
                raise SubmissionError(out, "appeared while packing; not replaced") from None
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack `archive` into `dest` (refusing absolute or `..` member names) and return the scored root."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                parts = Path(name).parts
                if name.startswith(("/", "\\")) or ".." in parts:
                    raise SubmissionError(archive, f"member {name!r} would be written outside the folder")
            z.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise SubmissionError(archive, f"not a zip archive ({exc})") from None
    root = _task_root(dest)
    if not any((root / t).is_dir() for t in TASKS):
        raise SubmissionError(archive, "no TaskR1/TaskR2/TaskS1/TaskS2 folder inside (the scorer stops)")
    return root
