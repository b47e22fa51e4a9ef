"""finetune.reconstruct: a complete, correctly named submission tree; the plumbing (windows, scale,
crop, MATLAB order) checked against zero-filling; adapters picked per file; bad input named and skipped."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from finetune.classical import zero_filled
from challenge.ranking import crop_selected, ranking_shape, select_frames, select_slices
from finetune.reconstruct import ModelBank, infer_pattern, reconstruct_tree, run, window_frames
from finetune.settings import ReconstructConfig
from challenge.submission import parse_kus_path
from models.adapters import add_adapters, lora_layers, save_adapter
from pretrain.checkpoint import load_backbone
from challenge.masks import make_mask
from shards.matfile import mat_format, read_kspace, write_mat73


def val_root(synthetic_root: Path) -> Path:
    return synthetic_root / "ChallengeData_ValSet"


def subtree(synthetic_root: Path, dest: Path, modality: str) -> Path:
    """A copy of the validation tree holding only one modality folder (keeps tests short)."""
    src = next(val_root(synthetic_root).rglob(f"MultiCoil/{modality}"))
    shutil.copytree(src, dest / src.relative_to(synthetic_root))
    return dest


def kus_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*_kus_*.mat") if "UnderSample_" in str(p))


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> tuple[Path, Path]:
    """(backbone folder, adapter bank with one non-trivial cine_ktRadial adapter)."""
    tmp = tmp_path_factory.mktemp("bank")
    backbone = tiny_backbone
    model = load_backbone(backbone)
    torch.manual_seed(1)
    add_adapters(model, rank=2, alpha=4.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)  # not a no-op: the output must change
    save_adapter(model, tmp / "adapters" / "cine_ktRadial", {"contrast": "cine", "pattern": "ktRadial"})
    return backbone, tmp / "adapters"


def cfg_for(inp: Path, out: Path, bank: tuple[Path, Path], **kw) -> ReconstructConfig:
    return ReconstructConfig(input=str(inp), out=str(out), backbone=str(bank[0]), adapters=str(bank[1]), batch_size=4,
                          progress=False, **kw)


def test_window_is_centred_and_stays_inside_the_series() -> None:
    assert window_frames(5, 12, 3)[0].tolist() == [4, 5, 6] and window_frames(5, 12, 3)[1] == 1
    idx, pos = window_frames(0, 12, 3)
    assert idx.tolist() == [0, 1, 2] and pos == 0
    idx, pos = window_frames(11, 12, 3)
    assert idx.tolist() == [9, 10, 11] and pos == 2
    idx, pos = window_frames(1, 2, 3)  # shorter than T: the last frame repeats (loader convention)
    assert idx.tolist() == [0, 1, 1] and pos == 1


@pytest.mark.parametrize("pattern", ["Uniform", "ktGaussian", "ktRadial"])
def test_pattern_is_recognised_from_the_mask(pattern: str) -> None:
    assert infer_pattern(make_mask(pattern, 8, 6, 64, 48, seed=3)) == pattern


def test_submission_tree_is_complete_and_named_like_the_inputs(synthetic_root: Path, bank, tmp_path: Path) -> None:
    inp, out = val_root(synthetic_root), tmp_path / "recon"
    logs: list[str] = []
    report = reconstruct_tree(cfg_for(inp, out, bank), log=logs.append)
    inputs = kus_files(inp)
    assert inputs and report["written"] == len(inputs) and not report["errors"]
    written = sorted(p for p in out.rglob("*.mat"))
    assert len(written) == len(inputs)
    for src in inputs:
        case = parse_kus_path(src)
        dst = out / case.relative_path("UnderSample_")
        assert dst.name == src.name and dst.is_file()
        assert mat_format(dst) == "v5"
        mat = scipy.io.loadmat(dst)
        assert [k for k in mat if not k.startswith("__")] == ["img4ranking"]
        arr = mat["img4ranking"]
        nt, nz, _, ny, nx = read_kspace(src).shape
        assert arr.dtype == np.float32 and arr.shape == ranking_shape(nx, ny, nz, nt, case.stem)
        assert np.isfinite(arr).all() and arr.max() > 0
    assert not list(out.rglob("*.tmp"))
    used = report["adapters"]
    radial = [p for p in used if "Cine" in p and "ktRadial" in p]
    assert radial and all(used[p] == "cine_ktRadial" for p in radial)
    others = [p for p in used if p not in radial]
    assert others and all(used[p] == "backbone" for p in others)
    assert any("no adapter" in line and "using the bare backbone" in line for line in logs)


def test_plumbing_matches_zero_filling_with_a_pass_through_model(synthetic_root: Path, bank, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'model' that returns its input k-space must give exactly the zero-filled img4ranking: this pins
    the window/centre-frame choice, the scale and its undoing, the crop and the MATLAB axis order."""

    class PassThrough(torch.nn.Module):
        def forward(self, kspace, mask, meta):
            return {"kspace": kspace * mask.unsqueeze(2)}

    monkeypatch.setattr(ModelBank, "get", lambda self, c, p: (PassThrough(), "passthrough", None))
    inp, out = val_root(synthetic_root), tmp_path / "recon"
    reconstruct_tree(cfg_for(inp, out, bank), log=lambda m: None)
    from shards.matfile import read_mask
    from challenge.submission import mask_path

    for src in kus_files(inp):
        case = parse_kus_path(src)
        k, m = read_kspace(src), read_mask(mask_path(src))
        frames, slices = select_frames(k.shape[0], case.stem), select_slices(k.shape[1])
        m = np.broadcast_to(m, (k.shape[0],) + m.shape[1:])
        ref = np.stack([np.abs(zero_filled(k[:, z], m))[frames] for z in slices], axis=1)
        got = scipy.io.loadmat(out / case.relative_path())["img4ranking"]
        np.testing.assert_allclose(got, crop_selected(ref), rtol=2e-4, atol=1e-6 * float(ref.max()))


def test_bad_inputs_are_named_and_the_rest_is_written(synthetic_root: Path, bank, tmp_path: Path) -> None:
    inp = tmp_path / "val"
    shutil.copytree(val_root(synthetic_root), inp)
    good = kus_files(inp)
    task_root = next(inp.rglob("UnderSample_TaskR1")).parents[2]  # <Task>/MultiCoil
    rng = np.random.default_rng(0)

    def add(modality: str, stem: str, pattern: str, R: int, shape, mask_shape=None, with_mask=True) -> Path:
        sub = f"Center001/UIH_30T_umr780/P009"
        base = task_root / modality / "ValidationSet"
        k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
        nt, _, _, ny, nx = shape
        mshape = mask_shape or (nt, ny, nx)
        mask = make_mask("Uniform", 8, *mshape)
        kus = base / f"UnderSample_TaskR1/{sub}/{stem}_kus_{pattern}{R}.mat"
        write_mat73(kus, "kus", k * (mask[:, None, None] if mask.shape[1:] == shape[-2:] else 1))
        if with_mask:
            write_mat73(base / f"Mask_TaskR1/{sub}/{stem}_mask_{pattern}{R}.mat", "mask", mask)
        return kus

    no_mask = add("Cine", "cine_sax", "Uniform", 8, (4, 1, 3, 40, 48), with_mask=False)
    unknown_contrast = add("Spectroscopy", "csi", "Uniform", 8, (4, 1, 3, 40, 48))
    unknown_pattern = add("Cine", "cine_lax", "Spiral", 8, (4, 1, 3, 40, 48))
    wrong_mask = add("Cine", "cine_lvot", "Uniform", 8, (4, 1, 3, 40, 48), mask_shape=(4, 36, 48))
    too_small = add("Cine", "cine_rvot", "Uniform", 8, (4, 1, 3, 10, 12))
    missing_adapter = add("Cine", "cine_ot", "ktGaussian", 16, (4, 1, 3, 40, 48))
    logs: list[str] = []
    out = tmp_path / "recon"
    report = reconstruct_tree(cfg_for(inp, out, bank), log=logs.append)

    def said(path: Path, words: str) -> bool:
        return any(str(path) in line and words in line for line in logs)

    assert said(no_mask, "no matching mask")
    assert said(unknown_contrast, "unknown contrast")
    assert said(unknown_pattern, "unknown sampling pattern")
    assert said(wrong_mask, "does not fit k-space")
    assert said(too_small, "smaller than")
    assert said(missing_adapter, "no adapter cine_ktGaussian")
    assert len(report["errors"]) == 2 and all(str(p) in " ".join(report["errors"]) for p in (wrong_mask, too_small))
    for src in good + [no_mask, unknown_contrast, unknown_pattern, missing_adapter]:
        assert (out / parse_kus_path(src).relative_path()).is_file(), src
    for src in (wrong_mask, too_small):
        assert not (out / parse_kus_path(src).relative_path()).exists()
    assert not list(out.rglob("*.tmp"))


def test_broken_adapter_falls_back_to_the_backbone_and_says_which_file(synthetic_root: Path, bank,
                                                                        tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    shutil.copytree(bank[1], adapters)
    (adapters / "cine_ktRadial" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    logs: list[str] = []
    inp = subtree(synthetic_root, tmp_path / "in", "Cine")
    cfg = dataclasses.replace(cfg_for(inp, tmp_path / "recon", bank), adapters=str(adapters))
    report = reconstruct_tree(cfg, log=logs.append)
    assert not report["errors"] and set(report["adapters"].values()) == {"backbone"}
    radial = [p for p in report["adapters"] if "Cine" in p and "ktRadial" in p]
    assert radial and all(any(p in line and "cine_ktRadial is unusable" in line for line in logs) for p in radial)


def test_full_volumes_fastmri_and_baseline_trees(synthetic_root: Path, bank, tmp_path: Path, tree) -> None:
    # a small LGE-like file (2 frames, 2 slices): full volumes stay cheap
    tree.val_file("TaskR1", "LGE", "Center004", "Siemens_15T_Aera", "P001", "lge_sax",
                  tree.kspace(nt=2, nz=2, nc=3, ny=40, nx=48), pattern="Uniform", R=8)
    inp = tree.root
    shutil.copytree(synthetic_root / "fastMRI", inp / "fastMRI")
    out = tmp_path / "recon"
    reports = run(cfg_for(inp, out, bank, full_volumes=True, methods=["cmrfm", "zero_filled"]))
    assert not reports["cmrfm"]["errors"] and not reports["zero_filled"]["errors"]
    for src in kus_files(inp):
        rel = parse_kus_path(src).relative_path()
        assert (Path(f"{out}_zero_filled") / rel).is_file()
        vol = scipy.io.loadmat(Path(f"{out}_volumes") / rel)["img"]
        nt, nz, _, ny, nx = read_kspace(src).shape
        assert vol.shape[:2] == (nx, ny) and vol.size == nx * ny * nz * nt
    h5_in = sorted((inp / "fastMRI").rglob("*.h5"))
    assert h5_in
    for src in h5_in:
        with h5py.File(src) as f:
            nz, _, height, width = f["kspace"].shape
        with h5py.File(out / src.relative_to(inp)) as f:
            rec = f["reconstruction"][()]
        assert rec.shape == (nz, height, width) and rec.dtype == np.float32 and np.isfinite(rec).all()
