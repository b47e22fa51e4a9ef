"""Submission paths and files, and `python -m finetune.evaluate` end to end on a tiny hand-made tree."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from finetune import evaluate
from finetune.classical import reconstruct_tree
from challenge.ranking import img4ranking_from_kspace
from finetune.settings import ClassicalConfig, ReconstructConfig
from challenge.submission import (
    SubmissionError, load_img4ranking, mask_path, parse_kus_path, parse_reference_path, save_img4ranking,
    submission_path,
)

SET = "ValidationSet"


def _dir(root: Path, modality: str, folder: str, center: str, vendor: str, patient: str) -> Path:
    d = root / "TaskR1" / "MultiCoil" / modality / SET / f"{folder}_TaskR1" / center / vendor / patient
    d.mkdir(parents=True, exist_ok=True)
    return d


def _phantom_kspace(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Multi-coil k-space (nt, nz, nc, ny, nx) of a moving ellipse seen through smooth coil maps."""
    rng = np.random.default_rng(seed)
    nt, nz, nc, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    img = np.zeros((nt, nz, ny, nx))
    for t in range(nt):
        for z in range(nz):
            r = ((yy - ny / 2 - t) / (0.3 * ny)) ** 2 + ((xx - nx / 2 + z) / (0.3 * nx)) ** 2
            img[t, z] = (r < 1) * (1 + 0.3 * np.cos(xx / 3.0)) + 0.05
    ang = 2 * np.pi * np.arange(nc) / nc
    sens = np.stack([np.exp(1j * a - (((yy - ny / 2 - 10 * np.cos(a)) / ny) ** 2 + ((xx - nx / 2) / nx) ** 2))
                     for a in ang])
    coil = img[:, :, None] * sens[None, None]
    ax = (-2, -1)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil, axes=ax), norm="ortho"), axes=ax)
    k = k + 0.002 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    return k.astype(np.complex64)


def _mask(nt: int, ny: int, nx: int, step: int) -> np.ndarray:
    m = np.zeros((nt, ny, nx), np.float32)
    for t in range(nt):
        m[t, t % step :: step] = 1
    m[:, ny // 2 - 10 : ny // 2 + 10] = 1  # 20 ACS lines
    return m


def _savemat_v5(path: Path, key: str, arr_h5order: np.ndarray) -> None:
    """MAT v5 in MATLAB order, written with scipy (independent of shards.matfile's writers)."""
    scipy.io.savemat(path, {key: np.ascontiguousarray(arr_h5order.T)}, format="5")


# (modality, center, vendor, patient, stem, k-space shape (nt, nz, nc, ny, nx) or 4-D, pattern, R)
CASES = [
    ("Cine", "Center001", "UIH_30T_umr780", "P001", "cine_sax", (3, 3, 4, 36, 48), "Uniform", 8),
    ("LGE", "Center001", "UIH_30T_umr780", "P004", "lge_sax", (2, 2, 4, 36, 42), "ktGaussian", 16),
    ("Cine", "Center002", "Siemens_30T_Vida", "P002", "cine_lax_4ch", (3, 1, 4, 40, 45), "ktRadial", 16),
    ("T1w", "Center002", "Siemens_30T_Vida", "P003", "T1w", (1, 4, 36, 48), "Uniform", 24),
]


def make_tree(root: Path) -> dict[str, Path]:
    """A validation-style TaskR1 tree with its hidden FullSample_TaskR1; returns stem -> kus path."""
    kus_paths = {}
    for i, (mod, center, vendor, patient, stem, shape, pattern, R) in enumerate(CASES):
        k = _phantom_kspace(shape if len(shape) == 5 else (1, *shape), seed=i)
        m = _mask(k.shape[0], k.shape[-2], k.shape[-1], step=4)
        kus = k * m[:, None, None]
        full = k if len(shape) == 5 else k[0]
        _savemat_v5(_dir(root, mod, "FullSample", center, vendor, patient) / f"{stem}.mat", "kspace", full)
        kp = _dir(root, mod, "UnderSample", center, vendor, patient) / f"{stem}_kus_{pattern}{R}.mat"
        _savemat_v5(kp, "kus", kus if len(shape) == 5 else kus[0])
        mask = m if len(shape) == 5 else m[0]
        _savemat_v5(_dir(root, mod, "Mask", center, vendor, patient) / f"{stem}_mask_{pattern}{R}.mat", "mask", mask)
        kus_paths[stem] = kp
    return kus_paths


def test_submission_paths_and_files(tmp_path: Path) -> None:
    kus = Path("/data/ChallengeData_ValSet/TaskR1/MultiCoil/Cine/ValidationSet/UnderSample_TaskR1/"
               "Center001/UIH_30T_umr780/P007/cine_lax_4ch_kus_ktRadial16.mat")
    case = parse_kus_path(kus)
    assert (case.task, case.modality, case.center, case.vendor, case.patient) == (
        "TaskR1", "Cine", "Center001", "UIH_30T_umr780", "P007")
    assert (case.stem, case.pattern, case.R) == ("cine_lax_4ch", "ktRadial", 16)
    assert submission_path(kus, "/out") == Path(
        "/out/TaskR1/MultiCoil/Cine/ValidationSet/UnderSample_TaskR1/Center001/UIH_30T_umr780/P007/"
        "cine_lax_4ch_kus_ktRadial16.mat")
    assert mask_path(kus) == Path("/data/ChallengeData_ValSet/TaskR1/MultiCoil/Cine/ValidationSet/Mask_TaskR1/"
                                  "Center001/UIH_30T_umr780/P007/cine_lax_4ch_mask_ktRadial16.mat")
    ref = parse_reference_path("/gt/TaskR1/MultiCoil/Cine/ValidationSet/FullSample_TaskR1/Center001/"
                               "UIH_30T_umr780/P007/cine_lax_4ch.mat")
    assert ref.match_key == case.match_key
    with pytest.raises(SubmissionError, match="cine_sax.mat"):
        parse_kus_path("/x/P001/cine_sax.mat")

    # MAT v5, float32, key img4ranking, middle singleton kept, no ".mat.mat", no temp file left.
    arr = np.random.default_rng(0).random((15, 20, 1, 3)).astype(np.float64)
    out = save_img4ranking(tmp_path / "a" / "cine_lax_4ch_kus_ktRadial16.mat", arr)
    assert sorted(p.name for p in out.parent.iterdir()) == ["cine_lax_4ch_kus_ktRadial16.mat"]
    assert out.read_bytes()[:10] == b"MATLAB 5.0"
    raw = scipy.io.loadmat(out)["img4ranking"]
    assert raw.shape == (15, 20, 1, 3) and raw.dtype == np.float32
    np.testing.assert_array_equal(load_img4ranking(out), arr.astype(np.float32))
    assert load_img4ranking(save_img4ranking(tmp_path / "b.mat", arr[:, :, 0, 0])).shape == (15, 20)

    # v7.3 fallback read like the validation scorer: h5py order, NOT transposed.
    v73 = tmp_path / "v73.mat"
    with h5py.File(v73, "w", userblock_size=512) as f:
        f["img4ranking"] = arr[:, :, 0, :].T.astype(np.float32)  # as MATLAB would store (15, 20, 3)
    with open(v73, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM")
    assert load_img4ranking(v73).shape == (3, 20, 15)
    assert load_img4ranking(v73, reverse_h5_axes=True).shape == (15, 20, 3)
    bad = tmp_path / "nokey.mat"
    scipy.io.savemat(bad, {"recon": arr})
    with pytest.raises(SubmissionError, match="nokey.mat.*img4ranking"):
        load_img4ranking(bad)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "val"
    kus = make_tree(root)

    # Baseline trees written by the classical entry point (the same submission layout as the model).
    zf, cl = tmp_path / "zf", tmp_path / "sense"
    assert reconstruct_tree(ReconstructConfig(input=str(root), out=str(zf), progress=False,
                                              classical=ClassicalConfig(method="zero_filled"))) == []
    assert reconstruct_tree(ReconstructConfig(input=str(root), out=str(cl), progress=False,
                                              classical=ClassicalConfig(method="sense", max_iter=10))) == []
    written = sorted(p.relative_to(zf) for p in zf.rglob("*.mat"))
    assert written == sorted(submission_path(p, zf).relative_to(zf) for p in kus.values())
    refs = {}
    for mod, center, vendor, patient, stem, *_ in CASES:
        ref_file = _dir(root, mod, "FullSample", center, vendor, patient) / f"{stem}.mat"
        k = scipy.io.loadmat(ref_file)["kspace"].T
        refs[stem] = img4ranking_from_kspace(k if k.ndim == 5 else k[None], stem)
        assert load_img4ranking(submission_path(kus[stem], zf)).shape == refs[stem].shape
    assert refs["cine_lax_4ch"].shape == (15, 20, 1, 3) and refs["T1w"].shape == (16, 18)

    # The "model" tree: reference + noise, with one file missing, one extra, one of the wrong shape.
    rng = np.random.default_rng(5)
    model = tmp_path / "cmrfm"
    for stem in ("cine_sax", "cine_lax_4ch"):
        save_img4ranking(submission_path(kus[stem], model), refs[stem] + 0.02 * rng.random(refs[stem].shape))
    save_img4ranking(submission_path(kus["lge_sax"], model), refs["lge_sax"][:-1])  # shape mismatch
    extra = submission_path(kus["cine_sax"], model).parents[1] / "P009" / "cine_sax_kus_Uniform8.mat"
    save_img4ranking(extra, refs["cine_sax"])  # no reference: extra file; T1w: missing

    out = tmp_path / "eval"
    rc = evaluate.main(["--set", f"recon={model}", "--set", f"reference={root}", "--set", f"out={out}",
                        "--set", f"methods=zero_filled={zf},classical={cl}", "--set", "progress=false",
                        "--set", "n_cases=2"])
    assert rc == 0
    for name in ("per_file.csv", "per_center_vendor.csv", "per_contrast_pattern_R.csv", "problems.csv",
                 "results.json", "results_all.json", "eval_config.toml",
                 "figures/bars_center_vendor.png", "figures/bars_contrast_pattern_R.png"):
        assert (out / name).stat().st_size > 0, name
    cases = sorted((out / "figures").glob("case_*.png"))
    assert len(cases) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in cases)
    assert not list(out.rglob("*.tmp"))

    rows = _read_csv(out / "per_file.csv")
    status = {(r["method"], r["contrast"], r["patient"]): r["status"] for r in rows}
    assert status[("cmrfm", "cine_sax", "P001")] == "ok"
    assert status[("cmrfm", "lge_sax", "P004")] == "shape_mismatch"
    assert status[("cmrfm", "T1w", "P003")] == "missing"
    assert status[("cmrfm", "cine_sax", "P009")] == "extra"
    assert all(status[(m, c, p)] == "ok" for m in ("zero_filled", "classical") for (_, _, _, p, c, *_) in CASES)
    missing = next(r for r in rows if r["method"] == "cmrfm" and r["contrast"] == "T1w")
    assert (missing["pattern"], missing["R"]) == ("Uniform", "24")  # filled from the baselines' file name

    problems = _read_csv(out / "problems.csv")
    kinds = {(p["method"], p["kind"]) for p in problems}
    assert kinds == {("cmrfm", "missing"), ("cmrfm", "extra"), ("cmrfm", "shape_mismatch")}
    extra_row = next(p for p in problems if p["kind"] == "extra")
    assert "P009" in extra_row["path"] and "Extra file submitted" in extra_row["message"]

    # results.json: the organisers' shape for the first method; missing and mismatched files count 0.
    res = json.loads((out / "results.json").read_text())
    assert res["submission_status"] == "SCORED" and res["Num_Files"] == "2/4"
    psnr = {r["contrast"]: float(r["psnr"]) for r in rows if r["method"] == "cmrfm" and r["status"] == "ok"}
    assert res["Center001_UIH_30T_umr780_Num"] == "1/2"
    assert res["Center001_UIH_30T_umr780_PSNR_adj"] == pytest.approx(round(psnr["cine_sax"] / 2, 4), abs=1e-4)
    assert res["Center002_Siemens_30T_Vida_PSNR_adj"] == pytest.approx(round(psnr["cine_lax_4ch"] / 2, 4), abs=1e-4)
    assert res["Mean_of_all_centers_PSNR_adj"] == pytest.approx((psnr["cine_sax"] + psnr["cine_lax_4ch"]) / 4, abs=2e-4)
    allres = json.loads((out / "results_all.json").read_text())
    assert set(allres) == {"cmrfm", "zero_filled", "classical"}
    assert allres["zero_filled"]["TaskR1"]["val2025"]["Num_Files"] == "4/4"
    assert set(allres["zero_filled"]["TaskR1"]) == {"val2025", "test2025", "clean"}

    groups = _read_csv(out / "per_center_vendor.csv")
    assert {(g["method"], g["center"]) for g in groups} >= {("classical", "Center001"), ("cmrfm", "Center002")}
    cpr = _read_csv(out / "per_contrast_pattern_R.csv")
    assert {(c["contrast"], c["pattern"], c["R"]) for c in cpr if c["method"] == "zero_filled"} == {
        (stem, pattern, str(R)) for *_, stem, _, pattern, R in CASES}

    # A reference tree of img4ranking files (the organisers' ground truth) scores the same.
    gt2 = tmp_path / "gt_img4ranking"
    for mod, center, vendor, patient, stem, *_ in CASES:
        save_img4ranking(_dir(gt2, mod, "FullSample", center, vendor, patient) / f"{stem}.mat", refs[stem])
    ev = evaluate.run(evaluate.EvalConfig(recon=str(zf), recon_name="zero_filled", reference=str(gt2),
                                          out=str(tmp_path / "eval2"), figures=False, progress=False))
    again = {r.case.stem: r.score.psnr for r in ev.rows}
    first = {r["contrast"]: float(r["psnr"]) for r in rows if r["method"] == "zero_filled"}
    assert again == pytest.approx(first, abs=1e-6)


def test_nested_trees_and_duplicates_are_refused_not_counted(tmp_path: Path) -> None:
    """Issue 11 item 3: a baseline tree written inside the submission tree (`rs/_zero_filled`) made
    evaluation count 4 of 2 files (SSIM_adj 2.0). Nested and duplicate files are now named in
    problems.csv, never scored, and the exit status is 3; the scores equal those of the clean tree."""
    root = tmp_path / "val"
    kus = make_tree(root)
    rs = tmp_path / "rs"
    assert reconstruct_tree(ReconstructConfig(input=str(root), out=str(rs), progress=False,
                                              classical=ClassicalConfig(method="zero_filled"))) == []
    clean = evaluate.run(evaluate.EvalConfig(recon=str(rs), reference=str(root), out=str(tmp_path / "e0"),
                                             figures=False, progress=False))
    shutil.copytree(rs, tmp_path / "copy")
    shutil.move(str(tmp_path / "copy"), rs / "_zero_filled")     # the nested baseline of the report
    dup = submission_path(kus["cine_sax"], rs)
    shutil.copy(dup, dup.with_name("cine_sax_kus_ktRadial16.mat"))  # a second file for the same case
    out = tmp_path / "eval"
    rc = evaluate.main(["--set", f"recon={rs}", "--set", f"reference={root}", "--set", f"out={out}",
                        "--set", "progress=false", "--set", "figures=false"])
    assert rc == 3
    res = json.loads((out / "results.json").read_text())
    n = len(CASES)
    assert res["Num_Files"] == f"{n}/{n}"
    assert float(res["Mean_of_all_centers_SSIM_adj"]) <= 1.0
    for key in ("Mean_of_all_centers_PSNR_adj", "Mean_of_all_centers_SSIM_adj"):
        assert float(res[key]) == pytest.approx(float(clean.results["cmrfm"]["TaskR1"][clean.primary][key]))
    problems = _read_csv(out / "problems.csv")
    nested = [p for p in problems if "_zero_filled" in p["path"]]
    assert len(nested) == n and all("unexpected file" in p["message"] for p in nested)
    assert any("duplicate" in p["message"] and "cine_sax_kus_ktRadial16" in p["path"] for p in problems)
    inside = evaluate.main(["--set", f"recon={rs}", "--set", f"reference={root}", "--set", f"out={rs}/eval",
                            "--set", "progress=false", "--set", "figures=false"])
    assert inside == 2 and not (rs / "eval").exists()          # tables would be extra files in the submission
