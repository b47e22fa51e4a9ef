"""The foundation-model claim, measured on the synthetic corpus: what SSL pretraining buys an adapter.

    python bench/foundation_gain.py [--set finetune_steps=30 --set size=tiny ...]

A center and scanner (`held_out`) appear in no training data (neither pretraining nor fine-tuning).
Pretraining (SSDU, `pretrain/run.py`, one process) sees every training scan, unlabelled; the
fine-tuning arms see only the labelled subset (cine of `labelled_centers`), one run per sampling
pattern, all with the same step budget and batch:

    (a) SSL-pretrained backbone + LoRA adapter       (finetune.train, the cmrfm path)
    (b) the same architecture from scratch            (run.from_scratch: random init, all parameters)
    (c) full fine-tuning of the pretrained backbone   (run.full_finetune)
    (d) zero-filled                                   (finetune.classical.zero_filled)
    (e) classical ESPIRiT + CG-SENSE                  (finetune.classical, sigpy)
    (f) the pretrained backbone, no fine-tuning       (the reference point of "fine-tuning gain")

Evaluation: every cine reference of the held-out scanner, retrospectively undersampled with each
pattern at R 8/16/24 (challenge.masks, ACS 20), reconstructed on the img4ranking slices and frames,
scored with challenge.metrics.score_file (clean variant: reference as reference, 99.5th-percentile
normalisation, on the official crop). Prints a markdown table (PSNR/SSIM by pattern and R), the
trainable parameters and step time of each arm, the three goals, the seeds and the command.
Everything is measured side by side in one run; `out` keeps the corpus, runs and a results.json.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script from any directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator

from finetune.classical import reconstruct_slice as classical_slice
from finetune.classical import zero_filled
from challenge.metrics import score_file
from challenge.ranking import crop_selected, img4ranking_from_kspace, select_frames, select_slices
from finetune.reconstruct import reconstruct_slice
from finetune.settings import ClassicalConfig, FinetuneConfig
from finetune.train import train
from launch.cli import config_differences, config_to_dict, load_config, parse_args
from models.adapters import load_adapter, merge_adapters
from pretrain.checkpoint import load_backbone
from pretrain.settings import PretrainConfig
from shards.convert import ConvertConfig, convert
from shards.layout import parse_scanner
from challenge.masks import make_mask
from shards.manifest import Manifest
from shards.matfile import read_kspace
from shards.synthetic import SyntheticConfig, write_corpus

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = ("Uniform", "ktGaussian", "ktRadial")
RATES = (8, 16, 24)


@dataclass
class BenchConfig:
    """Sizes and budgets of the foundation-gain benchmark (defaults: ~15 min on 2 CPU cores)."""

    out: str = "out/bench_foundation"
    seed: int = 0
    size: str = "tiny"
    """Model size (models.sizes.SIZES) of every arm."""
    train_scanners: list[str] = field(default_factory=lambda: [
        "Center001/UIH_30T_umr780", "Center002/Siemens_30T_CIMA.X", "Center005/UIH_15T_umr670",
        "Center007/Siemens_15T_Sola"])
    held_out: str = "Center012/Philips_30T_IngeniaCX"
    """Center/scanner of the evaluation data; in no training data."""
    labelled_centers: list[str] = field(default_factory=lambda: ["Center001", "Center007"])
    """Centers whose cine scans are labelled (fine-tuning data); pretraining uses every training center."""
    patients_per_scanner: int = 2
    eval_patients: int = 2
    ny: list[int] = field(default_factory=lambda: [48, 56])
    """Phase-encode range: big enough that ACS 20 leaves real undersampling, small enough for CPUs."""
    nx: list[int] = field(default_factory=lambda: [64, 72])
    coils: int = 6
    pretrain_steps: int = 600
    finetune_steps: int = 40
    micro_batch: int = 2
    lr_adapter: float = 1e-2
    lr_full: float = 1e-3
    adapter_rank: int = 1
    adapter_targets: str = r".*blocks\.\d+\.(attn\.qkv|attn\.proj)"
    """LoRA on attention only at rank 1: under 1% of the tiny model's parameters."""
    eval_frames: int = 3


def corpus(cfg: BenchConfig, work: Path) -> tuple[Path, Path]:
    """Synthetic corpus + shards (training scanners only in training; the held-out one only in validation).

    Both are reused from an earlier run under `out` only when the config that made them is this one
    (shards.synthetic refuses a corpus of another config; `reuse_or_refuse` checks the shards)."""
    data = work / "data"
    write_corpus(SyntheticConfig(
        out=str(data), seed=cfg.seed, train_scanners=cfg.train_scanners, val_scanners=[cfg.held_out],
        patients_per_scanner=cfg.patients_per_scanner, val_patients_per_scanner=cfg.eval_patients,
        files_per_patient=3, val_files_per_patient=1, ny_min=cfg.ny[0], ny_max=cfg.ny[1], nx_min=cfg.nx[0],
        nx_max=cfg.nx[1], nz_max=2, coils=cfg.coils, patients_2024=0, fastmri_files=0))
    shards = work / "shards"
    want = ConvertConfig(input=str(data), out=str(shards), shard_samples=4, progress=False)
    if reuse_or_refuse(shards / "manifest.json", lambda: Manifest.read(shards).config, config_to_dict(want),
                       ignore=("progress", "workers", "input", "out")):
        if Manifest.read(shards).input != str(data.resolve()):
            raise SystemExit(f"{shards}: converted from {Manifest.read(shards).input}, not {data.resolve()}; "
                             f"use another out")
    else:
        convert(want)
    return data, shards


def reuse_or_refuse(marker: Path, recorded, wanted: dict, ignore: tuple[str, ...] = ()) -> bool:
    """True when `marker` exists and the config recorded with it (`recorded()`) equals `wanted`;
    False when there is nothing to reuse; exits naming the differences otherwise (a benchmark must
    never measure an output another config made while saying it measured this one)."""
    if not marker.exists():
        return False
    diffs = config_differences(recorded(), wanted, ignore)
    if diffs:
        raise SystemExit(f"{marker.parent}: made with another config ({'; '.join(diffs[:5])}); "
                         f"use another --set out=... or remove it")
    return True


def pretrain_command(cfg: BenchConfig, shards: Path, run_dir: Path) -> list[str]:
    return ["--config", str(ROOT / "configs/pretrain_tiny.toml"), "--set", f"data.shards={shards}",
            "--set", f"run.dir={run_dir}", "--set", f"model.size={cfg.size}", "--set", f"run.steps={cfg.pretrain_steps}",
            "--set", f"run.seed={cfg.seed}", "--set", "log.eval_shards=", "--set", f"data.micro_batch={cfg.micro_batch}",
            "--set", f"checkpoint.every={cfg.pretrain_steps}"]


def pretrain(cfg: BenchConfig, shards: Path, work: Path) -> tuple[Path, float]:
    """SSDU pretraining in one process (pretrain/run.py); returns (run dir, seconds). A backbone under
    `out` is reused only when its run's config.toml is the config this benchmark would run."""
    run_dir = work / "pretrain"
    t0 = time.perf_counter()
    argv = pretrain_command(cfg, shards, run_dir)
    sets = [argv[i + 1] for i in range(2, len(argv), 2)]
    wanted = config_to_dict(load_config(PretrainConfig, argv[1], sets))
    same = reuse_or_refuse(run_dir / "config.toml",
                           lambda: config_to_dict(load_config(PretrainConfig, run_dir / "config.toml")), wanted)
    if not (same and (run_dir / "backbone.safetensors").exists()):   # same config, unfinished: resumes
        subprocess.run([sys.executable, str(ROOT / "pretrain/run.py"), *argv], check=True, cwd=ROOT)
    return run_dir, time.perf_counter() - t0


def arm_config(cfg: BenchConfig, shards: Path, backbone: Path, work: Path, arm: str, pattern: str) -> FinetuneConfig:
    base = load_config(FinetuneConfig, ROOT / "configs/finetune_tiny.toml")
    excluded = sorted({s.split("/")[0] for s in cfg.train_scanners} - set(cfg.labelled_centers))
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, shards=str(shards), micro_batch=cfg.micro_batch, seed=cfg.seed),
        adapter=dataclasses.replace(base.adapter, contrast="cine", pattern=pattern, rank=cfg.adapter_rank,
                                    alpha=2.0 * cfg.adapter_rank, targets=cfg.adapter_targets),
        optim=dataclasses.replace(base.optim, lr=cfg.lr_adapter if arm == "adapter" else cfg.lr_full),
        run=dataclasses.replace(base.run, backbone=str(backbone), adapters=str(work / arm), dir=str(work / "runs" / arm / pattern),
                                steps=cfg.finetune_steps, seed=cfg.seed, full_finetune=arm == "full",
                                from_scratch=arm == "scratch", exclude_centers=excluded, progress=False,
                                checkpoint_every=0, resume=False, tensorboard=False),
    )


def eval_cases(data: Path) -> list[tuple[Path, np.ndarray]]:
    """(path, fully sampled k-space (nt, nz, nc, ny, nx)) of every cine reference of the held-out scanner."""
    refs = sorted(p for p in data.rglob("FullSample_TaskR1/**/cine*.mat"))
    return [(p, read_kspace(p)) for p in refs]


def score(method, cases, pattern: str, R: int, seed: int) -> tuple[float, float]:
    """Mean PSNR, SSIM of `method(kus_slice (nt, C, Y, X), mask (nt, Y, X), meta, frames) -> (F, Y, X)`."""
    psnrs, ssims = [], []
    for path, k in cases:
        nt, nz, _, ny, nx = k.shape
        mask = make_mask(pattern, R, nt, ny, nx, seed=seed)
        frames, slices = select_frames(nt, path.stem), select_slices(nz)
        vendor, field_t, _ = parse_scanner(path.parent.parent.name)
        meta = {"modality": "Cine", "view": path.stem.partition("_")[2], "pattern": pattern, "R": R,
                "vendor": vendor, "field_T": field_t}
        img = np.stack([method(k[:, z] * mask[:, None], mask, meta, frames) for z in slices], axis=1)
        s = score_file(crop_selected(img), img4ranking_from_kspace(k, path.stem), challenge_exact=False)
        psnrs.append(s.psnr)
        ssims.append(s.ssim)
    return float(np.mean(psnrs)), float(np.mean(ssims))


def model_method(model, frames_in: int):
    return lambda kus, mask, meta, frames: reconstruct_slice(model, kus, mask, frames, meta, frames_in, 4, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(BenchConfig, argv, description="foundation-model gain benchmark")
    torch.manual_seed(cfg.seed)
    work = Path(cfg.out)
    t_all = time.perf_counter()
    data, shards = corpus(cfg, work)
    backbone, t_pre = pretrain(cfg, shards, work)
    acc = Accelerator(cpu=True)
    arms = ("adapter", "scratch", "full")
    models: dict[tuple[str, str], torch.nn.Module] = {}
    cost: dict[str, dict[str, float]] = {a: {"trainable": 0, "total": 0, "step_s": []} for a in arms}
    for arm in arms:
        for pattern in PATTERNS:
            res = train(arm_config(cfg, shards, backbone, work, arm, pattern), acc)
            cost[arm]["trainable"], cost[arm]["total"] = res.trainable, res.total
            cost[arm]["step_s"].append(res.step_time_s)
            if arm == "adapter":
                model = load_backbone(backbone)
                load_adapter(model, res.output)
                merge_adapters(model)
            else:
                model = load_backbone(res.output)
            models[(arm, pattern)] = model.eval()
    frames_in = load_config(FinetuneConfig, ROOT / "configs/finetune_tiny.toml").data.frames
    bare = load_backbone(backbone).eval()
    classical = ClassicalConfig(method="sense")
    cases = eval_cases(data)
    if not cases:
        raise SystemExit(f"{data}: no held-out cine reference to evaluate")
    rows = []
    for pattern in PATTERNS:
        for R in RATES:
            row = {"pattern": pattern, "R": R}
            for arm in arms:
                row[arm] = score(model_method(models[(arm, pattern)], frames_in), cases, pattern, R, cfg.seed)
            row["backbone"] = score(model_method(bare, frames_in), cases, pattern, R, cfg.seed)
            row["zero_filled"] = score(lambda kus, m, meta, fr: np.abs(zero_filled(kus, m))[fr], cases, pattern, R, cfg.seed)
            row["sense"] = score(lambda kus, m, meta, fr: np.abs(classical_slice(kus[fr], m[fr], classical)), cases,
                                 pattern, R, cfg.seed)
            rows.append(row)
            print(f"[bench] {pattern} R{R}: " + ", ".join(f"{k} {v[0]:.2f}" for k, v in row.items()
                                                          if isinstance(v, tuple)), file=sys.stderr)
    report(cfg, rows, cost, t_pre, time.perf_counter() - t_all, len(cases), work)
    return 0


def report(cfg: BenchConfig, rows: list[dict], cost: dict, t_pre: float, t_all: float, n_cases: int, work: Path) -> None:
    cols = [("adapter", "(a) SSL + adapter"), ("scratch", "(b) scratch"), ("full", "(c) full FT"),
            ("zero_filled", "(d) zero-filled"), ("sense", "(e) CG-SENSE"), ("backbone", "(f) SSL, no FT")]
    lines = ["| pattern | R | " + " | ".join(name for _, name in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['R']} | " + " | ".join(f"{r[k][0]:.2f} / {r[k][1]:.4f}" for k, _ in cols) + " |")
    mean = {k: (np.mean([r[k][0] for r in rows]), np.mean([r[k][1] for r in rows])) for k, _ in cols}
    lines.append("| **mean** | | " + " | ".join(f"**{mean[k][0]:.2f} / {mean[k][1]:.4f}**" for k, _ in cols) + " |")
    a_minus_b = mean["adapter"][0] - mean["scratch"][0]
    gain_a, gain_c = mean["adapter"][0] - mean["backbone"][0], mean["full"][0] - mean["backbone"][0]
    ratio = gain_a / gain_c if gain_c > 0 else float("nan")
    params = cost["adapter"]["trainable"] / max(cost["full"]["trainable"], 1)
    ahead = all(r["adapter"][0] > r["sense"][0] for r in rows)
    print("\nPSNR (dB) / SSIM on the held-out " + cfg.held_out + f" cine references ({n_cases} files), clean metric, "
          "official crop, slices and frames\n")
    print("\n".join(lines))
    print("\n| arm | trainable parameters | of total | mean step time (s) |\n|---|---|---|---|")
    for arm, name in cols[:3]:
        c = cost[arm]
        print(f"| {name} | {c['trainable']:,} | {100 * c['trainable'] / c['total']:.2f}% | {np.mean(c['step_s']):.3f} |")
    print("\nGoals:")
    print(f"- (a) - (b) = {a_minus_b:+.2f} dB mean (goal >= +1 dB): {'met' if a_minus_b >= 1 else 'NOT met'}")
    print(f"- (a) reaches {100 * ratio:.0f}% of (c)'s fine-tuning gain over (f) ({gain_a:+.2f} vs {gain_c:+.2f} dB) with "
          f"{100 * params:.2f}% of its trainable parameters (goal >= 95% with <= 1%): "
          f"{'met' if ratio >= 0.95 and params <= 0.01 else 'NOT met'}")
    print(f"- (a) ahead of (e) at every pattern and R: {'met' if ahead else 'NOT met'} "
          f"({sum(r['adapter'][0] > r['sense'][0] for r in rows)}/{len(rows)})")
    print(f"\nSeeds: corpus/loader/init/mask seed {cfg.seed}. Model size {cfg.size}; pretraining {cfg.pretrain_steps} steps "
          f"({t_pre:.0f} s), {cfg.finetune_steps} fine-tuning steps per arm and pattern, micro-batch {cfg.micro_batch}; "
          f"total {t_all / 60:.1f} min on this machine.")
    print(f"Command: python bench/foundation_gain.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    out = {"config": dataclasses.asdict(cfg), "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                                                       for r in rows],
           "cost": cost, "pretrain_s": t_pre, "total_s": t_all}
    (work / "results.json").write_text(json.dumps(out, indent=2, default=float) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
