"""shards.layout: every CMRxRecon layout (2023/2024/2025, training and validation) and fastMRI into
Case records; sample keys unique across splits and tasks (trap 16) and tar-safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shards.layout import LayoutError, find_cases, parse_scanner, scan, view_of
from shards.matfile import write_fastmri
from shards.sample import sample_key


def test_2025_training_and_validation_tree(tree) -> None:
    k = tree.kspace()
    tree.train_file("Cine", "Center005", "Siemens_30T_CIMA.X", "P003", "cine_lax_4ch", k,
                    masks=[("Uniform", 8), ("ktRadial", 16)])
    info = tree.root / "ChallengeData/MultiCoil/Cine/TrainingSet/FullSample/Center005/Siemens_30T_CIMA.X/P003/cine_lax_4ch_info.csv"
    info.write_text("Parameter,Value\nFOVx(mm),340\nReadOutOversample,2\nSequence,bSSFP\n")
    tree.val_file("TaskR1", "Cine", "Center009", "Philips_30T_IngeniaCX", "P003", "cine_sax", k, "ktRadial", 16)
    tree.val_file("TaskR1", "Mapping", "Center001", "UIH_15T_umr670", "P007", "T1map", k, "Uniform", 24, reference=False)
    got = scan(tree.root)
    assert got.ignored == []
    by_file = {c.file: c for c in got.cases}
    assert sorted(by_file) == ["T1map", "cine_lax_4ch", "cine_sax"]    # masks and references are no cases

    t = by_file["cine_lax_4ch"]
    assert (t.year, t.split, t.task, t.set) == (2025, "train", "TaskAll", "FullSample")
    assert (t.center, t.scanner, t.vendor, t.field_T, t.model) == ("Center005", "Siemens_30T_CIMA.X", "Siemens", 3.0, "CIMA.X")
    assert (t.patient, t.modality, t.view, t.pattern, t.R, t.reference_path) == ("P003", "Cine", "lax_4ch", None, None, None)
    assert sorted(p.name for p in t.mask_paths) == ["cine_lax_4ch_mask_Uniform8.mat", "cine_lax_4ch_mask_ktRadial16.mat"]
    assert t.info == {"FOVx(mm)": 340.0, "ReadOutOversample": 2.0, "Sequence": "bSSFP"}
    assert t.source.startswith("ChallengeData/MultiCoil/Cine/TrainingSet/FullSample/")

    v = by_file["cine_sax"]
    assert (v.year, v.split, v.task, v.set, v.pattern, v.R) == (2025, "val", "TaskR1", "UnderSample", "ktRadial", 16)
    assert (v.vendor, v.field_T, v.model, v.view) == ("Philips", 3.0, "IngeniaCX", "sax")
    assert [p.name for p in v.mask_paths] == ["cine_sax_mask_ktRadial16.mat"]
    assert v.reference_path is not None and v.reference_path.parts[-5] == "FullSample_TaskR1"
    assert v.stem == "cine_sax_kus_ktRadial16"
    m = by_file["T1map"]
    assert (m.field_T, m.reference_path, m.view, m.R) == (1.5, None, "", 24)


def test_2024_and_2023_layouts(tree) -> None:
    k = tree.kspace()
    tree.write("ChallengeData/MultiCoil/Aorta/TrainingSet/FullSample/P010/aorta_sag.mat", "kspace_full", k)
    tree.write("ChallengeData/MultiCoil/Aorta/TrainingSet/Mask_Task2/P010/aorta_sag_mask_ktUniform8.mat", "mask",
               np.ones((4, 21, 24)))
    tree.write("ChallengeData/MultiCoil/Aorta/ValidationSet/UnderSample_Task2/P011/aorta_sag_kus_ktUniform8.mat", "kus", k)
    cases = {c.source: c for c in find_cases(tree.root)}
    a = cases["ChallengeData/MultiCoil/Aorta/TrainingSet/FullSample/P010/aorta_sag.mat"]
    assert (a.year, a.split, a.center, a.scanner, a.vendor, a.view) == (2024, "train", "", "Siemens_30T_Vida", "Siemens", "sag")
    assert [p.name for p in a.mask_paths] == ["aorta_sag_mask_ktUniform8.mat"]
    v = cases["ChallengeData/MultiCoil/Aorta/ValidationSet/UnderSample_Task2/P011/aorta_sag_kus_ktUniform8.mat"]
    assert (v.year, v.split, v.task, v.pattern, v.R, v.mask_paths) == (2024, "val", "Task2", "ktUniform", 8, [])

    root23 = tree.root.parent / "t23"
    base = root23 / "ChallengeData/MultiCoil/Cine/TrainingSet"
    from shards.matfile import write_mat73

    write_mat73(base / "FullSample/P001/cine_lax.mat", "kspace_full", k)
    write_mat73(base / "AccFactor04/P001/cine_lax.mat", "kspace_sub04", k)
    write_mat73(base / "AccFactor04/P001/cine_lax_mask.mat", "mask04", np.ones((21, 24)))
    c23 = {(c.set, c.task): c for c in find_cases(root23)}
    assert set(c23) == {("FullSample", "TaskAll"), ("UnderSample", "AccFactor04")}
    u = c23[("UnderSample", "AccFactor04")]
    assert (u.year, u.R, u.pattern, u.view) == (2023, 4, "Uniform", "lax")
    assert [p.name for p in u.mask_paths] == ["cine_lax_mask.mat"] and u.reference_path.name == "cine_lax.mat"


def test_fastmri_folder(tmp_path: Path) -> None:
    k = np.ones((2, 3, 16, 12), np.complex64)
    write_fastmri(tmp_path / "multicoil_val" / "file1000.h5", k, attrs={"acquisition": "CORPD_FBK"})
    (c,) = find_cases(tmp_path)
    assert (c.year, c.split, c.modality, c.patient, c.source) == (None, "val", "fastMRI", "file1000", "multicoil_val/file1000.h5")


def test_empty_or_unrecognised_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match=f"{empty}.*empty"):
        find_cases(empty)
    odd = tmp_path / "odd"
    (odd / "some" / "where").mkdir(parents=True)
    (odd / "some" / "where" / "x.mat").write_bytes(b"MATLAB 5.0")
    with pytest.raises(LayoutError, match=f"{odd}: unrecognised folder.*some/where/x.mat"):
        find_cases(odd)
    with pytest.raises(LayoutError, match="not a folder"):
        find_cases(tmp_path / "missing")


def test_scanner_and_view_parsing() -> None:
    assert parse_scanner("UIH_15T_umr670") == ("UIH", 1.5, "umr670")
    assert parse_scanner("Siemens_50T_Xyz") == ("Siemens", 5.0, "Xyz")
    assert parse_scanner("weird") == ("weird", None, "")
    assert [view_of(f) for f in ("cine_sax", "cine_lax", "lge_lax_3ch", "T2smap", "blackblood", "flow2d")] == \
        ["sax", "lax", "lax_3ch", "", "", ""]


def test_sample_keys_unique_across_splits_and_tasks_and_tar_safe() -> None:
    """Trap 16: the same center/P###/file in training and in two validation tasks are 3 samples."""
    keys = {sample_key(2025, split, task, s, "Center001", "Siemens_30T_CIMA.X", "P007", stem, 0)
            for split, task, s, stem in [("train", "TaskAll", "FullSample", "cine_sax"),
                                         ("val", "TaskR1", "UnderSample", "cine_sax_kus_Uniform8"),
                                         ("val", "TaskR2", "UnderSample", "cine_sax_kus_Uniform8")]}
    assert len(keys) == 3
    assert all("." not in k and "/" not in k for k in keys)
    assert sample_key(None, "train", "TaskAll", "FullSample", "", "", "f1", "f1", 3).startswith("fastmri__")


def test_synthetic_corpus_cases(synthetic_root: Path) -> None:
    got = scan(synthetic_root)
    assert got.ignored == []
    cases = got.cases
    on_disk = {p.name for p in (synthetic_root / "ChallengeData/MultiCoil").iterdir()}
    assert on_disk and {c.modality for c in cases if c.year == 2025 and c.split == "train"} == on_disk
    assert {c.split for c in cases} >= {"train", "val"}
    assert {c.year for c in cases} >= {2024, 2025, None}
    val = [c for c in cases if c.task == "TaskR1"]
    assert val and all(c.set == "UnderSample" and c.pattern and c.R and c.mask_paths for c in val)
    assert any(c.reference_path is not None for c in val)
    train_scanners = {c.scanner for c in cases if c.split == "train" and c.year == 2025}
    assert {c.scanner for c in val} - train_scanners, "validation has a scanner training does not"
    keys = [(c.year, c.split, c.task, c.set, c.center, c.scanner, c.patient, c.stem) for c in cases]
    assert len(keys) == len(set(keys))
