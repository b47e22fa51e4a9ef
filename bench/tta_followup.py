"""Test-time adaptation again on a finished bench/label_efficiency.py run, without pretraining anew.

    python bench/tta_followup.py --set run=OUT --set corpus_dir=DIR [--set variant=lora:r16:conv@1e-2]

Loads the run's SSL backbone (<run>/pretrained.safetensors) and one of its arm-(a) adapters
(<run>/adapters/<best>/cine_<pattern>, merged), rebuilds the same held-out and unlike-matrix problems,
and runs label_efficiency's own `test_time` (same windows, guard and SSDU split) and `score` for each
(set, start, N) of `runs`. Written to <run>/tta_followup.json (atomically) and printed as a table.
Used for the third pass of BENCHMARKS.md (issue 14): the new test-time default on the sets the run
had measured only with the old one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script from any directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file

from launch.cli import parse_args
from launch.outputs import write_atomic
from models.adapters import load_adapter, merge_adapters
from models.sizes import build_model


@dataclass
class FollowupConfig:
    run: str = ""
    """The label_efficiency run folder (its `out`)."""
    corpus_dir: str = ""
    """The run's corpus_dir (its training and held-out files)."""
    best: str = "2_s1"
    """Adapter folder of the run used as "best adapter" (<labelled>_s<seed>)."""
    pattern: str = "ktGaussian"
    variant: str = "lora:r16:conv@1e-2"
    adapt_windows: int = 4
    runs: list[str] = field(default_factory=lambda: [
        "held-out/pretrained/0", "held-out/pretrained/20", "held-out/best adapter/0", "held-out/best adapter/50",
        "unlike-matrix/pretrained/0", "unlike-matrix/pretrained/20", "unlike-matrix/pretrained/50",
        "unlike-matrix/best adapter/0", "unlike-matrix/best adapter/50"])
    """"<set>/<start>/<N>": set "held-out" or "unlike-matrix", start "pretrained" or "best adapter"."""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(FollowupConfig, argv, description="test-time adaptation on a finished label_efficiency run")
    from bench import label_efficiency as LE  # noqa: PLC0415 (bench/quality.py is loaded on import)

    torch.set_num_threads(1)
    out = Path(cfg.run)
    le = LE.LabelEfficiencyConfig(out=str(out), corpus_dir=cfg.corpus_dir, adapt_windows=cfg.adapt_windows)
    qc = LE.quality_config(le)
    _, eval_cases = LE.Q.corpus(qc, out)
    pretrained = build_model(le.model)
    pretrained.load_state_dict(load_file(str(out / "pretrained.safetensors")))
    best = copy.deepcopy(pretrained)
    load_adapter(best, out / "adapters" / cfg.best / f"cine_{cfg.pattern}")
    merge_adapters(best)
    sets = {"held-out": LE.eval_problems(eval_cases, cfg.pattern, le.R, qc),
            "unlike-matrix": LE.eval_problems(LE.unlike_matrix_cases(le, qc, out), cfg.pattern, le.R, qc)}
    starts = {"pretrained": pretrained.eval(), "best adapter": best.eval()}
    variant, lr = LE.parse_adapt_variant(cfg.variant, 16, le.adapt_lr)
    rows = []
    for spec in cfg.runs:
        set_name, start, n = spec.split("/")
        fset, base, steps = sets[set_name], starts[start], int(n)
        t0 = time.perf_counter()
        model, info = LE.test_time(base, fset, steps, le, variant, lr) if steps else (base, {"status": "none"})
        took = time.perf_counter() - t0
        curve = info.get("heldout", [])
        rows.append({"set": set_name, "start": start, "steps": steps, "variant": cfg.variant,
                     "status": info["status"], "adapt_s_per_file": took / len(fset),
                     "ssdu_before": curve[0][1] if curve else None,
                     "ssdu_best": min(c[1] for c in curve) if curve else None, "best_step": info.get("best_step", 0),
                     **LE.score(lambda p: LE.Q.cmrfm_image(model, p), fset)})
        write_atomic(out / "tta_followup.json", json.dumps({"config": dataclasses.asdict(cfg), "rows": rows}, indent=2) + "\n")
        r = rows[-1]
        print(f"| {set_name} | {start} | {steps} | {r['psnr']:.2f} / {r['ssim']:.4f} | {r['status']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
