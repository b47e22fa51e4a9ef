"""Test-time adaptation again on a bench/label_efficiency.py run, without pretraining anew.

    python bench/tta_followup.py --set run=OUT --set corpus_dir=DIR [--set variant=lora:r16:conv@1e-2]
        [--set runs=held-out/pretrained/50,held-out/best adapter/50/a1,held-out/stack/50]

Loads the run's SSL backbone (<run>/pretrained.safetensors) and one of its arm-(a) adapters
(<run>/adapters/<best>/cine_<pattern>, merged), rebuilds the same held-out and unlike-matrix problems,
and runs label_efficiency's own `test_time` (same windows, guard and SSDU split) and `score` for each
entry of `runs`: "<set>/<start>/<N>[/a<anchor>][/d<max drift>]", start "pretrained" (the LoRA on (f),
AdaptConfig.start = "backbone"), "best adapter" (on the supervised adapter, start = "adapter") or
"stack" (adapted on (f), its weight change then added to the supervised model); a<w> and d<x> set
AdaptConfig.anchor and max_drift. A run folder without the backbone or the adapter (e.g. /tmp wiped)
gets them rebuilt first, with label_efficiency's seeds and order (`pretrain_steps`, `finetune_steps`).
Written to <run>/tta_followup.json (atomically) and printed as a table. Used for the third, fourth and
fifth passes of BENCHMARKS.md (issue 14; the fifth rebuilt its `best` adapter with `adapter_lr`).
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
from safetensors.torch import load_file, save_file

from launch.cli import parse_args
from launch.outputs import write_atomic
from models.adapters import load_adapter, merge_adapters, save_adapter
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
    tiny: bool = False
    """label_efficiency's tiny setting (small corpus and model): the suite's end-to-end run."""
    variant: str = "lora:r16:conv@1e-2"
    adapt_windows: int = 4
    pretrain_steps: int = 300
    finetune_steps: int = 60
    """Only used when the run folder lacks them: SSL steps for <run>/pretrained.safetensors and supervised
    steps for the `best` adapter (`adapter`, on the first <labelled> training files, seed <seed>), built
    as bench/label_efficiency.py builds them (same seeds and order), e.g. after /tmp was wiped."""
    adapter: str = "lora:r16:conv"
    """Variant of the `best` adapter when it has to be trained (label_efficiency's arm (a))."""
    adapter_lr: float = 0.0
    """Learning rate of the `best` adapter when it has to be trained (0 = label_efficiency's `lr_adapter`,
    3e-3; the fourth pass found 1e-2 best for the conv LoRA, BENCHMARKS.md issue 14)."""
    runs: list[str] = field(default_factory=lambda: [
        "held-out/pretrained/0", "held-out/pretrained/20", "held-out/best adapter/0", "held-out/best adapter/50",
        "unlike-matrix/pretrained/0", "unlike-matrix/pretrained/20", "unlike-matrix/pretrained/50",
        "unlike-matrix/best adapter/0", "unlike-matrix/best adapter/50"])
    """"<set>/<start>/<N>[/a<anchor>][/d<max drift>]" (`parse_run`)."""
    ablation: list[str] = field(default_factory=list)
    """Supervised rows run after the test-time ones, each on the first `ablation_labelled` training files,
    seed `ablation_seed`, `finetune_steps` steps, scored on the held-out set: "full[@<lr>]" (every parameter,
    lr default label_efficiency's: arm (c); the first full row is the one shares are printed against) or an
    adapter "<variant>[@<lr>]" (label_efficiency.parse_adapt_variant; rank default 8, lr default
    label_efficiency's lr_adapter)."""
    ablation_labelled: str = "all"
    ablation_seed: int = 0


@dataclass(frozen=True)
class Run:
    """One row: "<set>/<start>/<N>[/a<anchor>][/d<max_drift>]", e.g. "held-out/best adapter/50/a1"."""

    set: str
    start: str
    steps: int
    anchor: float = 0.0
    max_drift: float = 0.0


#: where the test-time LoRA sits: (f); the best supervised adapter (merged); "stack": adapted on (f), then
#: its weight change added to the best adapter's merged model (no second adaptation)
STARTS = ("pretrained", "best adapter", "stack")


def parse_run(spec: str) -> Run:
    """The `runs` entry -> Run (SystemExit naming the entry when it does not parse)."""
    parts = spec.split("/")
    try:
        options = {p[0]: float(p[1:]) for p in parts[3:]}
        run = Run(parts[0], parts[1], int(parts[2]), options.pop("a", 0.0), options.pop("d", 0.0))
        ok = not options and run.set in ("held-out", "unlike-matrix") and run.start in STARTS and run.steps >= 0
    except (IndexError, ValueError):
        ok = False
    if not ok:
        raise SystemExit(f"bench/tta_followup.py: run {spec!r}: expected <held-out|unlike-matrix>/<{'|'.join(STARTS)}>/"
                         "<N>[/a<anchor weight>][/d<max drift>]")
    return run


def stacked(best: torch.nn.Module, pretrained: torch.nn.Module, adapted: torch.nn.Module) -> torch.nn.Module:
    """`best` plus the weight change test-time adaptation made to (f) (`adapted` is (f) with its LoRA merged)."""
    model = copy.deepcopy(best)
    delta = {k: adapted.state_dict()[k] - v for k, v in pretrained.state_dict().items()}
    model.load_state_dict({k: v + delta[k] for k, v in best.state_dict().items()})
    return model.eval()


def row_of(run: Run, info: dict, s_per_file: float, variant: str, scores: dict) -> dict:
    """One JSON row: the run, the guard's held-out SSDU loss and image drift (before -> kept), the scores."""
    curve, moved, kept = info.get("heldout", []), dict(info.get("drift", [])), info.get("best_step", 0)
    return {**dataclasses.asdict(run), "variant": variant, "status": info["status"], "adapt_s_per_file": s_per_file,
            "ssdu_before": curve[0][1] if curve else None, "ssdu_kept": dict(curve).get(kept) if curve else None,
            "best_step": kept, "drift_kept": moved.get(kept), "drift_last": info["drift"][-1][1] if moved else None,
            **scores}


def table_line(r: dict, rows: list[dict]) -> str:
    """| set | start | N | anchor | max drift | PSNR / SSIM | dB vs the start's N = 0 | SSDU before -> kept (step) |
    drift kept / last | s/file | guard | (stack: vs the supervised adapter's N = 0)."""
    zero_of = "best adapter" if r["start"] == "stack" else r["start"]
    zero = next((z["psnr"] for z in rows if z["set"] == r["set"] and z["start"] == zero_of and z["steps"] == 0), None)
    delta = "-" if zero is None or not r["steps"] else f"{r['psnr'] - zero:+.2f}"
    ssdu = "-" if r["ssdu_before"] is None else f"{r['ssdu_before']:.5f} -> {r['ssdu_kept']:.5f} ({r['best_step']})"
    moved = "-" if r["drift_kept"] is None else f"{r['drift_kept']:.4f} / {r['drift_last']:.4f}"
    return (f"| {r['set']} | {r['start']} | {r['steps']} | {r['anchor']:g} | {r['max_drift']:g} | {r['psnr']:.2f} / "
            f"{r['ssim']:.4f} | {delta} | {ssdu} | {moved} | {r['adapt_s_per_file']:.1f} | {r['status']} |")


def save(out: Path, cfg: FollowupConfig, rows: list[dict], ablation: list[dict]) -> None:
    write_atomic(out / "tta_followup.json", json.dumps({"config": dataclasses.asdict(cfg), "rows": rows,
                                                        "ablation": ablation}, indent=2) + "\n")


def full_lr(spec: str) -> float:
    """"full" -> 0.0 (label_efficiency's lr), "full@<lr>" -> lr (SystemExit naming the entry otherwise)."""
    _, _, lr = spec.partition("@")
    try:
        value = float(lr) if lr else 0.0
    except ValueError:
        value = -1.0
    if value < 0 or (lr and value == 0):
        raise SystemExit(f"bench/tta_followup.py: ablation entry {spec!r}: expected full or full@<lr > 0>")
    return value


def ablation_rows(cfg: FollowupConfig, le, qc, pretrained: torch.nn.Module, train_cases: list, held: list,
                  specs: list[tuple[str, tuple | float]], out: Path, rows: list[dict]) -> list[dict]:
    """The supervised rows of `ablation` (see FollowupConfig), each with its gain over (f) and, once a "full"
    row has run, its share of full fine-tuning's gain."""
    from bench import label_efficiency as LE  # noqa: PLC0415

    subset = train_cases if cfg.ablation_labelled == "all" else train_cases[:int(cfg.ablation_labelled)]
    n_params = sum(p.numel() for p in pretrained.parameters())
    f = LE.score(lambda p: LE.Q.cmrfm_image(pretrained, p), held)["psnr"]
    zero = LE.score(lambda p: LE.Q.classical_image("zero_filled", p), held)  # same problems as an earlier run?
    print(f"[tta_followup] held-out: zero-filled {zero['psnr']:.2f} / {zero['ssim']:.4f}, pretrained (f) {f:.2f}",
          flush=True)
    done: list[dict] = []
    for spec, parsed in specs:
        t0 = time.perf_counter()
        if isinstance(parsed, float):  # "full[@lr]"
            lr = parsed or le.lr
            model, stats = LE.train_arm(pretrained, subset, cfg.pattern, cfg.ablation_seed, "full", qc,
                                        dataclasses.replace(le, lr=lr))
        else:
            variant, lr = parsed
            model, stats = LE.train_arm(pretrained, subset, cfg.pattern, cfg.ablation_seed, "adapter", qc,
                                        dataclasses.replace(le, lr_adapter=lr), variant)
        done.append({"spec": spec, "lr": lr, "labelled": len(subset), "seed": cfg.ablation_seed, "steps": stats["steps"],
                     "trainable": stats["trainable"], "share": stats["trainable"] / n_params, "pretrained_psnr": f,
                     "zero_filled_psnr": zero["psnr"],
                     "train_s": time.perf_counter() - t0, **LE.score(lambda p: LE.Q.cmrfm_image(model, p), held)})
        save(out, cfg, rows, done)
        full = next((r["psnr"] - f for r in done if r["spec"].startswith("full")), None)  # the first full row
        r = done[-1]
        share = "-" if full is None or full <= 0 else f"{100 * (r['psnr'] - f) / full:.0f}%"
        print(f"| `{spec}` | {lr:g} | {r['psnr']:.2f} / {r['ssim']:.4f} | {r['psnr'] - f:+.2f} | {share} | "
              f"{r['trainable']:,} | {100 * r['share']:.3f}% | {r['steps']} |", flush=True)
    return done


def prepare(cfg: FollowupConfig, le, qc, out: Path, train_cases: list) -> None:
    """Build the SSL backbone and the `best` adapter when the run folder lacks them, in
    label_efficiency.run's order and seeds (manual_seed(seed) before build_model; train_arm seeds itself),
    so a rebuilt run reproduces the original's (f) and (a) rather than a new draw."""
    from bench import label_efficiency as LE  # noqa: PLC0415

    weights = out / "pretrained.safetensors"
    if not weights.is_file():
        torch.manual_seed(le.seed)
        model = build_model(le.model)
        stats = LE.Q.train_ssl(model, LE.Q.ProblemSampler(train_cases, qc, le.seed + 2), qc, le.pretrain_steps)
        print(f"[tta_followup] SSL pretraining: {stats['steps']} steps in {stats['seconds']:.0f} s", flush=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        write_atomic(weights, lambda path: save_file(state, str(path)))
    folder = out / "adapters" / cfg.best / f"cine_{cfg.pattern}"
    if not folder.is_dir():
        labelled, seed = cfg.best.split("_s")
        subset = train_cases if labelled == "all" else train_cases[:int(labelled)]
        base = build_model(le.model)
        base.load_state_dict(load_file(str(weights)))
        train = dataclasses.replace(le, lr_adapter=cfg.adapter_lr or le.lr_adapter)
        model, stats = LE.train_arm(base.eval(), subset, cfg.pattern, int(seed), "adapter", qc, train,
                                    LE.parse_variant(cfg.adapter, le.adapter_rank))
        print(f"[tta_followup] adapter {cfg.best} ({cfg.adapter}, lr {train.lr_adapter:g}): {stats['steps']} steps",
              flush=True)
        save_adapter(model, folder, {"contrast": "cine", "pattern": cfg.pattern, "labelled_files": len(subset),
                                     "variant": cfg.adapter, "lr": train.lr_adapter})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(FollowupConfig, argv, description="test-time adaptation on a finished label_efficiency run")
    from bench import label_efficiency as LE  # noqa: PLC0415 (bench/quality.py is loaded on import)

    runs = [parse_run(spec) for spec in cfg.runs]  # a bad entry stops the run before any work
    ablation = [(spec, full_lr(spec) if spec.split("@")[0] == "full" else
                 LE.parse_adapt_variant(spec, 8, LE.LabelEfficiencyConfig.lr_adapter)) for spec in cfg.ablation]
    if not cfg.run:
        raise SystemExit("bench/tta_followup.py: set run=<the label_efficiency run folder (built when empty)>")
    torch.set_num_threads(1)
    out = Path(cfg.run)
    le = LE.tiny_settings(LE.LabelEfficiencyConfig(
        out=str(out), corpus_dir=cfg.corpus_dir, adapt_windows=cfg.adapt_windows, tiny=cfg.tiny,
        pretrain_steps=cfg.pretrain_steps, finetune_steps=cfg.finetune_steps))
    qc = LE.quality_config(le)
    train_cases, eval_cases = LE.Q.corpus(qc, out)
    matrix_cases = LE.unlike_matrix_cases(le, qc, out)
    prepare(cfg, le, qc, out, train_cases)
    pretrained = build_model(le.model)
    pretrained.load_state_dict(load_file(str(out / "pretrained.safetensors")))
    best = copy.deepcopy(pretrained)
    load_adapter(best, out / "adapters" / cfg.best / f"cine_{cfg.pattern}")
    merge_adapters(best)
    sets = {"held-out": LE.eval_problems(eval_cases, cfg.pattern, le.R, qc),
            "unlike-matrix": LE.eval_problems(matrix_cases, cfg.pattern, le.R, qc)}
    starts = {"pretrained": pretrained.eval(), "best adapter": best.eval()}
    variant, lr = LE.parse_adapt_variant(cfg.variant, 16, le.adapt_lr)
    rows: list[dict] = []
    cache: dict[tuple, tuple[torch.nn.Module, dict, float]] = {}  # (set, N, anchor, drift) from (f): for "stack"
    for run in runs:
        fset, steps = sets[run.set], run.steps
        t0 = time.perf_counter()
        if run.start == "stack":  # the LoRA adapted on (f), its weight change added to the supervised model's
            key = (run.set, steps, run.anchor, run.max_drift)
            if key not in cache:
                cache[key] = (*LE.test_time(pretrained, fset, steps, le, variant, lr, run.anchor, run.max_drift),
                              time.perf_counter() - t0)
            adapted, info, took = cache[key]
            model = stacked(best, pretrained, adapted)
        elif steps:
            model, info = LE.test_time(starts[run.start], fset, steps, le, variant, lr, run.anchor, run.max_drift)
            took = time.perf_counter() - t0
            if run.start == "pretrained":
                cache[(run.set, steps, run.anchor, run.max_drift)] = (model, info, took)
        else:
            model, info, took = starts[run.start], {"status": "none"}, 0.0
        rows.append(row_of(run, info, took / len(fset), cfg.variant,
                           LE.score(lambda p: LE.Q.cmrfm_image(model, p), fset)))
        save(out, cfg, rows, [])
        print(table_line(rows[-1], rows), flush=True)
    if ablation:
        ablation_rows(cfg, le, qc, pretrained, train_cases, sets["held-out"], ablation, out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
