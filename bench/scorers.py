"""How far apart the two official scorers, and cmrfm's scorer before issue 12, are on one tree.

    python bench/scorers.py [--out runs/bench_scorers] [--val-patients 2] [--seed 0]

Writes a small synthetic validation tree (every 2025 file type, shards.synthetic), reconstructs it
zero-filled (finetune.classical) and scores every file side by side, in one run:
- val2025 vs test2025 (challenge.metrics): the test scorer squeezes, so single-slice files `(x, y, 1, t)`
  and single-frame files `(x, y, z, 1)` go through its 3-D branch (ground truth as the reference);
- "before": what cmrfm reported as challenge-exact before (the validation scorer's branches for every
  file, no squeeze, numpy 2's float32 percentile), against test2025;
- the percentile alone: numpy 2's `np.percentile` (float32 for float32 images) vs numpy 1.24's float64;
- integer images (the same images saved as uint16): the percentile truncated to the dtype vs not;
- scoring speed (files per second, both scorers).
Prints the figures and writes `<out>/scorers.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from challenge import metrics  # noqa: E402
from challenge.submission import load_img4ranking, submission_path  # noqa: E402
from finetune.classical import reconstruct_tree  # noqa: E402
from finetune.evaluate import index_recon, index_reference, reference_image  # noqa: E402
from finetune.settings import ClassicalConfig, ReconstructConfig  # noqa: E402
from shards.synthetic import SyntheticConfig, write_corpus  # noqa: E402


def numpy2_percentile(image: np.ndarray) -> float:
    """cmrfm before issue 12: numpy's own percentile (float32 arithmetic for float32 data in numpy 2)."""
    return float(np.percentile(image, 99.5))


def truncating_normalize(image: np.ndarray) -> np.ndarray:
    """cmrfm before issue 12 on integer images: the percentile cast to the image dtype."""
    data = np.abs(image)
    p = np.percentile(data, 99.5)
    return data if p == 0 else data / np.asarray(p, dtype=data.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_scorers")
    ap.add_argument("--val-patients", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "ChallengeData_ValSet").is_dir():
        cfg = SyntheticConfig(out=str(data), seed=args.seed, workers=2, patients_per_scanner=1, files_per_patient=1,
                              val_patients_per_scanner=args.val_patients, val_files_per_patient=0, nz_max=3,
                              patients_2024=0, fastmri_files=0)
        write_corpus(cfg)
    recon = out / "zero_filled"
    if not recon.is_dir():
        reconstruct_tree(ReconstructConfig(input=str(data / "ChallengeData_ValSet"), out=str(recon), progress=False,
                                           classical=ClassicalConfig(method="zero_filled")))
    refs, _ = index_reference(data / "ChallengeData_ValSet")
    found, _ = index_recon(recon)
    pairs = []
    for case, path in found:
        ref_case, ref_path = refs[case.match_key]
        pairs.append((case, np.asarray(load_img4ranking(path)), reference_image(ref_path, ref_case)))

    rows = []
    t0 = time.perf_counter()
    for case, rec, ref in pairs:
        val = metrics.score_file(rec, ref, scorer="val2025")
        test = metrics.score_file(rec, ref, scorer="test2025")
        rows.append({"file": case.file_name, "stem": case.stem, "shape": list(ref.shape),
                     "squeezed": list(np.squeeze(ref).shape), "val2025": val.psnr, "test2025": test.psnr})
    seconds = time.perf_counter() - t0

    official = metrics.official_percentile
    metrics.official_percentile = numpy2_percentile  # cmrfm's percentile before issue 12
    try:
        for row, (case, rec, ref) in zip(rows, pairs):
            row["before"] = metrics.score_file(rec, ref, scorer="val2025").psnr
    finally:
        metrics.official_percentile = official

    for row, (case, rec, ref) in zip(rows, pairs):
        scale = 4000.0 / max(float(ref.max()), 1e-12)
        r16, g16 = (rec * scale).round().astype(np.uint16), (ref * scale).round().astype(np.uint16)
        row["uint16"] = metrics.score_file(r16, g16, scorer="test2025").psnr
        saved = metrics.normalize_percentile
        metrics.normalize_percentile = truncating_normalize
        try:
            row["uint16_truncated"] = metrics.score_file(r16, g16, scorer="test2025").psnr
        finally:
            metrics.normalize_percentile = saved

    def max_abs(a: str, b: str, sel=lambda r: True) -> float:
        d = [abs(r[a] - r[b]) for r in rows if sel(r) and np.isfinite(r[a]) and np.isfinite(r[b])]
        return float(max(d)) if d else 0.0

    flipped = lambda r: len(r["squeezed"]) != len(r["shape"])  # noqa: E731
    summary = {
        "files": len(rows),
        "files_squeezed_to_another_branch": sum(flipped(r) for r in rows),
        "max_dB_val2025_vs_test2025_squeezed_files": max_abs("val2025", "test2025", flipped),
        "max_dB_val2025_vs_test2025_other_files": max_abs("val2025", "test2025", lambda r: not flipped(r)),
        "max_dB_before_vs_test2025": max_abs("before", "test2025"),
        "max_dB_numpy2_float32_percentile_vs_numpy124": max_abs("before", "val2025"),
        "max_dB_uint16_truncated_percentile": max_abs("uint16", "uint16_truncated"),
        "files_per_s_both_scorers": len(rows) / max(seconds, 1e-9),
        "seed": args.seed,
    }
    for k, v in summary.items():
        print(f"{k:48s} {v:.6g}" if isinstance(v, float) else f"{k:48s} {v}")
    worst = sorted(rows, key=lambda r: -abs(r["val2025"] - r["test2025"]))[:5]
    for r in worst:
        print(f"  {r['file']:40s} {str(tuple(r['shape'])):22s} val2025 {r['val2025']:.4f}  test2025 {r['test2025']:.4f}")
    (out / "scorers.json").write_text(json.dumps({"summary": summary, "files": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
