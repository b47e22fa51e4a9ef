"""The foundation-model claim at real difficulty: adapters vs full fine-tuning vs scratch, label
efficiency, and test-time self-supervised adaptation to a held-out scanner, side by side in one run.

    python bench/label_efficiency.py [--set threads=1 --set labelled=1,2,all --set seeds=0,1 ...]
    python bench/label_efficiency.py --set tiny=true        # about a minute: the suite's end-to-end run

Corpus, problems, training loops and scoring are bench/quality.py's (its `corpus`, `ProblemSampler`,
`make_problem`, `train_for`, `train_supervised`, `train_ssl`, `cmrfm_image`): cine_sax of the real-size
profile, one center/scanner (`held_out`) in no training data. Arms, on the same labels and budgets:

    (a) adapter    the SSL-pretrained backbone (SSDU, no reference) + one adapter per pattern
                   (models.adapters; forms from `forms`, e.g. "lora", "lora+prompt", "scale_shift")
    (b) scratch    the same architecture from random init, every parameter, the same labels and budget
    (c) full FT    the SSL-pretrained model, every parameter, the same labels and budget
    (d) zero-filled, (e) CG-SENSE (ESPIRiT maps, lamda `sense_lamda`)
    (f) pretrained the SSL backbone without fine-tuning
    (g) test-time  (f) and the best (a) adapted on the held-out scanner's own undersampled k-space
                   (finetune.adapt.adapt_model: SSDU, held-out-window guard; from the adapter with the
                   consistency anchor `adapt_anchor`, as reconstruct's default), `adapt_steps` N each; also
                   on those files cut to `unlike_coils` coils with k-space x `unlike_scale`, and on a
                   second held-out vendor (`unlike_scanner`, its own small corpus) whose matrix size
                   (`unlike_sizes`) and coil count (`unlike_matrix_coils`) no training file has

Adapter ablation (`forms`, every entry on every labelled file, first seed): each entry is a variant
"<forms>[:r<rank>][:<layer groups>][:last | :c<i>+<j>]", e.g. "lora:r4", "lora:attn", "lora:last",
"lora+prompt", "scale_shift+prompt" (forms of models.adapters.FORMS joined by "+"; rank default
`adapter_rank`, alpha 2 r; layer groups of models.adapters.LAYER_GROUPS, default "attn+mlp";
cascades default all, "last" = the last cascade's backbone). Each row reports its trainable
parameters and their share of the model; each variant's adapter is saved in the PEFT layout and
reloaded into a fresh copy of the backbone, whose output must equal the trained model's exactly.

Label efficiency: (a), (b), (c) for each number of labelled training files in `labelled` ("all" =
every training file) and each seed in `seeds`; table + PNG. Budgets are wall-clock seconds per arm
(bench/quality.py's `train_for`), so a slower arm gets fewer steps; the steps are reported. With
`finetune_steps` / `pretrain_steps` > 0 every arm gets exactly that many steps instead (step-matched,
independent of the machine's load).
The adapters of (a) are written in the PEFT layout under <out>/adapters/<labelled>_s<seed>/cine_<pattern>/
(a further variant of `label_variants` under <labelled>_s<seed>_<variant>/). `pretrained=<safetensors>` loads
an SSL backbone (e.g. a bench/tta_followup.py run's) as (f) instead of pretraining.
Scores: clean PSNR/SSIM (reference as the reference) on the official crop of the held-out files at R
`R` for each pattern (challenge.metrics.score_file).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script from any directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from challenge.metrics import score_file
from challenge.ranking import crop_selected, img4ranking_from_kspace, select_frames, select_slices
from finetune.adapt import Window, adapt_model
from finetune.settings import AdaptConfig
from launch.cli import parse_args
from launch.outputs import write_atomic
from models.adapters import (FORMS, adapter_parameters, add_adapters, layer_regex, load_adapter, merge_adapters,
                             save_adapter)
from models.sizes import ModelConfig, build_model, parameter_count
from shards.synthetic import SyntheticConfig, write_corpus


def _quality():
    """bench/quality.py as a module (the lead's harness; not restructured here)."""
    if "bench_quality" in sys.modules:
        return sys.modules["bench_quality"]
    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).with_name("quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


Q = _quality()


@dataclass
class LabelEfficiencyConfig:
    """Arms, budgets and the label grid of the foundation-model benchmark."""

    out: str = "out/bench_label_efficiency"
    corpus_dir: str = ""
    """Corpus folder ("" = <out>/data); bench/quality.py's corpus of the same settings can be shared."""
    seed: int = 0
    tiny: bool = False
    """Small matrices and seconds of training: the suite's end-to-end run."""
    threads: int = 1
    """torch threads (1 is fastest on the shared 2-core machine, bench/quality.py's note)."""
    patterns: list[str] = field(default_factory=lambda: ["ktGaussian"])
    """Patterns adapted and scored (one adapter per pattern)."""
    R: int = 16
    labelled: list[str] = field(default_factory=lambda: ["1", "2", "all"])
    """Numbers of labelled training files (the first n, sorted; "all" = every one)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    forms: list[str] = field(default_factory=lambda: list(ABLATION))
    """Adapter variants of arm (a) (`parse_variant`: forms, rank, layer groups, cascades); the first is the
    label-efficiency one, every one is run on every labelled file, first seed (the ablation table)."""
    label_variants: int = 1
    """How many of `forms`, from the first, are arm (a) of the label grid: each is trained at every labelled count
    and seed beside (b) and (c) and gets its own columns and plot line (e.g. forms=lora:r16:conv,
    lora+scale_shift:r16:conv with label_variants=2: the conv LoRA with and without scale-shift)."""
    pretrained: str = ""
    """An SSL backbone (safetensors of a model built from `model`, e.g. <run>/pretrained.safetensors of an earlier
    run or of bench/tta_followup.py) loaded as (f) instead of SSL pretraining (`pretrain_steps` is then only
    reported): the label grid on the backbone a test-time run used, without pretraining again."""
    adapter_rank: int = 8
    """LoRA rank of a variant that names none (alpha = 2 r for every rank)."""
    pretrain_seconds: float = 300.0
    finetune_seconds: float = 60.0
    """Per arm, pattern, label set and seed."""
    pretrain_steps: int = 0
    finetune_steps: int = 0
    """> 0: exactly this many steps (SSL pretraining; each fine-tuning arm) instead of the seconds above."""
    lr: float = 1e-3
    lr_adapter: float = 3e-3
    sense_lamda: float = 1e-2
    adapt_steps: list[int] = field(default_factory=lambda: [0, 10, 30])
    adapt_lr: float = 1e-2
    adapt_windows: int = 8
    adapt_anchor: float = 1.0
    adapt_anchor_backbone: float = 0.0
    """Test-time consistency anchor (finetune.settings.AdaptConfig.anchor / anchor_backbone, their defaults):
    the weight used when adapting from the best adapter / from (f)."""
    adapt_variants: list[str] = field(default_factory=lambda: ["lora:r16:conv", "lora:r4@1e-3"])
    """Test-time LoRA, "<variant>[@<lr>]" (`parse_adapt_variant`; lr default `adapt_lr`). The first is run on
    every set in `adapt_sets`, from (f) and from the best (a), for every N of `adapt_steps` (its default
    is finetune.settings.AdaptConfig's: rank 16 on the conv stem and head, lr 1e-2); every further one is
    a probe of why adaptation moves or does not move the image (default: the old default, rank 4 on
    attn+mlp at lr 1e-3), run on the held-out set from (f) at the largest N."""
    adapt_sets: list[str] = field(default_factory=lambda: list(ADAPT_SETS))
    """Which test-time sets to adapt and score: "held-out", "unlike-coils", "unlike-matrix" (ADAPT_SETS)."""
    held_out: str = "Center012/Philips_30T_IngeniaCX"
    unlike_coils: int = 4
    unlike_scale: float = 1e4
    """Test-time adaptation is also measured on the held-out files cut to `unlike_coils` coils and with
    k-space multiplied by `unlike_scale`: a scanner whose coil count and k-space scale no training file has."""
    unlike_scanner: str = "Center014/GE_15T_SIGNAArtist"
    """A second held-out scanner (a vendor absent from training) written as its own corpus, with ..."""
    unlike_sizes: list[int] = field(default_factory=lambda: [72, 96, 500, 540])
    """... [ny_min, ny_max, nx_min, nx_max] outside the training matrices (real profile: ny 112-328,
    nx 288-456; tiny: the tiny sizes' own unlike range is used) ..."""
    unlike_matrix_coils: int = 16
    """... and this many coils (training: 10)."""
    unlike_patients: int = 2
    unlike_dir: str = ""
    """Its corpus folder ("" = <out>/data_unlike; reused when the same config wrote it)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        size="tiny", dim=96, depth=3, heads=4, patch=16, cascades=4, conv_channels=16, sens_channels=8))


#: the default ablation. First (the label-efficiency arm (a)): rank-16 LoRA on the convolutional stem and
#: head only, the form that met the 1% budget in the second pass (BENCHMARKS.md: 0.71% of the
#: parameters); then conv at rank 8, the old default (rank 8 on attn+mlp), rank 1/4/16 on attn+mlp,
#: attn / mlp / last cascade / + conv at rank 8; LoRA with scale-shift and prompt; scale-shift + prompt alone
ABLATION = ("lora:r16:conv", "lora:conv", "lora", "lora:r1", "lora:r4", "lora:r16", "lora:attn", "lora:mlp",
            "lora:last", "lora:attn+mlp+conv", "lora+scale_shift", "lora+prompt", "lora+scale_shift+prompt",
            "scale_shift+prompt", "lora+prompt:r4:last")
#: test-time adaptation sets: the held-out scanner; its files cut to `unlike_coils` coils with k-space x
#: `unlike_scale`; the second held-out vendor with unlike matrices (`unlike_scanner`)
ADAPT_SETS = ("held-out", "unlike-coils", "unlike-matrix")


@dataclass(frozen=True)
class Variant:
    """One adapter of the ablation: forms, LoRA rank, layer groups and cascades (() = all)."""

    spec: str
    forms: tuple[str, ...]
    rank: int
    layers: tuple[str, ...]
    cascades: tuple[int, ...]

    @property
    def targets(self) -> str:
        return layer_regex(self.layers)

    def describe(self) -> tuple[str, str, str]:
        """(rank, layers, cascades) as the table shows them ("-" where the forms do not use them)."""
        lora, linear = "lora" in self.forms, bool({"lora", "scale_shift"} & set(self.forms))
        casc = "all" if not self.cascades else "last" if self.cascades == (-1,) else ",".join(map(str, self.cascades))
        return (str(self.rank) if lora else "-", "+".join(self.layers) if linear else "-", casc if linear else "-")


def parse_variant(spec: str, default_rank: int) -> Variant:
    """"<forms>[:r<rank>][:<layer groups>][:last | :c<i>+<j>]" -> Variant (errors name the spec)."""
    forms_s, *options = spec.split(":")
    forms = tuple(forms_s.split("+"))
    rank, layers, cascades = default_rank, ("attn", "mlp"), ()
    for opt in options:
        if re.fullmatch(r"r\d+", opt):
            rank = int(opt[1:])
        elif opt == "last":
            cascades = (-1,)
        elif re.fullmatch(r"c-?\d+(\+-?\d+)*", opt):
            cascades = tuple(int(c) for c in opt[1:].split("+"))
        else:
            layers = tuple(opt.split("+"))
    bad = sorted(set(forms) - set(FORMS))
    if bad or rank < 1:
        raise SystemExit(f"bench/label_efficiency.py: adapter variant {spec!r}: forms must be among {FORMS} "
                         f"joined by '+', rank >= 1 (got forms {list(forms)}, rank {rank})")
    try:
        layer_regex(layers)
    except ValueError as exc:
        raise SystemExit(f"bench/label_efficiency.py: adapter variant {spec!r}: {exc}") from None
    return Variant(spec, forms, rank, layers, cascades)


def parse_adapt_variant(spec: str, default_rank: int, default_lr: float) -> tuple[Variant, float]:
    """"<variant>[@<lr>]" -> (Variant, lr), e.g. "lora:r16:conv@1e-2" (errors name the spec)."""
    variant, _, lr_s = spec.partition("@")
    try:
        lr = float(lr_s) if lr_s else default_lr
    except ValueError:
        raise SystemExit(f"bench/label_efficiency.py: test-time variant {spec!r}: learning rate {lr_s!r} is not a number") from None
    v = parse_variant(variant, default_rank)
    if not lr > 0:
        raise SystemExit(f"bench/label_efficiency.py: test-time variant {spec!r}: learning rate must be > 0")
    return v, lr


def quality_config(cfg: LabelEfficiencyConfig) -> "Q.QualityConfig":
    qc = Q.QualityConfig(out=cfg.out, corpus_dir=cfg.corpus_dir, seed=cfg.seed, tiny=cfg.tiny, held_out=cfg.held_out,
                         model=cfg.model, pretrain_seconds=cfg.pretrain_seconds, lr=cfg.lr)
    if cfg.tiny:
        qc = Q.tiny_overrides(qc)
    return qc


# ---- scoring --------------------------------------------------------------------------------------


def eval_problems(cases: list, pattern: str, R: int, qc) -> list[tuple[list, np.ndarray]]:
    """Per held-out file: (its scored slices' problems, the img4ranking reference)."""
    out = []
    for ci, case in enumerate(cases):
        nt, nz = case.kspace.shape[:2]
        frames = np.array(select_frames(nt, case.path.stem))
        probs = [Q.make_problem(case.kspace[:, z], frames, pattern, R, qc.seed + ci, case.meta, qc)
                 for z in select_slices(nz)]
        out.append((probs, img4ranking_from_kspace(case.kspace, case.path.stem)))
    return out


def score(fn, files: list[tuple[list, np.ndarray]]) -> dict[str, float]:
    """Mean clean PSNR / SSIM over the files, and seconds per slice."""
    psnr, ssim, secs = [], [], []
    for probs, reference in files:
        images = []
        for p in probs:
            t0 = time.perf_counter()
            with torch.inference_mode():
                img = np.asarray(fn(p), dtype=np.float32)
            secs.append(time.perf_counter() - t0)
            images.append(Q.canvas(img, p, p.mask.shape[-2]))
        s = score_file(crop_selected(np.stack(images, axis=1)), reference, challenge_exact=False)
        psnr.append(s.psnr)
        ssim.append(s.ssim)
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "s_per_slice": float(np.mean(secs))}


# ---- arms -----------------------------------------------------------------------------------------


def train_arm(base: torch.nn.Module | None, cases: list, pattern: str, seed: int, mode: str, qc,
              cfg: LabelEfficiencyConfig, variant: Variant | None = None) -> tuple[torch.nn.Module, dict]:
    """mode "adapter" (`variant` on `base`) | "full" (from `base`) | "scratch" (random init): the trained
    model and its stats."""
    torch.manual_seed(seed)
    if mode == "scratch":
        model = build_model(cfg.model)
    else:
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(True)
    params = None
    if mode == "adapter":
        v = variant or parse_variant("lora", cfg.adapter_rank)
        add_adapters(model, v.rank, 2.0 * v.rank, v.targets, forms=v.forms, cascades=v.cascades)
        params = adapter_parameters(model)
    sampler = Q.ProblemSampler(cases, qc, seed + 3, (pattern,))
    stats = Q.train_supervised(model, Q.cmrfm_image, sampler, qc, cfg.finetune_seconds,
                               cfg.lr_adapter if mode == "adapter" else cfg.lr, f"{mode} {pattern} s{seed}", params,
                               cfg.finetune_steps)
    stats["trainable"] = sum(p.numel() for p in (params or model.parameters()))
    return model.eval(), stats


def reloads_exactly(model: torch.nn.Module, base: torch.nn.Module, folder: Path, problem) -> bool:
    """Whether the adapter saved in `folder`, loaded into a fresh copy of `base`, gives `model`'s output
    bit for bit on `problem` (target_modules names what was adapted; load_adapter is strict)."""
    fresh = copy.deepcopy(base)
    load_adapter(fresh, folder)
    with torch.inference_mode():
        return bool(np.array_equal(Q.cmrfm_image(fresh.eval(), problem), Q.cmrfm_image(model, problem)))


def unlike_matrix_cases(cfg: LabelEfficiencyConfig, qc, out: Path) -> list:
    """The second held-out scanner: its own corpus (`unlike_scanner`, matrices `unlike_sizes`,
    `unlike_matrix_coils` coils), cine_sax only, fully sampled cases as bench/quality.py loads them."""
    data = Path(cfg.unlike_dir) if cfg.unlike_dir else out / "data_unlike"
    syn = SyntheticConfig(out=str(data), profile="real", seed=cfg.seed, workers=1, train_scanners=[],
                          val_scanners=[cfg.unlike_scanner], patients_per_scanner=0,
                          val_patients_per_scanner=cfg.unlike_patients, files_per_patient=1, val_files_per_patient=1,
                          nz_max=qc.nz_max, patients_2024=0, fastmri_files=0, coils=cfg.unlike_matrix_coils,
                          real_sizes=list(cfg.unlike_sizes))
    if cfg.tiny:  # training is ny 40-48 x nx 72-84 x 4 coils there (bench/quality.py corpus)
        syn = dataclasses.replace(syn, profile="", real_sizes=[], ny_min=30, ny_max=34, nx_min=96, nx_max=104, coils=6)
    write_corpus(syn)
    files = sorted(data.glob("ChallengeData_ValSet/**/FullSample_TaskR1/**/cine_sax.mat"))
    if not files:
        raise SystemExit(f"{data}: no cine_sax file of {cfg.unlike_scanner}")
    return Q.load_cases(files)


def matrix_summary(cases: list) -> dict:
    """ny, nx and coil ranges of fully sampled cases (nt, nz, C, Y, X)."""
    shapes = np.array([c.kspace.shape[2:] for c in cases])
    return {"coils": sorted({int(c) for c in shapes[:, 0]}), "ny": [int(shapes[:, 1].min()), int(shapes[:, 1].max())],
            "nx": [int(shapes[:, 2].min()), int(shapes[:, 2].max())], "files": len(cases)}


def effective_acceleration(files: list[tuple[list, np.ndarray]]) -> float:
    """Mean samples / acquired over the scored problems' masks (ACS included)."""
    return float(np.mean([1.0 / p.mask.mean() for probs, _ in files for p in probs]))


def test_time(model: torch.nn.Module, files: list[tuple[list, np.ndarray]], steps: int, cfg: LabelEfficiencyConfig,
              variant: Variant | None = None, lr: float | None = None, anchor: float = 0.0,
              max_drift: float = 0.0) -> tuple[torch.nn.Module, dict]:
    """Adapt `model` on the held-out files' undersampled windows only (Problem.kus / mask; `full` unread),
    with a test-time adapter of `variant` (default: AdaptConfig's rank-16 LoRA on the conv stem and head) at `lr`,
    the consistency `anchor` and the `max_drift` guard of AdaptConfig (0 = off; `run` passes `adapt_anchor` from
    the best adapter and `adapt_anchor_backbone` from (f), as finetune.reconstruct would)."""
    windows = [Window(torch.from_numpy(p.kus[None]), torch.from_numpy(p.mask[None]),
                      {**p.meta, "__key__": f"{i}:{j}"})
               for i, (probs, _) in enumerate(files) for j, p in enumerate(probs)][:cfg.adapt_windows]
    v = variant or parse_variant("lora:r16:conv", 16)
    a = AdaptConfig(steps=steps, lr=cfg.adapt_lr if lr is None else lr, windows=cfg.adapt_windows,
                    eval_every=max(steps // 3, 1), seed=cfg.seed, rank=v.rank, alpha=2.0 * v.rank,
                    layers=list(v.layers), cascades=list(v.cascades), forms=list(v.forms), anchor=anchor,
                    max_drift=max_drift)
    adapted, result = adapt_model(model, windows, a, torch.device("cpu"),
                                  lambda m: print(f"[label_efficiency] adapt: {m}", file=sys.stderr))
    trainable = sum(p.numel() for p in adapter_parameters(adapted))  # counted before the merge folds them in
    merge_adapters(adapted)
    return adapted.eval(), dataclasses.asdict(result) | {"trainable": trainable}


# ---- main -----------------------------------------------------------------------------------------


def save_partial(results: dict, cfg: LabelEfficiencyConfig, out: Path) -> None:
    """results.json as it stands (marked "partial"): a run stopped midway keeps every finished row."""
    write_atomic(out / "results.json", json.dumps({**results, "partial": True, "config": dataclasses.asdict(cfg)},
                                                  indent=2, default=float) + "\n")


def tiny_settings(cfg: LabelEfficiencyConfig) -> LabelEfficiencyConfig:
    """`cfg` cut to the suite's end-to-end size when `tiny` is set (seconds of training, a small model)."""
    if not cfg.tiny:
        return cfg
    return dataclasses.replace(cfg, pretrain_seconds=min(cfg.pretrain_seconds, 3.0),
                               finetune_seconds=min(cfg.finetune_seconds, 1.0), adapt_steps=[0, 2],
                               pretrain_steps=min(cfg.pretrain_steps, 3), finetune_steps=min(cfg.finetune_steps, 2),
                               model=dataclasses.replace(cfg.model, dim=32, depth=1, heads=2, cascades=2,
                                                         conv_channels=4, patch=4))


def run(cfg: LabelEfficiencyConfig) -> dict:
    cfg = tiny_settings(cfg)
    variants = [parse_variant(v, cfg.adapter_rank) for v in cfg.forms]
    if not 1 <= cfg.label_variants <= len(variants):
        raise SystemExit(f"bench/label_efficiency.py: label_variants={cfg.label_variants} must be 1 to the number of "
                         f"forms ({len(variants)})")
    label_variants = variants[:cfg.label_variants]
    adapt_variants = [parse_adapt_variant(v, 4, cfg.adapt_lr) for v in cfg.adapt_variants]
    bad_sets = sorted(set(cfg.adapt_sets) - set(ADAPT_SETS))
    if bad_sets or not adapt_variants:
        raise SystemExit(f"bench/label_efficiency.py: adapt_sets {bad_sets} not among {list(ADAPT_SETS)}, or "
                         f"adapt_variants empty ({cfg.adapt_variants})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    qc = quality_config(cfg)
    t_all = time.perf_counter()
    train_cases, eval_cases = Q.corpus(qc, out)
    matrix_cases = unlike_matrix_cases(cfg, qc, out)
    n_params = parameter_count(build_model(cfg.model, device="meta"))
    torch.manual_seed(cfg.seed)
    pretrained = build_model(cfg.model)
    if cfg.pretrained:  # strict: a backbone of another model config is refused by load_state_dict
        pretrained.load_state_dict(load_file(cfg.pretrained))
        ssl = {"steps": cfg.pretrain_steps, "seconds": 0.0, "loaded": cfg.pretrained}
    else:
        ssl = Q.train_ssl(pretrained, Q.ProblemSampler(train_cases, qc, cfg.seed + 2), qc, cfg.pretrain_steps)
    # the SSL backbone (f), kept so test-time adaptation can be probed again without pretraining anew
    state = {k: v.detach().contiguous() for k, v in pretrained.state_dict().items()}
    write_atomic(out / "pretrained.safetensors", lambda path: save_file(state, str(path)))
    results: dict = {"parameters": n_params, "pretrain": ssl, "patterns": {},
                     "matrices": {"training": matrix_summary(train_cases), "held-out": matrix_summary(eval_cases),
                                  cfg.unlike_scanner: matrix_summary(matrix_cases)}}
    for pattern in cfg.patterns:
        files = eval_problems(eval_cases, pattern, cfg.R, qc)
        res = results["patterns"][pattern] = {
            "zero-filled": score(lambda p: Q.classical_image("zero_filled", p), files),
            "CG-SENSE": score(lambda p: Q.classical_image("sense", p, cfg.sense_lamda), files),
            "pretrained": score(lambda p: Q.cmrfm_image(pretrained, p), files),
            "R_eff": effective_acceleration(files), "labels": [], "forms": [], "test_time": [], "sets": {},
            "ablation_labelled": len(train_cases)}
        best_adapter, best_psnr = None, -np.inf
        reuse: dict[str, tuple] = {}  # variant spec -> (model, stats) on every file, first seed: the ablation's row
        for n in cfg.labelled:
            subset = train_cases if n == "all" else train_cases[:int(n)]
            for seed in cfg.seeds:
                row: dict = {"labelled": len(subset), "seed": seed, "adapter_variants": {}}
                arms = [("adapter", v) for v in label_variants] + [("scratch", None), ("full", None)]
                for i, (mode, variant) in enumerate(arms):
                    model, stats = train_arm(pretrained, subset, pattern, seed, mode, qc, cfg, variant)
                    scored = score(lambda p: Q.cmrfm_image(model, p), files) | {
                        "steps": stats["steps"], "trainable": stats["trainable"]}
                    # the first variant is "adapter" (the table's arm (a)); further ones are keyed by their spec
                    if mode != "adapter" or i == 0:
                        row[mode] = scored
                    else:
                        row["adapter_variants"][variant.spec] = scored
                    if mode == "adapter":
                        name = f"{n}_s{seed}" if i == 0 else f"{n}_s{seed}_{re.sub(r'[^A-Za-z0-9_+-]', '_', variant.spec)}"
                        save_adapter(model, out / "adapters" / name / f"cine_{pattern}",
                                     {"contrast": "cine", "pattern": pattern, "labelled_files": len(subset)})
                        if len(subset) == len(train_cases) and seed == cfg.seeds[0]:
                            reuse[variant.spec] = (model, stats)  # same labels, seed and budget as the ablation
                        if scored["psnr"] > best_psnr:
                            best_adapter, best_psnr = copy.deepcopy(model), scored["psnr"]
                res["labels"].append(row)
                save_partial(results, cfg, out)
                print(f"[label_efficiency] {pattern} {len(subset)} files seed {seed}: " + ", ".join(
                    [f"{m} {row[m]['psnr']:.2f}" for m in ("adapter", "scratch", "full")] +
                    [f"{k} {v['psnr']:.2f}" for k, v in row["adapter_variants"].items()]), file=sys.stderr)
        merge_adapters(best_adapter)
        unlike = [dataclasses.replace(c, kspace=c.kspace[:, :, :cfg.unlike_coils] * cfg.unlike_scale) for c in eval_cases]
        unlike_name = f"held-out, {cfg.unlike_coils} coils, k-space x{cfg.unlike_scale:g}"
        m = results["matrices"][cfg.unlike_scanner]
        matrix_name = f"{cfg.unlike_scanner}, {m['ny'][0]}-{m['ny'][1]} x {m['nx'][0]}-{m['nx'][1]}, " \
                      f"{'/'.join(map(str, m['coils']))} coils"
        sets = [(name, fset()) for key, name, fset in (
            ("held-out", "held-out", lambda: files),
            ("unlike-coils", unlike_name, lambda: eval_problems(unlike, pattern, cfg.R, qc)),
            ("unlike-matrix", matrix_name, lambda: eval_problems(matrix_cases, pattern, cfg.R, qc)))
            if key in cfg.adapt_sets]
        (main_variant, main_lr), probes = adapt_variants[0], adapt_variants[1:]
        for set_name, fset in sets:
            res["sets"][set_name] = {"R_eff": effective_acceleration(fset)} | ({
                "zero-filled": res["zero-filled"], "CG-SENSE": res["CG-SENSE"]} if fset is files else {
                "zero-filled": score(lambda p: Q.classical_image("zero_filled", p), fset),
                "CG-SENSE": score(lambda p: Q.classical_image("sense", p, cfg.sense_lamda), fset)})
            for start, base in (("pretrained", pretrained), ("best adapter", best_adapter)):
                runs = [(steps, main_variant, main_lr) for steps in cfg.adapt_steps]
                if set_name == "held-out" and start == "pretrained":  # the probes: why it moves or does not
                    runs += [(max(cfg.adapt_steps), v, lr) for v, lr in probes if max(cfg.adapt_steps) > 0]
                anchor = cfg.adapt_anchor if start == "best adapter" else cfg.adapt_anchor_backbone
                for steps, v, lr in runs:
                    t0 = time.perf_counter()
                    model, info = test_time(base, fset, steps, cfg, v, lr, anchor) if steps else (base, {"status": "none"})
                    took = time.perf_counter() - t0
                    curve = info.get("heldout", [])
                    res["test_time"].append({
                        "set": set_name, "start": start, "steps": steps, "variant": v.spec, "lr": lr, "anchor": anchor,
                        "adapt_s_per_file": took / len(fset), "status": info["status"],
                        "trainable": info.get("trainable", 0),
                        # the guard's held-out SSDU loss before the first step and at the kept weights
                        "ssdu_before": curve[0][1] if curve else None,
                        "ssdu_best": min(c[1] for c in curve) if curve else None,
                        "best_step": info.get("best_step", 0),
                        **score(lambda p: Q.cmrfm_image(model, p), fset)})
                    save_partial(results, cfg, out)
        # the ablation after test-time adaptation: a run stopped midway (save_partial) still has both
        for v in variants:  # on every labelled file, first seed
            model, stats = reuse[v.spec] if v.spec in reuse else \
                train_arm(pretrained, train_cases, pattern, cfg.seeds[0], "adapter", qc, cfg, v)
            folder = save_adapter(model, out / "adapters" / "ablation" / re.sub(r"[^A-Za-z0-9_+-]", "_", v.spec)
                                  / f"cine_{pattern}", {"contrast": "cine", "pattern": pattern, "variant": v.spec})
            rank, layers, cascades = v.describe()
            res["forms"].append({"forms": "+".join(v.forms), "spec": v.spec, "rank": rank, "layers": layers,
                                 "cascades": cascades, **score(lambda p: Q.cmrfm_image(model, p), files),
                                 "steps": stats["steps"], "trainable": stats["trainable"],
                                 "share": stats["trainable"] / n_params,
                                 "reload_exact": reloads_exactly(model, pretrained, folder, files[0][0][0])})
            print(f"[label_efficiency] ablation {v.spec}: {res['forms'][-1]['psnr']:.2f} dB, "
                  f"{stats['trainable']:,} trainable", file=sys.stderr)
            save_partial(results, cfg, out)
    results["minutes"] = (time.perf_counter() - t_all) / 60
    results["config"] = dataclasses.asdict(cfg)
    results["command"] = f"python bench/label_efficiency.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip()
    write_atomic(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    text = report(results, cfg, n_params)
    write_atomic(out / "label_efficiency.md", text + "\n")
    print(text)
    plot(results, out / "label_efficiency.png")
    return results


def _percent(part: float, whole: float) -> str:
    """part / whole in percent; "-" when `whole` is no gain at all (a share of nothing means nothing)."""
    return f"{100 * part / whole:.0f}%" if np.isfinite(whole) and whole > 0 else "-"


def report(results: dict, cfg: LabelEfficiencyConfig, n_params: int) -> str:
    budget = (f"{cfg.finetune_steps} steps per fine-tuning arm" if cfg.finetune_steps else
              f"{cfg.finetune_seconds:g} s per fine-tuning arm")
    lines = [f"Held-out {cfg.held_out}, R {cfg.R}, clean PSNR / SSIM on the official crop; "
             f"model {n_params:,} parameters; SSL pretraining {results['pretrain']['steps']} steps" +
             (f" (backbone loaded from {results['pretrain']['loaded']})" if results["pretrain"].get("loaded") else "") +
             f"; {budget}."]
    mats = results["matrices"]
    lines += ["", "| files | ny | nx | coils |", "|---|---|---|---|"]
    lines += [f"| {name} ({m['files']}) | {m['ny'][0]}-{m['ny'][1]} | {m['nx'][0]}-{m['nx'][1]} | "
              f"{'/'.join(map(str, m['coils']))} |" for name, m in mats.items()]
    for pattern, res in results["patterns"].items():
        f = res["pretrained"]["psnr"]
        lines += ["", f"**{pattern}** (effective acceleration {res['R_eff']:.1f}x): zero-filled "
                  f"{res['zero-filled']['psnr']:.2f} / {res['zero-filled']['ssim']:.4f}, "
                  f"CG-SENSE {res['CG-SENSE']['psnr']:.2f} / {res['CG-SENSE']['ssim']:.4f}, "
                  f"pretrained (f) {f:.2f} / {res['pretrained']['ssim']:.4f}", ""]
        extra = list(res["labels"][0].get("adapter_variants", {})) if res["labels"] else []
        lines += ["| labelled files | seed | (a) adapter | " + "".join(f"(a) `{k}` | " for k in extra) +
                  "(b) scratch | (c) full FT | (a)-(b) dB | (a) share of (c)'s gain over (f) | " +
                  "".join(f"`{k}` share | " for k in extra), "|---|---|---|---|---|---|---|" + "---|---|" * len(extra)]
        for r in res["labels"]:
            a, b, c = r["adapter"], r["scratch"], r["full"]
            more = [r["adapter_variants"][k] for k in extra]
            lines.append(f"| {r['labelled']} | {r['seed']} | {a['psnr']:.2f} / {a['ssim']:.4f} ({a['steps']} steps) | " +
                         "".join(f"{m['psnr']:.2f} / {m['ssim']:.4f} | " for m in more) +
                         f"{b['psnr']:.2f} / {b['ssim']:.4f} ({b['steps']}) | {c['psnr']:.2f} / {c['ssim']:.4f} "
                         f"({c['steps']}) | {a['psnr'] - b['psnr']:+.2f} | {_percent(a['psnr'] - f, c['psnr'] - f)} | " +
                         "".join(f"{_percent(m['psnr'] - f, c['psnr'] - f)} | " for m in more))
        last = res["labels"][-1]
        same = [r for r in res["labels"] if r["labelled"] == res["ablation_labelled"] and r["seed"] == cfg.seeds[0]]
        c_gain = same[0]["full"]["psnr"] - f if same else float("nan")  # (c) on the ablation's labels and seed
        lines += ["", f"Trainable parameters of the label-efficiency adapter ({cfg.forms[0]}): "
                  f"{last['adapter']['trainable']:,} ({100 * last['adapter']['trainable'] / n_params:.2f}% of the "
                  f"full model's {n_params:,}).", "",
                  f"Adapter ablation ({res['ablation_labelled']} labelled files, seed {cfg.seeds[0]}; alpha = 2 r; "
                  f"'gain' is over (f), 'of (c)' is that gain over full fine-tuning's {c_gain:+.2f} dB on the same labels):", "",
                  "| variant | forms | rank | layers | cascades | PSNR / SSIM | gain dB | of (c) | trainable | share of model | steps | reload exact |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["forms"]:
            gain = r["psnr"] - f
            lines.append(f"| `{r['spec']}` | {r['forms']} | {r['rank']} | {r['layers']} | {r['cascades']} | "
                         f"{r['psnr']:.2f} / {r['ssim']:.4f} | {gain:+.2f} | "
                         f"{_percent(gain, c_gain)} | {r['trainable']:,} | {100 * r['share']:.3f}% | {r['steps']} | "
                         f"{'yes' if r['reload_exact'] else 'NO'} |")
        lines += ["", "Test-time adaptation sets (zero-filled, CG-SENSE, effective acceleration):", ""]
        lines += [f"- {name}: zero-filled {v['zero-filled']['psnr']:.2f} / {v['zero-filled']['ssim']:.4f}, CG-SENSE "
                  f"{v['CG-SENSE']['psnr']:.2f} / {v['CG-SENSE']['ssim']:.4f}, {v['R_eff']:.1f}x"
                  for name, v in res["sets"].items()]
        lines += ["", "| evaluated on | test-time adaptation from | adapter | N steps | PSNR / SSIM | dB vs N = 0 | held-out SSDU "
                  "loss: before -> kept (step) | adaptation s per file | guard |", "|---|---|---|---|---|---|---|---|---|"]
        unadapted = {(r["set"], r["start"]): r["psnr"] for r in res["test_time"] if r["steps"] == 0}
        for r in res["test_time"]:
            adapter = "-" if not r["steps"] else \
                f"`{r.get('variant', 'lora:r4')}` lr {r.get('lr', cfg.adapt_lr):g} anchor {r.get('anchor', 0):g} " \
                f"({r.get('trainable', 0):,})"
            ssdu = "-" if r.get("ssdu_before") is None else \
                f"{r['ssdu_before']:.5f} -> {r['ssdu_best']:.5f} ({r['best_step']})"
            base = unadapted.get((r["set"], r["start"]))
            delta = "-" if base is None or not r["steps"] else f"{r['psnr'] - base:+.2f}"
            lines.append(f"| {r['set']} | {r['start']} | {adapter} | {r['steps']} | {r['psnr']:.2f} / {r['ssim']:.4f} | "
                         f"{delta} | {ssdu} | {r['adapt_s_per_file']:.1f} | {r['status']} |")
    lines += ["", f"Seeds {cfg.seeds}; total {results['minutes']:.1f} min; {torch.get_num_threads()} thread(s).",
              f"Command: {results['command']}"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(results["patterns"])
    fig, axes = plt.subplots(2, len(patterns), figsize=(5 * len(patterns), 6), squeeze=False)
    for j, pattern in enumerate(patterns):
        res = results["patterns"][pattern]
        for k, metric in enumerate(("psnr", "ssim")):
            ax = axes[k, j]
            extra = list(res["labels"][0].get("adapter_variants", {})) if res["labels"] else []
            curves = [(lambda r: r["adapter"], "(a) SSL + adapter")]
            curves += [(lambda r, k=k: r["adapter_variants"][k], f"(a) SSL + {k}") for k in extra]
            curves += [(lambda r: r["scratch"], "(b) scratch"), (lambda r: r["full"], "(c) full FT")]
            for arm, label in curves:
                by_n: dict[int, list[float]] = {}
                for r in res["labels"]:
                    by_n.setdefault(r["labelled"], []).append(arm(r)[metric])
                xs = sorted(by_n)
                ax.errorbar(xs, [np.mean(by_n[x]) for x in xs], yerr=[np.std(by_n[x]) for x in xs], marker="o",
                            label=label, capsize=3)
            ax.axhline(res["pretrained"][metric], color="gray", ls="--", label="(f) pretrained")
            ax.axhline(res["CG-SENSE"][metric], color="k", ls=":", label="(e) CG-SENSE")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("labelled training files")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"{pattern}, held-out scanner")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(LabelEfficiencyConfig, argv, description="adapters, label efficiency, test-time adaptation"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
