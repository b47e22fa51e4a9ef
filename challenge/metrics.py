"""PSNR / SSIM / NMSE exactly as the two official CMRxRecon2025 scorers compute them, and their aggregation.

Two scorers (docs/cmrxrecon.md §6.2-6.3), both selectable with `scorer=`:
- "val2025": the validation scorer (CMRxRecon2025-snippets `evaluation-2025/Val_Score2025.py`);
- "test2025": the test-phase scorer that computed the final ranking (CMRx-evaluation-snippets
  `test-2025/Test_Score2025.py`). It `np.squeeze`s both arrays before anything else, so a
  `(x, y, 1, t)` or `(x, y, z, 1)` file goes through the 3-D branch and a `(x, y, 1, 1)` file the 2-D one,
  and it has a 5-D branch. The validation scorer has none: on a 5-D file it fails (its metric arrays are
  never assigned); cmrfm scores such a file as the test scorer does and says so in the file's note.

Per file, in both:
- both img4ranking arrays (MATLAB order) must have the same shape (after the squeeze, for test2025),
  else the file scores NaN with the comment "Shape mismatch" and is not a valid file;
- the metrics are computed per 2-D image over the trailing axes and the file score is their mean;
- each 2-D image, reference and reconstruction separately, is `abs`-ed and divided by its own 99.5th
  percentile (no clipping; a zero percentile leaves the image as it is). The percentile is the one the
  official environment's numpy 1.24 computes: linear interpolation in float64 between the two order
  statistics, their difference taken in the image dtype (`official_percentile`). numpy 2 computes it in
  float32 for float32 images, which moves PSNR by up to 1e-5 dB; casting it to an integer image dtype
  (what cmrfm did before) by up to 4e-3 dB. The division keeps float images in their dtype (numpy 1.24
  value-based casting) and gives float64 for integer images;
- PSNR and SSIM are scikit-image's with `data_range = max(normalised reference image)` (SSIM with its
  defaults: 7x7 uniform window, K1 0.01, K2 0.03, sample covariance); NMSE = ||ref - x||^2 / ||ref||^2,
  the norms squared in float64 (numpy 1.24 promoted a float32 or float16 scalar squared to float64).

The argument-order quirk: the scorers call `calmetric(gt, recon)` on a function declared
`calmetric(pred_recon, gt_recon)`. In the 4-D (and test 5-D) branch that makes the *submission* the
"reference" (data_range and the NMSE denominator come from the submission); in the 3-D and 2-D branches
the ground truth is the reference. `challenge_exact=True` (default) reproduces that;
`challenge_exact=False` is the clean variant: the ground truth is always the reference and nothing is
squeezed.

Aggregation (`process_task` in both scorers): files are grouped (TaskR1 by (Center, Manufacturer),
TaskR2/S1/S2 by disease, see `challenge.grouping`); a file is valid when it has no comment, NaN metrics
included. Per group with at least one valid file: `PSNR_adj = sum(PSNR) / expected count` (pandas' sum:
NaN counts as 0), the same for SSIM, `NMSE_adj = mean(NMSE) * (2 - valid/expected)` (pandas' mean: NaN
left out). `Mean_of_all_*_adj` is the unweighted mean over those groups, so a group with no valid file
drops out of the official headline (deleting a bad group raises it): `missing_groups` names them. The
clean summary counts such a group as PSNR 0, SSIM 0, NMSE 2 (an empty reconstruction's NMSE, 1, times
the missing-file factor 2), so it can only fall when results are missing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SCORERS = ("val2025", "test2025")

SSIM_WINDOW = 7  # skimage's default win_size; images smaller than this abort the official scorer


class MetricError(ValueError):
    """A file that cannot be scored; the message names the file and the problem."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class FileScore:
    """Mean metrics of one file over its 2-D images.

    `comment` is None for a valid file (what the scorers count), else why it is not scored. `note` says
    what is surprising about a valid score (NaN metric, a 5-D file the validation scorer fails on).
    """

    psnr: float
    ssim: float
    nmse: float
    n_images: int
    comment: str | None = None
    note: str | None = None

    @property
    def valid(self) -> bool:
        return self.comment is None

    @property
    def has_nan(self) -> bool:
        return any(math.isnan(v) for v in (self.psnr, self.ssim, self.nmse))

    @property
    def has_inf(self) -> bool:
        """An infinite metric other than the PSNR of identical images (+inf)."""
        return self.psnr == -math.inf or math.isinf(self.ssim) or math.isinf(self.nmse)


def official_percentile(image: np.ndarray) -> float:
    """`np.percentile(image, 99.5)` as numpy 1.24 (the official environment) computes it.

    Linear interpolation between the order statistics a = x[i] and b = x[i + 1] at the virtual index
    v = (n - 1) * 0.995: their difference is taken in the image dtype, the interpolation in float64,
    `a + d * g` below g = v - i = 0.5 and `b - d * (1 - g)` from 0.5 on. Any NaN gives NaN.
    """
    flat = np.ravel(np.asarray(image))
    n = flat.size
    if n == 0:
        raise ValueError("percentile of an empty image")
    virtual = (n - 1) * (99.5 / 100)
    if virtual >= n - 1:  # numpy puts both indexes on the last element (gamma is then irrelevant)
        lo = hi = n - 1
        gamma = virtual + 1
    else:
        lo = math.floor(virtual)
        hi = lo + 1
        gamma = virtual - lo
    part = np.partition(flat, sorted({0, lo, hi, n - 1}))
    if part.dtype.kind in "fc" and np.isnan(part[-1]):
        return math.nan
    a, b = part[lo], part[hi]
    with np.errstate(over="ignore", invalid="ignore"):
        diff = float(np.subtract(b, a))
    if gamma >= 0.5:
        return float(b) - diff * (1 - gamma)
    return float(a) + diff * gamma


def normalize_percentile(image: np.ndarray) -> np.ndarray:
    """|image| / its 99.5th percentile (no clipping); |image| unchanged if that percentile is 0.

    Float images stay in their dtype, the percentile rounded to it (numpy 1.24 value-based casting of a
    float64 scalar against a float array); integer images are divided in float64.
    """
    data = np.abs(np.asarray(image))
    if data.dtype.kind == "b":
        raise ValueError("boolean image: the official percentile fails on it (numpy bool subtract)")
    p = official_percentile(data)
    if p == 0:
        return data
    if data.dtype.kind == "f":
        return data / np.asarray(p, dtype=data.dtype)
    return data / np.float64(p)


def image_metrics(reference: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """PSNR, SSIM, NMSE of one normalised 2-D pair; `reference` sets data_range and the NMSE denominator."""
    data_range = float(reference.max())  # skimage 0.21 under numpy 1.24 squared it in float64
    with np.errstate(divide="ignore", invalid="ignore"):  # identical images: PSNR = inf, as the scorers report
        psnr = peak_signal_noise_ratio(reference, test, data_range=data_range)
        ssim = structural_similarity(reference, test, data_range=data_range)
        nmse = np.float64(np.linalg.norm(reference - test)) ** 2 / np.float64(np.linalg.norm(reference)) ** 2
    return float(psnr), float(ssim), float(nmse)


def submission_is_reference(ndim: int, challenge_exact: bool) -> bool:
    """Whether the scorers take the submission as the "reference" for an array of this rank (after squeeze)."""
    return challenge_exact and ndim >= 4


def scorer_arrays(
    recon: np.ndarray, gt: np.ndarray, scorer: str = "val2025", challenge_exact: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays as the scorer sees them: squeezed by the test scorer, as loaded otherwise.

    A 5-D pair of equal shape, which the validation scorer fails on, is seen as the test scorer sees it.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    recon, gt = np.asarray(recon), np.asarray(gt)
    if challenge_exact and (scorer == "test2025" or (gt.ndim == 5 and recon.shape == gt.shape)):
        return np.squeeze(recon), np.squeeze(gt)
    return recon, gt


def image_metric_arrays(
    recon: np.ndarray, gt: np.ndarray, challenge_exact: bool = True, name: str = "", scorer: str = "val2025"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-2-D-image PSNR, SSIM, NMSE of img4ranking arrays (sx, sy[, ...]) as `scorer` computes them.

    Returns three float64 arrays of the trailing shape of the arrays the scorer sees (shape () for a
    2-D file). Raises MetricError (naming `name`) for a shape mismatch, a rank the scorers have no branch
    for (below 2, above 5), an image side below 7 (skimage's SSIM raises and the official run stops) or
    a boolean image.
    """
    recon, gt = scorer_arrays(recon, gt, scorer, challenge_exact)
    if recon.shape != gt.shape:
        raise MetricError(name, f"Shape mismatch: reconstruction {recon.shape} vs reference {gt.shape}")
    if not 2 <= gt.ndim <= 5:
        raise MetricError(name, f"img4ranking of shape {gt.shape} has {gt.ndim} dimension(s) as the {scorer} "
                                "scorer sees it: it has no branch for that rank and fails")
    if min(gt.shape[:2]) < SSIM_WINDOW:
        raise MetricError(
            name,
            f"image {gt.shape[:2]} is smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window "
            "(the official scorer aborts on this file)",
        )
    swap = submission_is_reference(gt.ndim, challenge_exact)
    trailing = gt.shape[2:]
    out = [np.zeros(trailing, dtype=np.float64) for _ in range(3)]
    try:
        for idx in itertools.product(*(range(n) for n in trailing)):
            r = normalize_percentile(recon[(slice(None), slice(None), *idx)])
            g = normalize_percentile(gt[(slice(None), slice(None), *idx)])
            values = image_metrics(r, g) if swap else image_metrics(g, r)
            for arr, v in zip(out, values):
                arr[idx] = v
    except ValueError as exc:  # skimage / percentile refusals: named, not a crash of the run
        raise MetricError(name, str(exc)) from None
    return out[0], out[1], out[2]


def score_file(
    recon: np.ndarray, gt: np.ndarray, challenge_exact: bool = True, name: str = "", scorer: str = "val2025"
) -> FileScore:
    """The file score: means over its 2-D images, as `scorer` computes it (see the module docstring).

    A shape mismatch gives NaN and a comment, as the scorers do; other problems (rank, image below 7x7)
    raise MetricError naming `name`. A NaN metric is a valid file with a note (the scorers count it).
    """
    seen_recon, seen_gt = scorer_arrays(recon, gt, scorer, challenge_exact)
    if seen_recon.shape != seen_gt.shape:
        return FileScore(
            np.nan, np.nan, np.nan, 0,
            f"Shape mismatch: reconstruction {seen_recon.shape} vs reference {seen_gt.shape}"
            + (" (after np.squeeze, as the test scorer compares them)" if seen_gt.shape != np.shape(gt) else ""),
        )
    psnr, ssim, nmse = image_metric_arrays(recon, gt, challenge_exact, name, scorer)
    notes = []
    if challenge_exact and scorer == "val2025" and np.ndim(gt) == 5:
        notes.append("5-D img4ranking: the validation scorer has no 5-D branch and fails on this file; "
                     "scored as the test scorer does")
    score = FileScore(float(np.mean(psnr)), float(np.mean(ssim)), float(np.mean(nmse)), int(psnr.size))
    if score.has_nan:
        notes.append("NaN metric (e.g. an all-zero image): counted as the scorers' pandas sum/mean count it "
                     "(a valid file; 0 in the PSNR/SSIM sums, left out of the NMSE mean)")
    if score.has_inf:
        notes.append("infinite metric (e.g. an all-zero submission taken as the reference by the 4-D branch): "
                     "it propagates into the group sums and the headline as the scorers' pandas sums do")
    if notes:
        score = FileScore(score.psnr, score.ssim, score.nmse, score.n_images, None, "; ".join(notes))
    return score


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------

Group = tuple[str, ...]  # ("Center001", "UIH_30T_umr780") for TaskR1, ("Myocarditis",) for a disease


@dataclass(frozen=True)
class GroupSummary:
    """One group of the aggregation ((Center, Vendor) or a disease)."""

    group: Group
    expected: int  # reference files of the group
    submitted: int  # valid files of the group (NaN metrics included, as the scorers count them)
    psnr_adj: float
    ssim_adj: float
    nmse_adj: float

    @property
    def key(self) -> str:
        """The scorers' group name: "<Center>_<Vendor>" or the disease."""
        return "_".join(self.group)

    @property
    def center(self) -> str:
        return self.group[0]

    @property
    def vendor(self) -> str:
        return self.group[1] if len(self.group) > 1 else ""


def _round4(x: float) -> float:
    # Python's round on a numpy float64 is numpy's rounding, which the organisers' script uses.
    return float(round(np.float64(x), 4))


def _group_list(groups: Group | list[Group]) -> list[Group]:
    """A file belongs to one (Center, Vendor) group or to every disease of its patient."""
    return list(groups) if isinstance(groups, list) else [groups]


def _valid_by_group(scores: Iterable[tuple[Group | list[Group], FileScore]]) -> dict[Group, list[FileScore]]:
    by_group: dict[Group, list[FileScore]] = {}
    for groups, score in scores:
        if score.valid:
            for group in _group_list(groups):
                by_group.setdefault(group, []).append(score)
    return by_group


def missing_groups(
    scores: Iterable[tuple[Group | list[Group], FileScore]], expected: Mapping[Group, int]
) -> list[Group]:
    """Groups with reference files but no valid file: the official headline leaves them out."""
    have = _valid_by_group(scores)
    return sorted(g for g, n in expected.items() if n and g not in have)


def summarise_groups(
    scores: Iterable[tuple[Group | list[Group], FileScore]],
    expected: Mapping[Group, int],
    challenge_exact: bool = True,
) -> list[GroupSummary]:
    """Per-group adjusted means, sorted by group (pandas' groupby order).

    scores:   (group or [groups], FileScore) for every file scored (valid or not).
    expected: group -> number of reference files.
    challenge_exact: only groups with at least one valid file appear, as in `process_task`. Clean:
      every group of `expected` appears too; one with no valid file has PSNR_adj = SSIM_adj = 0 and
      NMSE_adj = 2. A group without reference files has expected 0 and NaN adjusted values (the scorers
      write only its `_Num`).
    """
    by_group = _valid_by_group(scores)
    keys = set(by_group) if challenge_exact else set(by_group) | {g for g, n in expected.items() if n}
    out = []
    for group in sorted(keys):
        valid = by_group.get(group, [])
        n_exp = int(expected.get(group, 0))
        if n_exp and valid:
            # pandas: Series.sum skips NaN (all NaN -> 0.0), Series.mean skips NaN (all NaN -> NaN)
            psnr = float(np.nansum([s.psnr for s in valid])) / n_exp
            ssim = float(np.nansum([s.ssim for s in valid])) / n_exp
            nmse_vals = [s.nmse for s in valid if not math.isnan(s.nmse)]
            nmse = (float(np.mean(nmse_vals)) if nmse_vals else math.nan) * (2 - len(valid) / n_exp)
        elif n_exp:
            psnr, ssim, nmse = 0.0, 0.0, 2.0
        else:
            psnr = ssim = nmse = math.nan
        out.append(GroupSummary(group, n_exp, len(valid), psnr, ssim, nmse))
    return out


def results_json(
    scores: Iterable[tuple[Group | list[Group], FileScore]],
    expected: Mapping[Group, int],
    challenge_exact: bool = True,
    summary_name: str = "centers",
    total: int | None = None,
) -> dict[str, object]:
    """The organisers' `Result/results.json` content for one task.

    Keys, in the scorers' order: `submission_status`, `Num_Files` ("valid/expected"), then per group
    `<group>_Num`, `_PSNR_adj`, `_SSIM_adj`, `_NMSE_adj`, then `Mean_of_all_<summary_name>_{PSNR,SSIM,
    NMSE}_adj` ("centers" for TaskR1, "diseases" for the others). Values are rounded to 4 decimals in
    challenge-exact mode, as the scorers do; a NaN group value makes the mean NaN there (Python's sum),
    and no group at all gives NaN where the scorers stop with ZeroDivisionError. `total`: reference files
    of the task (the `Num_Files` denominator; default the sum of `expected`, which counts a file twice
    when its patient has two diseases).
    """
    scores = list(scores)
    groups = summarise_groups(scores, expected, challenge_exact)
    rnd = _round4 if challenge_exact else float
    n_valid = sum(1 for _, s in scores if s.valid)
    out: dict[str, object] = {
        "submission_status": "SCORED",
        "Num_Files": f"{n_valid}/{int(sum(expected.values())) if total is None else total}",
    }
    means: dict[str, list[float]] = {"PSNR": [], "SSIM": [], "NMSE": []}
    for g in groups:
        out[f"{g.key}_Num"] = f"{g.submitted}/{g.expected}"
        if not g.expected:
            continue
        for metric, value in (("PSNR", g.psnr_adj), ("SSIM", g.ssim_adj), ("NMSE", g.nmse_adj)):
            out[f"{g.key}_{metric}_adj"] = rnd(value)
            means[metric].append(value)
    for metric, values in means.items():
        out[f"Mean_of_all_{summary_name}_{metric}_adj"] = rnd(sum(values) / len(values)) if values else math.nan
    return out
