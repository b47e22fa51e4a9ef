"""Both official scorers, per file, against an independent port of their code in this file.

`official_*` below re-implement, in the shape of the official code, `Evaluation.py` (`normalize_percentile`,
`calmetric` with its 2/3/4/5-D branches and argument order), the loaders' `np.squeeze` of the test
scorer, and numpy 1.24's `np.percentile` (the official environment): linear interpolation between two
order statistics found by sorting, difference in the data dtype, lerp in float64 with the `t >= 0.5`
branch. None of it calls challenge.metrics. Every per-file metric must agree to 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from challenge.metrics import FileScore, official_percentile, results_json, score_file


# ------------------------------------------------------------------ independent port of the official code


def np124_percentile_995(x: np.ndarray) -> float:
    """numpy 1.24 `np.percentile(x, 99.5)` (method "linear"), from its `_quantile` / `_lerp`."""
    s = np.sort(np.asarray(x).reshape(-1))  # NaN sorts last
    if s.dtype.kind == "f" and np.isnan(s[-1]):
        return math.nan
    v = np.float64(s.size - 1) * np.float64(0.995)
    if v >= s.size - 1:
        prev_i = next_i = s.size - 1
        t = v - (-1)  # numpy sets both indexes to -1: gamma = v + 1
    else:
        prev_i = int(np.floor(v))
        next_i = prev_i + 1
        t = v - prev_i
    a, b = s[prev_i], s[next_i]
    d = b - a  # numpy scalars: the data dtype
    out = np.float64(a) + np.float64(d) * np.float64(t)
    if t >= 0.5:
        out = np.float64(b) - np.float64(d) * (np.float64(1) - np.float64(t))
    return float(out)


def official_normalize(array: np.ndarray) -> np.ndarray:
    data = np.abs(array)
    p = np124_percentile_995(data)
    if p == 0:
        return data
    # numpy 1.24: float array / float64 scalar stays in the array's float type; int / float64 -> float64
    return data / (data.dtype.type(p) if data.dtype.kind == "f" else np.float64(p))


def official_psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(gt, pred, data_range=float(gt.max())))


def official_ssim(gt: np.ndarray, pred: np.ndarray) -> float:
    return float(structural_similarity(gt, pred, data_range=float(gt.max())))


def official_nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(np.linalg.norm(gt - pred)) ** 2 / np.float64(np.linalg.norm(gt)) ** 2)


def official_calmetric(pred_recon: np.ndarray, gt_recon: np.ndarray) -> tuple[float, float, float]:
    """`calmetric` of the test scorer (the validation one is the same without the 5-D branch); the
    scorers call it as calmetric(gt, recon), so `pred_recon` is the ground truth. Returns the file means."""
    out: list[tuple[float, float, float]] = []
    if gt_recon.ndim in (4, 5):  # psnr(gt_normalized, pred_normalized): the submission is the reference
        for idx in np.ndindex(*gt_recon.shape[2:]):
            pred = official_normalize(pred_recon[(slice(None), slice(None), *idx)])
            gt = official_normalize(gt_recon[(slice(None), slice(None), *idx)])
            out.append((official_psnr(gt, pred), official_ssim(gt, pred), official_nmse(gt, pred)))
    elif gt_recon.ndim == 3:  # psnr(pred_normalized, gt_normalized): the ground truth is the reference
        for j in range(gt_recon.shape[-1]):
            pred = official_normalize(pred_recon[:, :, j])
            gt = official_normalize(gt_recon[:, :, j])
            out.append((official_psnr(pred, gt), official_ssim(pred, gt), official_nmse(pred, gt)))
    elif gt_recon.ndim == 2:
        pred, gt = official_normalize(pred_recon), official_normalize(gt_recon)
        out.append((official_psnr(pred, gt), official_ssim(pred, gt), official_nmse(pred, gt)))
    else:
        raise AssertionError("no branch")
    arr = np.array(out)
    return float(np.mean(arr[:, 0])), float(np.mean(arr[:, 1])), float(np.mean(arr[:, 2]))


def official_file(gt: np.ndarray, recon: np.ndarray, scorer: str) -> tuple[float, float, float] | str:
    """`compute_metrics(gt, recon)` of Val_Score2025.py / Test_Score2025.py."""
    if scorer == "test2025":
        gt, recon = np.squeeze(gt), np.squeeze(recon)
    if gt.shape != recon.shape:
        return "Shape mismatch"
    return official_calmetric(gt, recon)


# ------------------------------------------------------------------------------------------- cases

SHAPES = [
    (9, 11), (13, 7),
    (9, 11, 3), (9, 11, 1),
    (9, 11, 2, 3), (9, 11, 1, 3), (9, 11, 2, 1), (9, 11, 1, 1),
    (9, 11, 2, 2, 2), (9, 11, 1, 2, 3), (9, 11, 2, 1, 2), (9, 11, 2, 2, 1), (9, 11, 1, 1, 2), (9, 11, 1, 1, 1),
    # singletons in the image axes: the test scorer's squeeze makes other 2-D images of them, which it
    # scores when both sides are >= 7; the validation scorer's SSIM stops on the 1-pixel side
    (1, 20, 9, 8), (9, 1, 11, 8), (1, 9, 11), (1, 12, 1, 9, 10),
]
DTYPES = [np.float16, np.float32, np.float64, np.int16, np.uint8, np.int32]


def _pair(shape: tuple[int, ...], dtype: type, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.gamma(2.0, 1.0, shape) * 37.3
    rec = np.abs(gt + rng.standard_normal(shape) * 9.1) * 1.7
    if np.dtype(dtype).kind in "iu":
        return gt.round().astype(dtype), rec.round().clip(0, np.iinfo(dtype).max).astype(dtype)
    return gt.astype(dtype), rec.astype(dtype)


def _assert_same(ours: FileScore, theirs: tuple[float, float, float]) -> None:
    for a, b in zip((ours.psnr, ours.ssim, ours.nmse), theirs):
        if math.isnan(b):
            assert math.isnan(a)
        else:
            assert a == pytest.approx(b, abs=1e-6, rel=0)


@pytest.mark.parametrize("scorer", ["val2025", "test2025"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_rank_dtype_and_singleton_matches_the_official_code(
    shape: tuple[int, ...], dtype: type, scorer: str
) -> None:
    gt, rec = _pair(shape, dtype, seed=len(shape) * 7 + shape[-1])
    effective = "test2025" if (scorer == "val2025" and gt.ndim == 5) else scorer
    if min((np.squeeze(gt) if effective == "test2025" else gt).shape[:2]) < 7:
        from challenge.metrics import MetricError

        with pytest.raises(MetricError, match="f.mat.*SSIM window"):  # the official run stops here
            score_file(rec, gt, challenge_exact=True, name="f.mat", scorer=scorer)
        return
    ours = score_file(rec, gt, challenge_exact=True, name="f.mat", scorer=scorer)
    theirs = official_file(gt, rec, effective)
    assert ours.valid and not isinstance(theirs, str)
    _assert_same(ours, theirs)
    if scorer == "val2025" and gt.ndim == 5:
        assert "no 5-D branch" in (ours.note or "")  # said per file, scored as the test scorer does


def test_the_test_scorer_squeezes_and_flips_the_reference() -> None:
    """A single-slice cine (x, y, 1, t): the validation scorer takes the 4-D branch (submission as
    reference), the test scorer squeezes to 3-D (ground truth as reference): different numbers."""
    gt, rec = _pair((15, 20, 1, 3), np.float32, seed=3)
    val = score_file(rec, gt, scorer="val2025")
    test = score_file(rec, gt, scorer="test2025")
    _assert_same(val, official_file(gt, rec, "val2025"))
    _assert_same(test, official_file(gt, rec, "test2025"))
    assert abs(val.psnr - test.psnr) > 1e-3
    # what cmrfm computed before (no squeeze): the 4-D branch under both scorers
    assert test.psnr != pytest.approx(official_calmetric(gt, rec)[0], abs=1e-6)


def test_shape_mismatch_depends_on_the_squeeze() -> None:
    gt, rec = _pair((15, 20, 3), np.float32, seed=4)
    assert not score_file(rec[:, :, None], gt, scorer="val2025").valid  # (15,20,1,3) vs (15,20,3)
    ok = score_file(rec[:, :, None], gt, scorer="test2025")
    assert ok.valid
    _assert_same(ok, official_file(gt, rec[:, :, None], "test2025"))


def test_percentile_in_float64_as_numpy_124() -> None:
    """numpy 2 computes the float32 percentile in float32; the official environment in float64."""
    rng = np.random.default_rng(0)
    differs = 0
    for seed in range(200):
        img = (np.random.default_rng(seed).gamma(2.0, 1.0, (31, 17)) * 100).astype(np.float32)
        ours = official_percentile(img)
        assert ours == np124_percentile_995(img)
        differs += ours != float(np.percentile(img, 99.5))
    assert differs > 0, "no case where numpy 2's float32 percentile differs: the test shows nothing"
    ints = rng.permutation(np.arange(1, 201, dtype=np.int16)).reshape(10, 20)  # v = 198.005: 199 + 0.005
    p = official_percentile(ints)
    assert p == np124_percentile_995(ints) == pytest.approx(199.005, abs=1e-9)  # truncating to 199 was wrong
    f64 = rng.random((40, 41))
    assert official_percentile(f64) == float(np.percentile(f64, 99.5))  # float64: numpy 2 agrees


def test_integer_images_are_not_truncated() -> None:
    gt, rec = _pair((19, 23, 2), np.int16, seed=11)
    ours = score_file(rec, gt, scorer="val2025")
    _assert_same(ours, official_file(gt, rec, "val2025"))
    # the old behaviour: percentile cast to int16 before dividing
    def trunc_norm(a: np.ndarray) -> np.ndarray:
        d = np.abs(a)
        return d / np.asarray(np.percentile(d, 99.5), dtype=d.dtype)
    old = np.mean([official_psnr(trunc_norm(gt[:, :, j]), trunc_norm(rec[:, :, j])) for j in range(2)])
    assert abs(old - ours.psnr) > 1e-5


def test_zero_percentile_and_nan() -> None:
    gt, rec = _pair((20, 20, 2), np.float32, seed=5)
    sparse = np.zeros_like(gt)
    sparse[3, 4, :] = 5.0  # 1 of 400 pixels: the 99.5th percentile is 0, the image is left as it is
    for scorer in ("val2025", "test2025"):
        s = score_file(sparse, gt, scorer=scorer)
        _assert_same(s, official_file(gt, sparse, scorer))
    nan = rec.copy()
    nan[0, 0, 1] = np.nan
    s = score_file(nan, gt, scorer="val2025")
    assert s.valid and s.has_nan and "NaN metric" in (s.note or "")
    zero = score_file(np.zeros_like(gt), np.zeros_like(gt), scorer="test2025")
    assert zero.valid and zero.has_nan


def test_ranks_the_scorers_have_no_branch_for_are_named() -> None:
    gt, rec = _pair((1, 20, 3, 3), np.float32, seed=6)  # the test scorer squeezes to (20, 3, 3): 3-wide images
    from challenge.metrics import MetricError

    with pytest.raises(MetricError, match="case.mat.*SSIM window"):
        score_file(rec, gt, name="case.mat", scorer="test2025")
    with pytest.raises(MetricError, match="case.mat.*no branch"):
        score_file(rec[:, :, :1, :1], gt[:, :, :1, :1], name="case.mat", scorer="test2025")  # squeezed to 1-D


# ------------------------------------------------------------------------------------- aggregation


def pandas_like_group(scores: list[tuple[float, float, float]], n_expected: int) -> tuple[float, float, float]:
    """`group['PSNR'].sum() / n`, `group['NMSE'].mean() * (2 - len/n)`: pandas skips NaN in both."""
    ps = sum(p for p, _, _ in scores if not math.isnan(p)) / n_expected
    ss = sum(s for _, s, _ in scores if not math.isnan(s)) / n_expected
    nm = [n for _, _, n in scores if not math.isnan(n)]
    return ps, ss, (sum(nm) / len(nm) if nm else math.nan) * (2 - len(scores) / n_expected)


def test_nan_files_and_a_whole_missing_group() -> None:
    fs = lambda p, s, n: FileScore(p, s, n, 1)  # noqa: E731
    a, b, c = ("Center001", "UIH"), ("Center002", "GE"), ("Center003", "Siemens")
    scores = [(a, fs(30.0, 0.9, 0.02)), (a, fs(math.nan, math.nan, math.nan)), (b, fs(20.0, 0.8, 0.04)),
              (c, FileScore(math.nan, math.nan, math.nan, 0, "Shape mismatch"))]
    expected = {a: 3, b: 1, c: 2}
    exact = results_json(scores, expected, challenge_exact=True)
    ga = pandas_like_group([(30.0, 0.9, 0.02), (math.nan, math.nan, math.nan)], 3)
    gb = pandas_like_group([(20.0, 0.8, 0.04)], 1)
    assert exact["Num_Files"] == "3/6"  # the NaN file is a valid file
    assert exact["Center001_UIH_Num"] == "2/3"
    assert exact["Center001_UIH_PSNR_adj"] == round(ga[0], 4)
    assert exact["Center001_UIH_NMSE_adj"] == round(ga[2], 4)
    assert "Center003_Siemens_Num" not in exact  # no valid file: the group drops out ...
    assert exact["Mean_of_all_centers_PSNR_adj"] == round((ga[0] + gb[0]) / 2, 4)  # ... of the headline
    clean = results_json(scores, expected, challenge_exact=False)
    assert clean["Center003_Siemens_PSNR_adj"] == 0.0 and clean["Center003_Siemens_NMSE_adj"] == 2.0
    assert clean["Mean_of_all_centers_PSNR_adj"] == pytest.approx((ga[0] + gb[0] + 0.0) / 3)
    # deleting the bad group's files raises the official headline, never the clean one
    assert exact["Mean_of_all_centers_PSNR_adj"] > clean["Mean_of_all_centers_PSNR_adj"]
