"""Walking an input tree the way a user lays one out: symlinked folders included, nothing skipped silently.

`Path.rglob` (Python < 3.13) does not descend into symlinked folders, so a corpus assembled with
`ln -s /data/Center005 ...` lost those files without a word. `find_files` follows every symlinked
folder once (a link back up the tree is a loop: reported, not followed) and lists every entry it could
not use (a broken link, an unreadable folder) in `skipped`, for the stage's report (docs/design.md §4).

Stdlib only, so every stage may import it (tests/test_layering.py).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path


def find_files(root: str | os.PathLike, pattern: str = "*") -> tuple[list[Path], list[str]]:
    """(files under `root` whose name matches `pattern`, sorted; problems met, one line each).

    Paths are returned as seen from `root` (through the links), so their parts still describe the
    layout (`.../UnderSample_TaskR1/...`). A folder reached twice through links is walked once.
    """
    root = Path(root)
    files: list[Path] = []
    skipped: list[str] = []
    seen: set[tuple[int, int]] = set()

    def onerror(exc: OSError) -> None:
        skipped.append(f"{exc.filename}: unreadable folder ({exc.strerror})")

    for folder, dirs, names in os.walk(root, followlinks=True, onerror=onerror):
        try:
            st = os.stat(folder)
        except OSError as exc:
            skipped.append(f"{folder}: {exc.strerror}")
            dirs[:] = []
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            skipped.append(f"{folder}: a symlink loop or a folder linked twice (walked once, here skipped)")
            dirs[:] = []
            continue
        seen.add(ident)
        dirs.sort()
        for name in dirs + names:
            p = Path(folder, name)
            if p.is_symlink() and not p.exists() and (fnmatch.fnmatchcase(name, pattern) or "." not in name):
                skipped.append(f"{p}: broken symlink (to {os.readlink(p)})")
        for name in names:
            p = Path(folder, name)
            if fnmatch.fnmatchcase(name, pattern) and p.is_file():
                files.append(p)
    return sorted(files), skipped
