"""Submission.zip: checked before it is written, packed in the organisers' layout, scored like the tree.

Expected layout from CMRxRecon2025 `Submission/Readme.md`:
`<Task>/MultiCoil/<Modality>/ValidationSet/UnderSample_<Task>/<Center>/<Vendor>/P###/<file>_kus_<P><R>.mat`
at the root of the zip, one `img4ranking` (single, MAT v5/v7) per input kus file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from challenge.archive import extract_archive, plan_archive
from challenge.submission import SubmissionError, save_img4ranking
from finetune import evaluate, submission

FILES = [  # (task, modality, center, vendor, patient, stem, pattern, R, img4ranking shape)
    ("TaskR1", "Cine", "Center001", "UIH_30T_umr780", "P001", "cine_sax", "Uniform", 8, (16, 18, 2, 3)),
    ("TaskR1", "Cine", "Center002", "Siemens_30T_Vida", "P002", "cine_lax", "ktRadial", 16, (15, 20, 1, 3)),
    ("TaskR1", "T1w", "Center002", "Siemens_30T_Vida", "P003", "T1w", "Uniform", 24, (16, 18)),
    ("TaskR2", "Mapping", "Center003", "GE_15T_Voyager", "P010", "T1map", "ktGaussian", 8, (14, 17, 2, 9)),
]


def _rel(task: str, mod: str, folder: str, center: str, vendor: str, patient: str, name: str) -> str:
    return f"{task}/MultiCoil/{mod}/ValidationSet/{folder}_{task}/{center}/{vendor}/{patient}/{name}"


def make_trees(tmp: Path) -> tuple[Path, Path, Path, list[str]]:
    """Input tree (kus placeholders), reconstruction tree, img4ranking ground truth; zip member names."""
    inputs, recon, gt = tmp / "input", tmp / "recon", tmp / "gt"
    rng = np.random.default_rng(0)
    names = []
    for task, mod, center, vendor, patient, stem, pattern, R, shape in FILES:
        kus = _rel(task, mod, "UnderSample", center, vendor, patient, f"{stem}_kus_{pattern}{R}.mat")
        (inputs / kus).parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(inputs / kus, {"kus": np.zeros((2, 2), np.complex64)})
        ref = (rng.gamma(2.0, 1.0, shape) * 50).astype(np.float32)
        save_img4ranking(gt / _rel(task, mod, "FullSample", center, vendor, patient, f"{stem}.mat"), ref)
        save_img4ranking(recon / kus, ref + rng.standard_normal(shape).astype(np.float32) * 3)
        names.append(kus)
    (recon / "reconstruct_report.json").write_text("{}")  # outside the task folders: left out
    return inputs, recon, gt, sorted(names)


def test_pack_check_and_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs, recon, gt, names = make_trees(tmp_path)
    archive = tmp_path / "Submission.zip"
    rc = submission.main(["--set", f"tree={recon}", "--set", f"input={inputs}", "--set", f"out={archive}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "TaskR1 Cine: 2 file(s)" in out.out and "TaskR2 Mapping: 1 file(s)" in out.out
    assert "reconstruct_report.json" in out.err  # named as left out
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # never over an existing archive
    before = archive.read_bytes()
    rc = submission.main(["--set", f"tree={recon}", "--set", f"input={inputs}", "--set", f"out={archive}"])
    assert rc == 2 and archive.read_bytes() == before
    assert "exists already" in capsys.readouterr().err

    # Evaluating the archive gives the same numbers as evaluating the tree.
    res = {}
    for label, src in (("tree", recon), ("zip", archive)):
        ev = evaluate.run(evaluate.EvalConfig(recon=str(src), reference=str(gt), out=str(tmp_path / f"ev_{label}"),
                                              figures=False, progress=False))
        assert all(r.status == "ok" for r in ev.rows)
        res[label] = json.loads((tmp_path / f"ev_{label}" / "results_all.json").read_text())
    assert res["zip"] == res["tree"]
    assert res["zip"]["cmrfm"]["TaskR1"]["val2025"]["Num_Files"] == "3/3"


def test_every_problem_is_named_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs, recon, _, names = make_trees(tmp_path)
    r = recon / names[0]
    scipy.io.savemat(r, {"img4ranking": np.ones((16, 18, 2, 3))})  # double precision
    (recon / names[1]).unlink()  # missing
    two = recon / names[2]
    scipy.io.savemat(two, {"img4ranking": np.ones((16, 18), np.float32), "extra": np.ones(2)})
    v73 = recon / names[3]
    v73.unlink()
    with h5py.File(v73, "w", userblock_size=512) as f:
        f["img4ranking"] = np.ones((9, 2, 17, 14), np.float32)
    with open(v73, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM")
    extra = recon / names[0].replace("P001", "P099")
    save_img4ranking(extra, np.ones((16, 18, 2, 3)))
    archive = tmp_path / "Submission.zip"
    rc = submission.main(["--set", f"tree={recon}", "--set", f"input={inputs}", "--set", f"out={archive}"])
    err = capsys.readouterr().err
    assert rc == 1 and not archive.exists()
    assert f"{r}: img4ranking is double" in err
    assert f"{recon / names[1]}: missing" in err
    assert f"{two}: holds ['img4ranking', 'extra']" in err
    assert f"{v73}: MAT v7.3" in err
    assert f"{extra}: no input file" in err and "extra file" in err

    plan = plan_archive(recon, inputs)
    assert len(plan.problems) == 5 and not plan.ok


def test_extract_refuses_members_outside_the_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../evil.mat", b"x")
    with pytest.raises(SubmissionError, match="outside"):
        extract_archive(bad, tmp_path / "x")
    assert not (tmp_path / "evil.mat").exists()
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as z:  # a top folder, as a zip of the folder would have
        z.writestr("Submission/TaskR1/MultiCoil/Cine/x.mat", b"x")
    assert extract_archive(nested, tmp_path / "y") == tmp_path / "y" / "Submission"


def test_symlinked_folders_are_packed_and_broken_links_named(tmp_path: Path) -> None:
    """Issue 11 item 11: a reconstruction tree assembled with a symlinked task folder lost its files
    without a word (rglob does not follow links); now they are packed, and a broken link is a problem."""
    inputs, recon, _, names = make_trees(tmp_path)
    linked = tmp_path / "linked"
    linked.mkdir()
    for task_dir in recon.iterdir():
        if task_dir.is_dir():
            (linked / task_dir.name).symlink_to(task_dir)            # every task folder is a link
    plan = plan_archive(linked, inputs)
    assert not plan.problems, plan.problems
    assert sorted(rel for rel, _ in plan.files) == names
    (linked / "TaskS1").symlink_to(tmp_path / "gone")
    assert any("TaskS1: broken symlink" in p for p in plan_archive(linked, inputs).problems)
