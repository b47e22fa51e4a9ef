"""PSNR / SSIM / NMSE exactly as the CMRxRecon2025 scorer computes them, and its aggregation.

Per file (docs/cmrxrecon.md §6.2, §6.5):
- both img4ranking arrays (MATLAB order, float32) must have the same shape, else the file scores NaN
  with the comment "Shape mismatch" (and is left out of the group means, i.e. counts as 0);
- the metrics are computed per 2-D image, looping over the trailing axes (frames for 3-D arrays,
  slices x frames for 4-D, and the test scorer's 5-D), and the file score is their mean;
- each 2-D image, reference and reconstruction separately, is `abs`-ed and divided by its own 99.5th
  percentile (`np.percentile`, linear interpolation, no clipping; a zero percentile leaves the image);
- PSNR and SSIM are scikit-image's with `data_range = max(normalised reference image)` (SSIM with its
  defaults: 7x7 uniform window, K1 0.01, K2 0.03, sample covariance); NMSE = ||ref - x||^2 / ||ref||^2.

The argument-order quirk: the scorer calls `calmetric(gt, recon)` on a function declared
`calmetric(pred_recon, gt_recon)`. In its 4-D (and test 5-D) branch that makes the *submission* the
"reference" (data_range and the NMSE denominator come from the submission); in its 3-D and 2-D
branches the ground truth is the reference. `challenge_exact=True` (default) reproduces that;
`challenge_exact=False` is the clean variant where the ground truth is always the reference.
(The *validation* scorer has no 2-D branch and would crash on a 2-D file; cmrfm scores it as the
test scorer does: one image, ground truth as reference.)

Aggregation (§6.3, `Val_Score2025.py`): files are grouped by (Center, Vendor);
`PSNR_adj = sum(PSNR of valid files) / expected count` (missing or failed files count 0), the same for
SSIM, `NMSE_adj = mean(NMSE of valid files) * (2 - submitted/expected)`, and the task summary
`Mean_of_all_centers_*_adj` is the unweighted mean over groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_WINDOW = 7  # skimage's default win_size; images smaller than this abort the official scorer


class MetricError(ValueError):
    """A file that cannot be scored; the message names the file and the problem."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class FileScore:
    """Mean metrics of one file over its 2-D images; `comment` is None for a valid score."""

    psnr: float
    ssim: float
    nmse: float
    n_images: int
    comment: str | None = None

    @property
    def valid(self) -> bool:
        return self.comment is None


def normalize_percentile(image: np.ndarray) -> np.ndarray:
    """|image| / its 99.5th percentile (linear interpolation, no clipping); unchanged |image| if that is 0."""
    data = np.abs(image)
    p = np.percentile(data, 99.5)
    if p == 0:
        return data
    # The scorer ran numpy 1.24, where float32 / scalar stays float32; numpy 2 would promote to
    # float64 (NEP 50). Cast the divisor to the image dtype to keep the scorer's precision.
    return data / np.asarray(p, dtype=data.dtype)


def image_metrics(reference: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """PSNR, SSIM, NMSE of one normalised 2-D pair; `reference` sets data_range and the NMSE denominator."""
    data_range = reference.max()
    with np.errstate(divide="ignore"):  # identical images: PSNR = inf, as the scorer reports
        psnr = peak_signal_noise_ratio(reference, test, data_range=data_range)
    ssim = structural_similarity(reference, test, data_range=data_range)
    nmse = np.linalg.norm(reference - test) ** 2 / np.linalg.norm(reference) ** 2
    return float(psnr), float(ssim), float(nmse)


def submission_is_reference(ndim: int, challenge_exact: bool) -> bool:
    """Whether the scorer takes the submission as the "reference" for an array of this rank."""
    return challenge_exact and ndim >= 4


def image_metric_arrays(
    recon: np.ndarray, gt: np.ndarray, challenge_exact: bool = True, name: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-2-D-image PSNR, SSIM, NMSE of img4ranking arrays of equal shape (sx, sy[, ...]).

    Returns three float64 arrays of shape `recon.shape[2:]` (shape () for a 2-D file).
    Raises MetricError (naming `name`) for a shape mismatch, a rank outside 2-5, or a side below 7.
    """
    recon = np.asarray(recon)
    gt = np.asarray(gt)
    if recon.shape != gt.shape:
        raise MetricError(name, f"Shape mismatch: reconstruction {recon.shape} vs reference {gt.shape}")
    if not 2 <= gt.ndim <= 5:
        raise MetricError(name, f"img4ranking must have 2 to 5 dimensions, got shape {gt.shape}")
    if min(gt.shape[:2]) < SSIM_WINDOW:
        raise MetricError(
            name,
            f"image {gt.shape[:2]} is smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window "
            "(the official scorer aborts on this file)",
        )
    swap = submission_is_reference(gt.ndim, challenge_exact)
    trailing = gt.shape[2:]
    out = [np.zeros(trailing, dtype=np.float64) for _ in range(3)]
    for idx in itertools.product(*(range(n) for n in trailing)):
        r = normalize_percentile(recon[(slice(None), slice(None), *idx)])
        g = normalize_percentile(gt[(slice(None), slice(None), *idx)])
        values = image_metrics(r, g) if swap else image_metrics(g, r)
        for arr, v in zip(out, values):
            arr[idx] = v
    return out[0], out[1], out[2]


def score_file(recon: np.ndarray, gt: np.ndarray, challenge_exact: bool = True, name: str = "") -> FileScore:
    """The file score: means over its 2-D images. A shape mismatch gives NaN and a comment, as the scorer.

    Other problems (rank, image below 7x7) raise MetricError naming `name`.
    """
    if np.shape(recon) != np.shape(gt):
        return FileScore(
            np.nan, np.nan, np.nan, 0,
            f"Shape mismatch: reconstruction {np.shape(recon)} vs reference {np.shape(gt)}",
        )
    psnr, ssim, nmse = image_metric_arrays(recon, gt, challenge_exact, name)
    return FileScore(float(np.mean(psnr)), float(np.mean(ssim)), float(np.mean(nmse)), int(psnr.size))


@dataclass(frozen=True)
class GroupSummary:
    """One (Center, Vendor) group of the aggregation."""

    center: str
    vendor: str
    expected: int  # reference files of the group
    submitted: int  # valid (scored) files of the group
    psnr_adj: float
    ssim_adj: float
    nmse_adj: float

    @property
    def key(self) -> str:
        """The scorer's group name "<Center>_<Vendor>"."""
        return f"{self.center}_{self.vendor}"


def _round4(x: float) -> float:
    # Python's round on a numpy float64 is numpy's rounding, which the organisers' script uses.
    return float(round(np.float64(x), 4))


def summarise_groups(
    scores: Iterable[tuple[tuple[str, str], FileScore]],
    expected: Mapping[tuple[str, str], int],
    challenge_exact: bool = True,
) -> list[GroupSummary]:
    """Per-group adjusted means.

    scores:   ((center, vendor), FileScore) for every reconstruction file scored (valid or not).
    expected: (center, vendor) -> number of reference files.
    challenge_exact: only groups with at least one valid file appear (the scorer groups the valid
      files), sorted by (center, vendor). Clean: every group of `expected` appears; a group with no
      valid file has PSNR_adj = SSIM_adj = 0 and NMSE_adj NaN.
    A group without reference files has expected 0 and NaN adjusted values (the scorer writes only
    its `_Num`).
    """
    by_group: dict[tuple[str, str], list[FileScore]] = {}
    for group, score in scores:
        if score.valid:
            by_group.setdefault(group, []).append(score)
    keys = set(by_group) if challenge_exact else set(by_group) | set(expected)
    out = []
    for group in sorted(keys):
        valid = by_group.get(group, [])
        n_exp = int(expected.get(group, 0))
        if n_exp and valid:
            psnr = float(np.sum([s.psnr for s in valid])) / n_exp
            ssim = float(np.sum([s.ssim for s in valid])) / n_exp
            nmse = float(np.mean([s.nmse for s in valid])) * (2 - len(valid) / n_exp)
        elif n_exp:
            psnr, ssim, nmse = 0.0, 0.0, float("nan")
        else:
            psnr = ssim = nmse = float("nan")
        out.append(GroupSummary(group[0], group[1], n_exp, len(valid), psnr, ssim, nmse))
    return out


def results_json(
    scores: Iterable[tuple[tuple[str, str], FileScore]],
    expected: Mapping[tuple[str, str], int],
    challenge_exact: bool = True,
    summary_name: str = "centers",
) -> dict[str, object]:
    """The organisers' `Result/results.json` content for one task.

    Keys, in the scorer's order: `submission_status`, `Num_Files` ("valid/expected"), then per group
    `<Center>_<Vendor>_Num`, `_PSNR_adj`, `_SSIM_adj`, `_NMSE_adj`, then
    `Mean_of_all_<summary_name>_{PSNR,SSIM,NMSE}_adj`. Values are rounded to 4 decimals in
    challenge-exact mode, as the scorer does.
    """
    scores = list(scores)
    groups = summarise_groups(scores, expected, challenge_exact)
    rnd = _round4 if challenge_exact else float
    n_valid = sum(1 for _, s in scores if s.valid)
    out: dict[str, object] = {
        "submission_status": "SCORED",
        "Num_Files": f"{n_valid}/{int(sum(expected.values()))}",
    }
    means: dict[str, list[float]] = {"PSNR": [], "SSIM": [], "NMSE": []}
    for g in groups:
        out[f"{g.key}_Num"] = f"{g.submitted}/{g.expected}"
        if not g.expected:
            continue
        for metric, value in (("PSNR", g.psnr_adj), ("SSIM", g.ssim_adj), ("NMSE", g.nmse_adj)):
            out[f"{g.key}_{metric}_adj"] = rnd(value)
            if not np.isnan(value):
                means[metric].append(value)
    for metric, values in means.items():
        out[f"Mean_of_all_{summary_name}_{metric}_adj"] = rnd(sum(values) / len(values)) if values else float("nan")
    return out
