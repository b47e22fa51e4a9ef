"""Writing outputs so that nothing is lost and nothing half-written is ever visible.

Every stage writes through these few helpers (docs/design.md §4):

- `write_atomic(path, data)`: a file appears whole or not at all: temporary name in the same folder,
  fsync of the file, `os.replace`, fsync of the folder (a rename is durable only once its directory is).
- `publish_dir(staging, final)`: a folder of several files that belong together (an adapter's config
  + weights, a reconstruction tree) is written under a staging name and swapped in with one rename;
  an existing `final` is exchanged atomically (Linux `renameat2(RENAME_EXCHANGE)`) and then removed.
- `replaced_tree(final, marker)`: the two above for a whole output tree: write it under a staging name,
  swap it in, so a re-run leaves no output it did not write this time.
- `FolderLock(path)`: one process owns an output folder (`fcntl.flock` on `<parent>/.<name>.lock`);
  a second writer fails at once with the owner's pid instead of interleaving files.
- `check_separate(input, outputs)`: refuse an output that is, contains or lies inside the input (after
  resolving symlinks, `..` and trailing slashes): a reconstruction must never replace its own input.

Stdlib only, so every stage may import it (tests/test_layering.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

#: exit status of an entry point that finished but skipped inputs (each named in its report); 0 means
#: every input was written, 2 a usage error (bad config or paths) before any work.
EXIT_SKIPPED = 3
EXIT_USAGE = 2

_RENAME_EXCHANGE = 2


class OutputError(ValueError):
    """An output location that cannot be used safely; the message names the path and the reason."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `path` whole or not at all: bytes, text, or `data(tmp_path)` writing the temporary file.

    On any error (a full disk included) the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under `root` (before it is published by a rename).

    A file that vanishes during the walk is another writer's temporary file, renamed meanwhile (ranks
    write one checkpoint folder together): its writer fsyncs it, and the rename is caught by the
    folder's fsync.
    """
    for folder, dirs, files in os.walk(root):
        for name in files:
            try:
                fsync_file(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        fsync_dir(folder)


def staging_path(final: str | os.PathLike, kind: str = "partial") -> Path:
    """`<parent>/.<name>.<kind>-<pid>`: a hidden sibling on the same filesystem (so a rename is atomic)."""
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):   # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make the fully written folder `staging` appear as `final` in one step.

    Its files are fsynced first. An existing `final` is exchanged with `staging` atomically, so a reader
    sees the old folder or the new one, never a mix or nothing; the old one is then removed.
    """
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    if final.exists() or final.is_symlink():
        if not _exchange(staging, final):   # fallback: two renames, a short window without `final`
            old = staging_path(final, "old")
            os.replace(final, old)
            os.replace(staging, final)
            staging = old
        fsync_dir(final.parent)
        shutil.rmtree(staging)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def remove_stale_staging(final: str | os.PathLike, kinds: Iterable[str] = ("partial", "old")) -> list[Path]:
    """Delete `.<name>.<kind>-<pid>` siblings of `final` left by a killed writer.

    Call only while holding `FolderLock(final)`: then no live process is writing them.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if any(p.name.startswith(f".{final.name}.{k}-") for k in kinds):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


class FolderLock:
    """Exclusive ownership of output folder `path` for the life of the process (or the `with` block).

    The lock file `<parent>/.<name>.lock` sits beside the folder, so the folder itself can be swapped.
    A second owner gets an OutputError naming the holder's pid at once (no waiting, no interleaving).
    The kernel drops the lock when the process dies, however it dies.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        self.file = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{self.path}: another process (pid {holder}) is writing this folder "
                              f"(lock {self.file}); wait for it or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_separate(input_root: str | os.PathLike, outputs: Iterable[str | os.PathLike], what: str = "input") -> None:
    """Refuse any output equal to, inside, or containing `input_root` (symlinks, `..`, slashes resolved)."""
    src = Path(input_root).resolve()
    for out in outputs:
        dst = Path(out).resolve()
        if _is_within(dst, src):
            raise OutputError(f"out {out} ({dst}) is inside the {what} {input_root} ({src}): writing there would "
                              f"mix or replace the {what} files; choose a folder outside it")
        if _is_within(src, dst):
            raise OutputError(f"out {out} ({dst}) contains the {what} {input_root} ({src}): replacing it would "
                              f"destroy the {what}; choose a folder outside it")


def sibling(path: str | os.PathLike, suffix: str) -> Path:
    """`<resolved path><suffix>` beside `path` ("rs/" + "_zero_filled" -> "<abs>/rs_zero_filled", never
    "rs/_zero_filled" inside the tree)."""
    p = Path(path).resolve()
    return p.parent / f"{p.name}{suffix}"


@contextmanager
def replaced_tree(final: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Write a whole output tree and swap it in for `final` when the block succeeds.

    Yields an empty staging folder beside `final`; the block writes everything there, including the
    file named `marker` (its report), which identifies the tree as this stage's output. A re-run thus
    leaves no file it did not write this time: stale outputs of a previous run never survive. `final`
    is locked for the duration; leftovers of a killed writer are removed first; an existing `final`
    that is neither empty nor carries `marker` is refused (it is not ours to replace). If the block
    raises, the staging folder is removed and `final` is untouched.
    """
    final = Path(final)
    with FolderLock(final):
        if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / marker).is_file())):
            raise OutputError(f"out {final} exists and is not an output of this stage (no {marker}): refusing to "
                              f"replace it; choose a new folder or remove it yourself")
        remove_stale_staging(final)
        staging = staging_path(final)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish_dir(staging, final)


@contextmanager
def work_folder(path: str | os.PathLike | None, prefix: str = "cmrfm-") -> Iterator[Path]:
    """The folder a benchmark works in: `path` (created, kept afterwards, so a rerun can reuse what it
    holds) or, when `path` is empty, a temporary folder removed at the end."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
