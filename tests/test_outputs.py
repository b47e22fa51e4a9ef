"""launch.outputs and launch.trees, the helpers every writer and reader goes through (docs/design.md §4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.outputs import (
    FolderLock, OutputError, check_separate, publish_dir, replaced_tree, sibling, staging_path, write_atomic,
)
from launch.trees import find_files

ROOT = Path(__file__).resolve().parents[1]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_atomic(target, "old")

    def half(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_publish_dir_swaps_a_whole_folder(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = staging_path(final)
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]                   # old one removed


def test_replaced_tree_refuses_a_folder_that_is_not_its_output(tmp_path: Path) -> None:
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not an output of this stage"):
        with replaced_tree(mine, "report.json") as stage:
            (stage / "report.json").write_text("{}")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("out", ["same", "slash", "dotdot", "inside", "parent", "link"])
def test_check_separate(tmp_path: Path, out: str) -> None:
    src = tmp_path / "data" / "in"
    src.mkdir(parents=True)
    (tmp_path / "ln").symlink_to(src)
    path = {"same": src, "slash": f"{src}/", "dotdot": src / ".." / "in", "inside": src / "x",
            "parent": tmp_path / "data", "link": tmp_path / "ln" / "y"}[out]
    with pytest.raises(OutputError):
        check_separate(src, [path])
    check_separate(src, [tmp_path / "data" / "in_out", tmp_path / "elsewhere"])      # siblings are fine
    assert sibling(f"{src}/", "_zero_filled") == src.parent / "in_zero_filled"


def test_a_lock_held_by_another_process_is_refused_and_released_when_it_dies(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    code = ("import sys, time; sys.path.insert(0, %r); from launch.outputs import FolderLock; "
            "FolderLock(%r).acquire(); print('held', flush=True); time.sleep(60)") % (str(ROOT), str(folder))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"pid {holder.pid}"):
        FolderLock(folder).acquire()
    holder.kill()
    holder.wait()
    FolderLock(folder).acquire().release()                                           # the kernel dropped it


def test_find_files_follows_links_once_and_reports_broken_ones(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "a.mat").write_text("")
    root = tmp_path / "root"
    root.mkdir()
    (root / "b.mat").write_text("")
    (root / "linked").symlink_to(real)
    (root / "again").symlink_to(real)                                                # the same folder twice
    (root / "loop").symlink_to(root)                                                 # a loop
    (root / "gone").symlink_to(tmp_path / "nothing")
    files, skipped = find_files(root, "*.mat")
    assert [p.relative_to(root).as_posix() for p in files] == ["again/sub/a.mat", "b.mat"] or \
        [p.relative_to(root).as_posix() for p in files] == ["b.mat", "linked/sub/a.mat"]
    assert any("gone: broken symlink" in s for s in skipped)
    assert sum("walked once" in s for s in skipped) == 2                             # the loop and the twin


def test_work_folder_keeps_a_named_folder_and_removes_a_temporary_one(tmp_path) -> None:
    from launch.outputs import work_folder

    named = tmp_path / "a" / "b"
    with work_folder(str(named)) as w:
        (w / "x").write_text("kept")
    assert (named / "x").read_text() == "kept"  # a rerun finds it
    with work_folder("", prefix="cmrfm-test-") as w:
        (w / "y").write_text("gone")
        temp = w
    assert temp.name.startswith("cmrfm-test-") and not temp.exists()
