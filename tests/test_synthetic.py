"""shards.synthetic: the tiny session corpus has every property the real release has that a reader or a
model can trip on (docs/cmrxrecon.md §2-§5, traps 2-5, 13-18), and is deterministic for a seed."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from launch.cli import load_config
from challenge.masks import ACCELERATIONS_2025, PATTERNS_2025
from shards.matfile import read_kspace, read_mask
from shards.synthetic import STEMS_2025, SyntheticConfig, main, write_corpus

MODALITIES = {"BlackBlood", "Cine", "Flow2d", "LGE", "Mapping", "Perfusion", "T1rho", "T1w", "T2w"}


def _files(root: Path) -> list[dict]:
    return json.loads((root / "synthetic_index.json").read_text())["files"]


def _kspace_2025(root: Path) -> list[dict]:
    return [e for e in _files(root) if e["year"] == 2025 and e["kind"] in ("kspace", "kus")]


def _image(k: np.ndarray) -> np.ndarray:
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), axes=(-2, -1), norm="ortho"), axes=(-2, -1))
    return np.sqrt((np.abs(img) ** 2).sum(axis=-3))  # RSS over coils


def test_centers_vendors_fields_modalities(synthetic_root: Path) -> None:
    train = [e for e in _files(synthetic_root) if e["tree"] == "train2025" and e["kind"] == "kspace"]
    on_disk = {p.name for p in (synthetic_root / "ChallengeData/MultiCoil").iterdir()}
    assert on_disk == MODALITIES
    every = _kspace_2025(synthetic_root)
    assert len({e["center"] for e in every}) >= 4
    assert len({e["scanner"] for e in every}) >= 5
    assert {e["vendor"] for e in every} >= {"Siemens", "UIH", "GE", "Philips"}
    assert {e["field_T"] for e in every} >= {1.5, 3.0, 5.0}
    stems = {e["stem"] for e in train}
    assert {"cine_sax", "cine_lax", "T1map", "T1mappost", "T2map", "T2smap", "T1rho", "T1w", "T2w",
            "blackblood", "flow2d", "perfusion", "lge_sax"} <= stems <= set(STEMS_2025)
    assert len([s for s in stems if s.startswith("cine_lax")]) >= 2  # several long-axis views


def test_frame_counts_and_four_d_files(synthetic_root: Path) -> None:
    expect = {"cine": 12, "lge": 2, "T1mappost": 9, "T2map": 3, "T2smap": 8, "T1rho": 4, "flow2d": 2,
              "perfusion": 50}
    seen = set()
    for e in _kspace_2025(synthetic_root):
        stem, shape = e["stem"], e["shape"]
        if stem in ("T1w", "T2w", "blackblood"):
            assert len(shape) == 4  # (nz, nc, ny, nx): no time axis
            continue
        assert len(shape) == 5 and shape[2] == 10
        key = next((k for k in expect if stem.startswith(k)), stem)
        want = expect.get(key, (8, 9) if stem == "T1map" else None)
        assert shape[0] in (want if isinstance(want, tuple) else (want,)), (stem, shape)
        if stem == "cine_lax":
            assert shape[1] == 3  # three views packed in nz
        seen.add(key)
    assert seen >= set(expect)


def test_matrix_sizes_odd_ny_and_nx(synthetic_root: Path) -> None:
    every = _kspace_2025(synthetic_root)
    ny = np.array([e["shape"][-2] for e in every])
    nx = np.array([e["shape"][-1] for e in every])
    assert (ny % 2 == 1).mean() >= 1 / 3
    assert (nx % 16 != 0).all() and (nx % 2 == 0).all() and (nx > ny).all()
    # the ranking crop round(nx/3) x round(ny/2) must stay >= 7 x 7 (SSIM window)
    assert (np.floor(nx / 3 + 0.5) >= 7).all() and (np.floor(ny / 2 + 0.5) >= 7).all()


def test_v5_fraction_and_formats(synthetic_root: Path) -> None:
    full = [e for e in _kspace_2025(synthetic_root) if e["kind"] == "kspace"]
    fmts = Counter(e["format"] for e in full)
    assert fmts["v5"] >= 1 and fmts["v5"] <= 0.3 * len(full)
    for e in full:
        head = (synthetic_root / e["path"]).read_bytes()[:10]
        assert head == (b"MATLAB 5.0" if e["format"] == "v5" else b"MATLAB 7.3")
    masks = [e for e in _files(synthetic_root) if e["kind"] == "mask"]
    for e in masks[:20]:
        with h5py.File(synthetic_root / e["path"], "r") as fh:
            assert list(fh.keys()) == ["mask"] and fh["mask"].dtype == np.float64
            assert fh["mask"].attrs["MATLAB_class"] == b"double"


def test_training_masks_for_every_file(synthetic_root: Path) -> None:
    for e in (x for x in _files(synthetic_root) if x["tree"] == "train2025" and x["kind"] == "kspace"):
        path = synthetic_root / e["path"]
        mdir = Path(str(path.parent).replace("/FullSample/", "/Mask_TaskAll/"))
        names = {p.name for p in mdir.glob(f"{e['stem']}_mask_*.mat")}
        assert names == {f"{e['stem']}_mask_{p}{R}.mat" for p in PATTERNS_2025 for R in ACCELERATIONS_2025}
        four_d = len(e["shape"]) == 4
        with h5py.File(mdir / f"{e['stem']}_mask_ktRadial8.mat", "r") as fh:
            shape = fh["mask"].shape
        assert shape == (tuple(e["shape"][-2:]) if four_d else (e["shape"][0], *e["shape"][-2:]))


def test_task_r1_validation_tree(synthetic_root: Path) -> None:
    files = _files(synthetic_root)
    train = [e for e in files if e["tree"] == "train2025"]
    kus = [e for e in files if e["kind"] == "kus"]
    assert kus
    assert {e["center"] for e in kus} - {e["center"] for e in train}  # a center training lacks
    assert {e["scanner"] for e in kus} - {e["scanner"] for e in train}  # a scanner training lacks
    for e in kus:
        upath = synthetic_root / e["path"]
        assert "/ValidationSet/UnderSample_TaskR1/" in upath.as_posix()
        assert upath.name == f"{e['stem']}_kus_{e['pattern']}{e['R']}.mat"
        assert len(list(upath.parent.glob(f"{e['stem']}_kus_*.mat"))) == 1  # one pattern per file
        assert (upath.parent / f"{e['stem']}_info.csv").exists()
        mpath = Path(str(upath).replace("UnderSample_TaskR1", "Mask_TaskR1").replace("_kus_", "_mask_"))
        ref = Path(str(upath.parent).replace("UnderSample_TaskR1", "FullSample_TaskR1")) / f"{e['stem']}.mat"
        k_us, k_ref, mask = read_kspace(upath), read_kspace(ref), read_mask(mpath)
        np.testing.assert_array_equal(k_us, k_ref * mask[:, None, None])  # kus = kspace .* mask
        assert 0 < mask.mean() < 0.9 and np.count_nonzero(k_us) <= 0.9 * k_us.size  # really undersampled


def test_vendor_scales_and_readout_oversampling(synthetic_root: Path) -> None:
    every = [e for e in _kspace_2025(synthetic_root) if e["kind"] == "kspace"]
    for vendor, lo, hi in (("Siemens", 1e-4, 1e-1), ("UIH", 1e5, 1e8)):
        e = next(x for x in every if x["vendor"] == vendor)
        kmax = np.abs(read_kspace(synthetic_root / e["path"])).max()
        assert lo < kmax < hi, (vendor, kmax)
    e = next(x for x in every if x["vendor"] == "Siemens")  # 2x readout oversampling
    img = _image(read_kspace(synthetic_root / e["path"]))
    nx = img.shape[-1]
    outer = np.r_[np.arange(nx // 8), np.arange(nx - nx // 8, nx)]
    energy = (img ** 2).sum(axis=(0, 1, 2))
    assert energy[outer].sum() < 0.02 * energy.sum()  # the object sits in the central part of the readout


def test_dc_row_and_partial_fourier_files(synthetic_root: Path) -> None:
    every = [e for e in _kspace_2025(synthetic_root) if e["kind"] == "kspace"]
    shifted = [e for e in every if e["dc_row"] != e["shape"][-2] // 2]
    assert shifted and len(shifted) < len(every)
    for e in shifted + every[:3]:
        k = read_kspace(synthetic_root / e["path"])
        row_energy = (np.abs(k) ** 2).sum(axis=(0, 1, 2, 4))
        assert int(np.argmax(row_energy)) == e["dc_row"], e["path"]


def test_content_moves_and_changes_contrast(synthetic_root: Path) -> None:
    every = [e for e in _kspace_2025(synthetic_root) if e["kind"] == "kspace"]
    cine = next(e for e in every if e["stem"] == "cine_sax")
    img = _image(read_kspace(synthetic_root / cine["path"]))[:, 0]
    diff = np.abs(img[0] - img[6]).sum() / img[0].sum()  # end-diastole vs end-systole
    assert 0.02 < diff < 0.5
    t2 = next(e for e in every if e["stem"] == "T2map")
    img = _image(read_kspace(synthetic_root / t2["path"]))
    signal = img.sum(axis=(1, 2, 3))
    assert signal[0] > signal[1] > signal[2]  # T2 decay over echo times


def test_2024_tree(synthetic_root: Path) -> None:
    e = next(x for x in _files(synthetic_root) if x["tree"] == "train2024" and x["kind"] == "kspace")
    path = synthetic_root / e["path"]
    assert path.as_posix().split("/CMRxRecon2024/ChallengeData/MultiCoil/")[1].split("/")[1:3] == ["TrainingSet", "FullSample"]
    with h5py.File(path, "r") as fh:
        assert list(fh.keys()) == ["kspace_full"] and fh["kspace_full"].dtype["real"] == np.float32
    mdir = Path(str(path.parent).replace("/FullSample/", "/Mask_Task2/"))
    m = read_mask(mdir / f"{e['stem']}_mask_ktUniform4.mat")
    ny = m.shape[1]
    acs = slice(ny // 2 - 8, ny // 2 + 8)  # ACS 16 in 2024
    assert m[:, acs].all() and not m[:, ny // 2 - 9].all()
    t1 = read_mask(Path(str(path.parent).replace("/FullSample/", "/Mask_Task1/")) / f"{e['stem']}_mask_Uniform4.mat")
    assert t1.shape == (1, *m.shape[1:])  # Task 1 masks are 2-D


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.mat")) + sorted(root.rglob("*.h5"))}


def _micro(out: Path, seed: int, workers: int) -> SyntheticConfig:
    return SyntheticConfig(out=str(out), seed=seed, workers=workers, train_scanners=["Center002/Siemens_30T_Vida"],
                           val_scanners=["Center004/UIH_15T_umr680"], patients_per_scanner=1, files_per_patient=2,
                           val_files_per_patient=1, ny_min=16, ny_max=20, nx_min=40, nx_max=50, nz_max=1,
                           perfusion_frames=5, patients_2024=0, fastmri_files=1, fastmri_slices=1)


def test_deterministic_for_a_seed_and_worker_count(tmp_path: Path) -> None:
    a = _digest(write_corpus(_micro(tmp_path / "a", seed=3, workers=1)))
    b = _digest(write_corpus(_micro(tmp_path / "b", seed=3, workers=2)))
    c = _digest(write_corpus(_micro(tmp_path / "c", seed=4, workers=1)))
    assert len(a) > 10 and a == b  # byte-identical, whatever the scheduling
    full = [p for p in a if "/FullSample/" in p]
    assert full and all(p in c and c[p] != a[p] for p in full)  # another seed: other content


def test_cli_writes_resolved_config_and_defaults_file(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    main(["--set", f"out={out}", "--set", "train_scanners=Center009/GE_30T_SIGNAPremier", "--set", "val_scanners=",
          "--set", "files_per_patient=1", "--set", "patients_per_scanner=1", "--set", "patients_2024=0",
          "--set", "fastmri_files=0", "--set", "ny_min=16", "--set", "ny_max=18", "--set", "nx_min=30",
          "--set", "nx_max=34"])
    cfg = load_config(SyntheticConfig, out / "synthetic_config.toml")
    assert cfg.train_scanners == ["Center009/GE_30T_SIGNAPremier"] and cfg.val_scanners == []
    assert (out / "ChallengeData/MultiCoil/Cine/TrainingSet/FullSample/Center009/GE_30T_SIGNAPremier/P001/cine_sax.mat").exists()
    # configs/synthetic.toml is the built-in defaults written out
    shipped = load_config(SyntheticConfig, Path(__file__).parents[1] / "configs" / "synthetic.toml")
    assert shipped == SyntheticConfig()


def test_sizes_too_small_for_the_ranking_crop_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ranking crop"):
        write_corpus(SyntheticConfig(out=str(tmp_path / "x"), ny_min=10, ny_max=12))


def test_an_existing_out_is_reused_only_for_the_same_config_and_never_mixed(tmp_path: Path) -> None:
    """Issue 11 item 5: writing into a folder that held another corpus mixed the two (index: 10 files,
    33 on disk). Now: the same config reuses the folder untouched, another config or a foreign folder
    is refused with the differences named, and nothing is written into them."""
    out = tmp_path / "corpus"
    first = _digest(write_corpus(_micro(out, seed=3, workers=1)))
    stamp = {p: (out / p).stat().st_mtime_ns for p in first}
    assert _digest(write_corpus(_micro(out, seed=3, workers=2))) == first        # workers change no byte
    assert {p: (out / p).stat().st_mtime_ns for p in first} == stamp            # reused, not rewritten
    with pytest.raises(ValueError, match=r"another config \(seed: 3 -> 4"):
        write_corpus(_micro(out, seed=4, workers=1))
    assert _digest(out) == first
    index = json.loads((out / "synthetic_index.json").read_text())["files"]
    on_disk = [p for p in out.rglob("*") if p.suffix in (".mat", ".h5")]
    assert len(index) == len(on_disk)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a synthetic corpus"):
        write_corpus(_micro(foreign, seed=3, workers=1))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
