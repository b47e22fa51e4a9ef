"""Challenge-exact metrics: percentile normalisation, skimage PSNR/SSIM, NMSE, argument-order quirk, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from challenge.metrics import (
    FileScore, MetricError, image_metric_arrays, normalize_percentile, results_json, score_file, summarise_groups,
)


def _ones_with_bump(d: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """20x20 ones (99.5th percentile 1) and the same with one pixel raised by d (percentile still 1)."""
    gt = np.ones((20, 20), dtype=np.float32)
    rec = gt.copy()
    rec[7, 9] += d
    assert np.percentile(rec, 99.5) == 1.0
    return gt, rec


def test_normalize_percentile() -> None:
    rng = np.random.default_rng(1)
    img = rng.standard_normal((30, 40)) + 1j * rng.standard_normal((30, 40))
    np.testing.assert_allclose(normalize_percentile(img), np.abs(img) / np.percentile(np.abs(img), 99.5))
    assert normalize_percentile(img).max() > 1  # no clipping
    zero = np.zeros((8, 8))
    assert np.array_equal(normalize_percentile(zero), zero)  # zero percentile: left as it is


def test_hand_computed_psnr_nmse_and_the_argument_order_quirk() -> None:
    gt, rec = _ones_with_bump(0.5)
    gt_ref_psnr = 10 * math.log10(1.0**2 / (0.25 / 400))  # data_range from the ground truth (max 1)
    sub_ref_psnr = 10 * math.log10(1.5**2 / (0.25 / 400))  # data_range from the submission (max 1.5)
    assert gt_ref_psnr != pytest.approx(sub_ref_psnr)

    # 3-D (and 2-D) branch: ground truth is the reference, in both modes.
    s3 = score_file(rec[:, :, None], gt[:, :, None], challenge_exact=True)
    assert s3.psnr == pytest.approx(gt_ref_psnr, abs=1e-6)
    assert s3.nmse == pytest.approx(0.25 / 400, rel=1e-5)
    s2 = score_file(rec, gt, challenge_exact=True)
    assert s2.psnr == pytest.approx(gt_ref_psnr, abs=1e-6) and s2.n_images == 1

    # 4-D branch: challenge_exact takes the submission as the reference; clean does not.
    s4 = score_file(rec[:, :, None, None], gt[:, :, None, None], challenge_exact=True)
    assert s4.psnr == pytest.approx(sub_ref_psnr, abs=1e-6)
    assert s4.nmse == pytest.approx(0.25 / (399 + 1.5**2), rel=1e-5)
    c4 = score_file(rec[:, :, None, None], gt[:, :, None, None], challenge_exact=False)
    assert c4.psnr == pytest.approx(gt_ref_psnr, abs=1e-6)
    assert c4.nmse == pytest.approx(0.25 / 400, rel=1e-5)
    # SSIM's data_range follows the same switch.
    assert s4.ssim == pytest.approx(structural_similarity(rec, gt, data_range=1.5), abs=1e-12)
    assert c4.ssim == pytest.approx(structural_similarity(gt, rec, data_range=1.0), abs=1e-12)
    assert s4.ssim != pytest.approx(c4.ssim)


def test_matches_skimage_per_image_and_file_mean() -> None:
    rng = np.random.default_rng(2)
    gt = rng.random((24, 30, 2, 3)).astype(np.float32) * 1000
    rec = (gt + rng.standard_normal(gt.shape).astype(np.float32) * 50) * 3.0  # scale is normalised away
    psnr, ssim, nmse = image_metric_arrays(rec, gt, challenge_exact=False)
    assert psnr.shape == ssim.shape == nmse.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            g = np.abs(gt[:, :, i, j]) / np.percentile(np.abs(gt[:, :, i, j]), 99.5)
            r = np.abs(rec[:, :, i, j]) / np.percentile(np.abs(rec[:, :, i, j]), 99.5)
            assert psnr[i, j] == pytest.approx(peak_signal_noise_ratio(g, r, data_range=g.max()), abs=1e-9)
            assert ssim[i, j] == pytest.approx(structural_similarity(g, r, data_range=g.max()), abs=1e-9)
            assert nmse[i, j] == pytest.approx(np.linalg.norm(g - r) ** 2 / np.linalg.norm(g) ** 2, rel=1e-5)
    f = score_file(rec, gt, challenge_exact=False)
    assert f.psnr == pytest.approx(psnr.mean()) and f.n_images == 6 and f.valid
    # Per-image normalisation: a positive rescaling of one image changes nothing.
    rec2 = rec.copy()
    rec2[:, :, 1, 2] *= 7.0
    assert score_file(rec2, gt, challenge_exact=True).psnr == pytest.approx(score_file(rec, gt).psnr, abs=1e-4)


def test_bad_inputs() -> None:
    gt = np.ones((20, 20, 3), dtype=np.float32)
    mismatch = score_file(np.ones((20, 21, 3), dtype=np.float32), gt)
    assert not mismatch.valid and math.isnan(mismatch.psnr) and "Shape mismatch" in mismatch.comment
    with pytest.raises(MetricError, match=r"case_7\.mat.*SSIM window"):
        score_file(np.ones((6, 20, 3)), np.ones((6, 20, 3)), name="case_7.mat")
    assert score_file(gt * 2, gt).psnr == math.inf  # identical after normalisation


def _fs(psnr: float, ssim: float = 0.9, nmse: float = 0.01) -> FileScore:
    return FileScore(psnr, ssim, nmse, 6)


def test_aggregation_counts_missing_as_zero() -> None:
    bad = FileScore(math.nan, math.nan, math.nan, 0, "Shape mismatch")
    scores = [
        (("Center001", "UIH_30T_umr780"), _fs(30.0, 0.9, 0.02)),  # 1 of 2 expected: the other missing
        (("Center002", "Siemens_30T_Vida"), _fs(40.0, 0.8, 0.01)),
        (("Center002", "Siemens_30T_Vida"), _fs(20.0, 0.6, 0.03)),
        (("Center005", "UIH_15T_umr670"), bad),  # only a failed file: the scorer drops the group
    ]
    expected = {("Center001", "UIH_30T_umr780"): 2, ("Center002", "Siemens_30T_Vida"): 2,
                ("Center005", "UIH_15T_umr670"): 1}
    res = results_json(scores, expected, challenge_exact=True)
    assert list(res)[:2] == ["submission_status", "Num_Files"] and res["Num_Files"] == "3/5"
    assert res["Center001_UIH_30T_umr780_Num"] == "1/2"
    assert res["Center001_UIH_30T_umr780_PSNR_adj"] == 15.0  # 30 / 2: the missing file counts 0
    assert res["Center001_UIH_30T_umr780_SSIM_adj"] == 0.45
    assert res["Center001_UIH_30T_umr780_NMSE_adj"] == 0.03  # 0.02 * (2 - 1/2)
    assert res["Center002_Siemens_30T_Vida_PSNR_adj"] == 30.0
    assert res["Center002_Siemens_30T_Vida_NMSE_adj"] == 0.02
    assert "Center005_UIH_15T_umr670_Num" not in res  # no valid file: absent, as in Val_Score2025.py
    assert res["Mean_of_all_centers_PSNR_adj"] == 22.5
    assert res["Mean_of_all_centers_SSIM_adj"] == round((0.45 + 0.7) / 2, 4)

    clean = results_json(scores, expected, challenge_exact=False)
    assert clean["Center005_UIH_15T_umr670_PSNR_adj"] == 0.0  # clean: the failed group counts, as 0
    assert clean["Mean_of_all_centers_PSNR_adj"] == pytest.approx(15.0)
    groups = summarise_groups(scores, expected, challenge_exact=False)
    assert [g.key for g in groups] == ["Center001_UIH_30T_umr780", "Center002_Siemens_30T_Vida",
                                       "Center005_UIH_15T_umr670"]
    assert [g.submitted for g in groups] == [1, 2, 0]
