"""Reconstruction quality at real difficulty, side by side: cmrfm, fastMRI's VarNet, CG-SENSE, L1-wavelet.

    python bench/quality.py [--set train_seconds=900 --set model.conv_channels=16 ...]
    python bench/quality.py --set tiny=true        # minutes: the suite's end-to-end check

One run, one corpus, one set of seeds. The corpus is the "real" profile of shards.synthetic (matrix
sizes of the 2025 release, 10 coils, fine anatomy and texture) restricted to cine_sax; one
center/scanner (`held_out`) is in no training data. Every arm reconstructs the same problems:

    cmrfm SSL + adapters   SSDU pretraining (pretrain.objective) on undersampled training data, no
                           reference, then one LoRA adapter per pattern (models.adapters), supervised
    cmrfm scratch          the same architecture, supervised from random init on the same labels
    VarNet                 fastmri.models.VarNet (bench-only dependency), parameter count within 10%
                           of cmrfm's, the same labels, masks, loss and wall-clock budget
    CG-SENSE, L1-wavelet   ESPIRiT + sigpy solvers, regularisation picked on training slices
    zero-filled            RSS of the zero-filled coil images

A problem is one slice of a 3-frame window: k-space undersampled with an official mask (challenge.masks,
ACS 20) at its real size, normalised by shards.normalise.kspace_scale, with the RSS of the fully
sampled frames as the target. Cost lever (`crop_readout`, on by default): for Uniform and ktGaussian
the readout is fully sampled, so after an inverse FFT along it every image column is its own 1-D
problem; only the columns the challenge's ranking crop keeps (the central third, plus a margin) are
reconstructed, with no loss of data consistency. ktRadial samples the readout too and is solved at
full size. Scores use the official crop (challenge.ranking) on the full-size canvas, challenge-exact with the
test-phase scorer that made the final 2025 ranking and clean (challenge.metrics.score_file); the table, timings and PNG grids go to `out`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script from any directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from challenge.masks import make_mask
from challenge.metrics import score_file
from challenge.ranking import crop_selected, img4ranking_from_kspace, matlab_round_div, select_frames, select_slices
from finetune.classical import espirit_maps, l1_wavelet, sense, zero_filled
from finetune.settings import FinetuneLoss
from finetune.train import ranking_window, region_loss, supervised_loss
from launch.cli import parse_args
from launch.outputs import write_atomic
from models.adapters import add_adapters, adapter_parameters, merge_adapters
from models.coils import rss
from models.fft import ifft2c
from models.recon import is_control_parameter
from models.sizes import ModelConfig, build_model, parameter_count
from pretrain.objective import ObjectiveConfig, ssdu_step_loss
from shards.fft import fft2c as np_fft2c
from shards.fft import ifft2c as np_ifft2c
from shards.layout import parse_scanner
from shards.matfile import read_kspace
from shards.normalise import kspace_scale
from shards.synthetic import SyntheticConfig, write_corpus

PATTERNS = ("Uniform", "ktGaussian", "ktRadial")
RATES = (8, 16, 24)
CARTESIAN = ("Uniform", "ktGaussian")  # masks constant along the readout
ARMS = ("CG-SENSE", "L1-wavelet", "VarNet", "cmrfm scratch", "cmrfm SSL+adapters")  # zero-filled always runs
CLASSICAL_METHODS = {"CG-SENSE": "sense", "L1-wavelet": "l1_wavelet"}  # arm -> classical_image method
CLASSICAL_ARMS = set(CLASSICAL_METHODS)
PEER_ARMS = CLASSICAL_ARMS | {"VarNet"}  # independent of cmrfm's settings: what `compare_with` may bring in


@dataclass
class QualityConfig:
    """Corpus, arms and budgets of the quality benchmark (defaults: about an hour on 2 CPU cores)."""

    out: str = "out/bench_quality"
    corpus_dir: str = ""
    """Where the corpus is written or reused ("" = <out>/data); ablations share one (same corpus config)."""
    seed: int = 0
    train_seed: int = -1
    """Seed of the training arms' initialisation and problem streams (-1: `seed`). A second training
    seed keeps the corpus, the held-out problems and the classical arms of `seed` (see `compare_with`)."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """Which arms to run besides zero-filled (ablations run "cmrfm scratch" alone)."""
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    """Sampling patterns trained and evaluated (a subset for quick ablations, e.g. "ktRadial")."""
    tiny: bool = False
    """Small matrices, 4 coils and seconds of training: the test suite's end-to-end run."""
    train_scanners: list[str] = field(default_factory=lambda: [
        "Center001/UIH_30T_umr780", "Center002/Siemens_30T_CIMA.X", "Center005/UIH_15T_umr670",
        "Center007/Siemens_15T_Sola"])
    held_out: str = "Center012/Philips_30T_IngeniaCX"
    patients_per_scanner: int = 2
    eval_patients: int = 2
    nz_max: int = 2
    frames: int = 3
    crop_readout: bool = True
    """Reconstruct only the readout columns the ranking crop keeps (+ margin) for Cartesian masks."""
    readout_margin: float = 0.15
    """Extra columns on each side of the ranking crop, as a fraction of its width (model context)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        size="tiny", dim=96, depth=3, heads=4, patch=16, cascades=4, conv_channels=32, sens_channels=8,
        sens_estimate="espirit", sense_init=8, sense_scope="all", sense_mu=0.01, update_gate=True, final_cg=8,
        final_mu=0.05))
    """cmrfm's architecture for every cmrfm arm (patch 16 + convolutional stem/head of 32 channels, ESPIRiT
    sensitivities, CG-SENSE starting image on every pattern, gated updates, a data-consistency solve in
    the last cascade: see BENCHMARKS.md and docs/design.md §7)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default). 1 is ~10x faster per step on a 2-core machine that
    other processes share: OpenMP threads spin at every small op while a core is taken (measured)."""
    varnet_cascades: int = 6
    varnet_sens_chans: int = 4
    train_seconds: float = 900.0
    """Wall-clock of each supervised arm (cmrfm scratch, VarNet)."""
    train_steps: int = 0
    """> 0: the cmrfm scratch arm trains exactly this many steps instead of `train_seconds` (a lever
    compared step for step with an earlier run, whatever the machine's load)."""
    scratch_init: str = ""
    """Weights the "cmrfm scratch" arm starts from instead of its random init (an earlier run's
    <out>/weights/cmrfm_scratch.safetensors; the same `model` config). With train_seconds = 0 it is
    scored as saved: inference-only ablations (e.g. more CG iterations at test time) need no training."""
    varnet_init: str = ""
    """The same for the VarNet arm (an earlier run's <out>/weights/VarNet.safetensors, the same parameter
    target): with train_seconds = 0 it is scored as saved, e.g. when that run's scoring did not finish."""
    pretrain_seconds: float = 600.0
    """SSDU pretraining of the cmrfm SSL arm (no reference read)."""
    adapter_seconds: float = 300.0
    """Per pattern: the SSL arm's adapter fine-tuning."""
    loss: FinetuneLoss = field(default_factory=lambda: FinetuneLoss(region="ranking"))
    """The supervised loss of every trained arm (cmrfm, its adapters and VarNet alike), on the pixels
    the challenge scores (docs/design.md §7)."""
    lr: float = 1e-3
    lr_control: float = 30.0
    """The lr multiplier for the model's scalar controls (update gains and gates, DC weights, the final
    solve's mu: `models.recon.is_control_parameter`) wherever the whole model trains (cmrfm scratch, SSL
    pretraining); adapters train only their own weights."""
    lr_adapter: float = 3e-3
    adapter_rank: int = 8
    adapter_targets: str = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    sense_lamdas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 3e-2, 1e-1])
    l1_lamdas: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2])
    tune_slices: int = 2
    """Training slices the classical regularisation is picked on (R 16, every pattern)."""
    figure_R: int = 16
    timing_repeats: int = 1
    """Timed runs per method and pattern at the real slice size (the median is reported); the methods
    take turns, so a change in the machine's load falls on all of them."""
    compare_with: list[str] = field(default_factory=list)
    """results.json files of earlier runs on the same corpus and problems: their peer arms (CG-SENSE,
    L1-wavelet, VarNet) that this run did not run are put beside this run's (table, costs, goals), so
    that a change to cmrfm need not retrain VarNet and rerun the classical arms. Refused unless both
    runs' zero-filled scores are identical in every cell (the check that the problems are the same)."""


# ---- problems -------------------------------------------------------------------------------------


def _ifft_readout(k: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse FFT along the readout (last axis), the convention of shards/fft.py."""
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-1), axis=-1, norm="ortho"), axes=-1)


def _fft_readout(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=-1), axis=-1, norm="ortho"), axes=-1)


def readout_window(nx: int, margin: float) -> tuple[int, int]:
    """Columns [x0, x1) holding the ranking crop's central third of the readout plus a margin."""
    keep = matlab_round_div(nx, 3)
    width = min(nx, keep + 2 * int(math.ceil(margin * keep)))
    width += width % 2
    x0 = max(nx // 2 - width // 2, 0)
    return x0, min(x0 + width, nx)


def crop_readout(k: np.ndarray, x0: int, x1: int) -> np.ndarray:
    """k-space (..., Y, X) -> k-space (..., Y, x1 - x0) of image columns [x0, x1) (hybrid-domain crop)."""
    return _fft_readout(_ifft_readout(k)[..., x0:x1])


@dataclass
class Problem:
    """One slice window: what every arm reconstructs, normalised by `scale`."""

    kus: np.ndarray  # complex64 (T, C, Y, X'), zero off the mask
    mask: np.ndarray  # float32 (T, Y, X')
    full: np.ndarray  # complex64 (T, C, Y, X'), the fully sampled k-space (training target)
    meta: dict
    scale: float
    columns: tuple[int, int]  # [x0, x1) of the full readout this problem covers
    nx: int  # full readout size

    def batch(self) -> dict:
        """The loader's batch format (B = 1) for models.recon / finetune.train.supervised_loss."""
        return {"kspace": torch.from_numpy(self.kus[None]), "mask": torch.from_numpy(self.mask[None]),
                "target": torch.from_numpy(self.full[None]), "meta": [self.meta]}

    def ranking_window(self) -> tuple[slice, slice]:
        """The ranking crop of the full matrix, in this problem's (possibly readout-cropped) columns."""
        rows, cols = ranking_window(self.full.shape[-2], self.nx)
        width = self.columns[1] - self.columns[0]  # a shifted training window may cut it at the edge
        return rows, slice(max(cols.start - self.columns[0], 0), min(cols.stop - self.columns[0], width))

    def target_image(self) -> np.ndarray:
        """RSS of the fully sampled frames (T, Y, X'), normalised."""
        return np.sqrt((np.abs(np_ifft2c(self.full)) ** 2).sum(1)).astype(np.float32)


def make_problem(k: np.ndarray, frames: np.ndarray, pattern: str, R: int, seed: int, meta: dict,
                 cfg: QualityConfig, x_shift: int = 0) -> Problem:
    """k: fully sampled (nt, C, Y, X) of one slice -> the Problem of `frames` under an official mask."""
    nt, _, ny, nx = k.shape
    mask = make_mask(pattern, R, nt, ny, nx, seed=seed)[frames]
    full = k[frames]
    x0, x1 = 0, nx
    if cfg.crop_readout and pattern in CARTESIAN:
        x0, x1 = readout_window(nx, cfg.readout_margin)
        x0, x1 = x0 + x_shift, x1 + x_shift
        if x0 < 0 or x1 > nx:
            x0, x1 = x0 - x_shift, x1 - x_shift
        full, mask = crop_readout(full, x0, x1), mask[..., x0:x1]
    kus = full * mask[:, None]
    scale = kspace_scale(kus)
    return Problem((kus / scale).astype(np.complex64), np.ascontiguousarray(mask, dtype=np.float32),
                   (full / scale).astype(np.complex64), dict(meta, pattern=pattern, R=R), scale, (x0, x1), nx)


@dataclass
class Case:
    """One k-space file of the corpus, fully sampled (nt, nz, C, Y, X), with its metadata."""

    path: Path
    kspace: np.ndarray
    meta: dict


def load_cases(paths: list[Path]) -> list[Case]:
    cases = []
    for p in paths:
        vendor, field_t, _ = parse_scanner(p.parent.parent.name)
        meta = {"modality": "cine", "view": p.stem.partition("_")[2], "vendor": vendor, "field_T": field_t,
                "__key__": str(p)}
        cases.append(Case(p, read_kspace(p), meta))
    return cases


def corpus(cfg: QualityConfig, work: Path) -> tuple[list[Case], list[Case]]:
    """(training cases, held-out evaluation cases): cine_sax of the real-size profile."""
    data = Path(cfg.corpus_dir) if cfg.corpus_dir else work / "data"
    syn = SyntheticConfig(out=str(data), profile="real", seed=cfg.seed, train_scanners=cfg.train_scanners,
                          val_scanners=[cfg.held_out], patients_per_scanner=cfg.patients_per_scanner,
                          val_patients_per_scanner=cfg.eval_patients, files_per_patient=1,
                          val_files_per_patient=1, nz_max=cfg.nz_max, patients_2024=0, fastmri_files=0)
    if cfg.tiny:
        syn = dataclasses.replace(syn, profile="", ny_min=40, ny_max=48, nx_min=72, nx_max=84, coils=4)
    write_corpus(syn)   # reuses `data` only when this config wrote it; refuses a corpus of another config
    train = sorted(data.glob("ChallengeData/MultiCoil/Cine/TrainingSet/FullSample/**/cine_sax.mat"))
    held = sorted(data.glob("ChallengeData_ValSet/**/FullSample_TaskR1/**/cine_sax.mat"))
    if not train or not held:
        raise SystemExit(f"{data}: no cine_sax training ({len(train)}) or held-out ({len(held)}) file")
    return load_cases(train), load_cases(held)


class ProblemSampler:
    """Random training problems: file, slice, frame window, pattern, R, mask seed, readout offset."""

    def __init__(self, cases: list[Case], cfg: QualityConfig, seed: int, patterns: tuple[str, ...] | None = None):
        self.cases, self.cfg, self.patterns = cases, cfg, tuple(patterns or cfg.patterns)
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> Problem:
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        nt, nz = case.kspace.shape[:2]
        z = int(self.rng.integers(nz))
        start = int(self.rng.integers(nt))
        frames = (start + np.arange(self.cfg.frames)) % nt  # cine is periodic
        pattern = str(self.rng.choice(self.patterns))
        R = int(self.rng.choice(RATES))
        shift = int(self.rng.integers(-8, 9))
        return make_problem(case.kspace[:, z], frames, pattern, R, int(self.rng.integers(2**31 - 1)), case.meta,
                            self.cfg, shift)


# ---- arms -----------------------------------------------------------------------------------------


def cmrfm_image(model: torch.nn.Module, problem: Problem) -> np.ndarray:
    """RSS magnitude (T, Y, X') of the model's k-space, normalised units."""
    b = problem.batch()
    out = model(b["kspace"], b["mask"], b["meta"])["kspace"]
    return rss(ifft2c(out), dim=2)[0].float().numpy()


def to_fastmri(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (T, C, Y, X) with Y the phase encode -> fastMRI's (B=T, C, H=X, W=Y, 2) k-space with the
    phase encode along W, and its bool mask (T, 1, X, Y, 1); frames are VarNet's batch (it is 2-D)."""
    k = torch.from_numpy(np.ascontiguousarray(problem.kus.transpose(0, 1, 3, 2)))
    m = torch.from_numpy(np.ascontiguousarray(problem.mask.transpose(0, 2, 1)))[:, None, :, :, None] > 0
    return torch.view_as_real(k).contiguous(), m


def varnet_image(model: torch.nn.Module, problem: Problem) -> np.ndarray:
    """VarNet's RSS output, back in our (T, Y, X') orientation."""
    k, m = to_fastmri(problem)
    return model(k, m, num_low_frequencies=20).transpose(-2, -1)


def build_varnet(cfg: QualityConfig, target_params: int) -> tuple[torch.nn.Module, int]:
    """fastMRI VarNet with the U-Net width chosen so its parameter count is closest to `target_params`."""
    from fastmri.models import VarNet

    best = None
    for chans in range(2, 65):
        torch.manual_seed(train_seed(cfg))
        model = VarNet(num_cascades=cfg.varnet_cascades, sens_chans=cfg.varnet_sens_chans, chans=chans)
        n = parameter_count(model)
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (model, n)
        if n > target_params:
            break
    return best


def train_seed(cfg: QualityConfig) -> int:
    return cfg.seed if cfg.train_seed < 0 else cfg.train_seed


def train_for(seconds: float, params: list[torch.nn.Parameter] | list[dict], loss_fn: Callable[[], torch.Tensor],
              lr: float, name: str, max_steps: int = 0) -> dict:
    """AdamW on `params` for a wall-clock budget, cosine-decayed over the time used; returns stats.
    max_steps > 0: exactly that many steps instead (step-matched arms, whatever the machine's load),
    cosine-decayed over the steps. `params` may be parameter groups whose "lr" is their base lr."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    params = [p for g in opt.param_groups for p in g["params"]]
    t0, steps, losses = time.perf_counter(), 0, []
    while (steps < max_steps) if max_steps else (time.perf_counter() - t0 < seconds):
        elapsed = time.perf_counter() - t0
        progress = steps / max_steps if max_steps else min(elapsed / seconds, 1.0)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss at step {steps}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
        if steps % 10 == 0:
            print(f"[quality] {name}: step {steps}" + (f"/{max_steps}" if max_steps else "") + f", {elapsed:.0f}/{seconds:.0f} s, "
                  f"loss {np.mean(losses[-10:]):.4f}, {steps / max(elapsed, 1e-9):.2f} steps/s", file=sys.stderr)
    took = time.perf_counter() - t0
    return {"steps": steps, "seconds": took, "step_s": took / max(steps, 1), "final_loss": float(np.mean(losses[-25:])) if losses else float("nan")}  # 0 s: the untrained model


def control_groups(model: torch.nn.Module, lr: float, scale: float) -> list[dict]:
    """The model's trainable parameters as two AdamW groups: the scalar controls at lr x scale, the rest at lr."""
    weights, controls = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (controls if is_control_parameter(n) else weights).append(p)
    return [{"params": weights, "lr": lr}, {"params": controls, "lr": lr * scale}]


def train_supervised(model: torch.nn.Module, image_fn: Callable, sampler: ProblemSampler, cfg: QualityConfig,
                     seconds: float, lr: float, name: str, params: list | None = None, max_steps: int = 0) -> dict:
    weights = cfg.loss

    def loss_fn() -> torch.Tensor:
        problem = sampler()
        window = problem.ranking_window()
        if image_fn is cmrfm_image:
            return supervised_loss(model, problem.batch(), weights, window)[0]
        return region_loss(image_fn(model, problem), torch.from_numpy(problem.target_image()), weights, window)[0]

    model.train()
    stats = train_for(seconds, params or [p for p in model.parameters() if p.requires_grad], loss_fn, lr, name,
                      max_steps)
    model.eval()
    return stats


def train_ssl(model: torch.nn.Module, sampler: ProblemSampler, cfg: QualityConfig, max_steps: int = 0) -> dict:
    """SSDU on undersampled training data: the reference (`full`) is never read (max_steps: train_for's)."""
    # the maps from every acquired sample: the split's 8 ACS rows are too few for ESPIRiT (BENCHMARKS.md)
    objective = ObjectiveConfig(sens_from_acquired=True)
    step = [0]

    def loss_fn() -> torch.Tensor:
        b = sampler().batch()
        b.pop("target")
        step[0] += 1
        return ssdu_step_loss(model, b, objective, train_seed(cfg), step[0])

    model.train()
    stats = train_for(cfg.pretrain_seconds, control_groups(model, cfg.lr, cfg.lr_control), loss_fn, cfg.lr,
                      "cmrfm SSL pretraining", max_steps)
    model.eval()
    return stats


# ---- classical ------------------------------------------------------------------------------------


def classical_image(method: str, problem: Problem, lamda: float = 0.0, maps: np.ndarray | None = None) -> np.ndarray:
    if method == "zero_filled":
        return np.abs(zero_filled(problem.kus, problem.mask))
    fn = sense if method == "sense" else l1_wavelet
    return np.abs(fn(problem.kus, problem.mask, lamda=lamda, maps=maps))


def tune_classical(method: str, lamdas: list[float], problems: list[Problem]) -> tuple[float, dict]:
    """The lamda with the best mean PSNR (clean, central crop) over the training problems."""
    maps = [espirit_maps(p.kus, p.mask) for p in problems]
    scores = {}
    for lam in lamdas:
        ps = []
        for p, mps in zip(problems, maps):
            ref = p.target_image()
            rec = classical_image(method, p, lam, mps)
            ps.append(score_file(crop_selected(rec[:, None]), crop_selected(ref[:, None]), challenge_exact=False).psnr)
        scores[lam] = float(np.mean(ps))
        print(f"[quality] tune {method}: lamda {lam:g} -> {scores[lam]:.2f} dB", file=sys.stderr)
    return max(scores, key=scores.get), scores


# ---- evaluation -----------------------------------------------------------------------------------


def canvas(image: np.ndarray, problem: Problem, ny: int) -> np.ndarray:
    """A reconstruction of columns [x0, x1) (T, Y, X') in physical units on the full (T, Y, nx) grid."""
    out = np.zeros(image.shape[:-1] + (problem.nx,), dtype=np.float32)
    out[..., problem.columns[0]:problem.columns[1]] = image * problem.scale
    return out


def scoring_window(nt: int, name: str, frames: int) -> tuple[np.ndarray, list[int]]:
    """The frames a method reconstructs for scoring, and which of them the scorer reads.

    The ranking scores the first frames (challenge.ranking.select_frames, 3 for cine); a model trained
    on longer windows (`frames` = 5) reconstructs them with neighbours on both sides (cine is
    periodic), as it was trained, and only the scored ones are kept."""
    official = select_frames(nt, name)
    if frames <= len(official) or len(official) == nt:
        return np.array(official), list(range(len(official)))
    before = (frames - len(official)) // 2
    window = (official[0] - before + np.arange(frames)) % nt
    return window, list(range(before, before + len(official)))


def evaluate(methods: dict[str, Callable[[Problem], np.ndarray]], cases: list[Case],
             cfg: QualityConfig) -> tuple[list[dict], dict[str, list[float]]]:
    """Score every method on every (pattern, R) over the held-out cases; returns rows and seconds/slice."""
    rows, timing = [], {name: [] for name in methods}
    for pattern in cfg.patterns:
        for R in RATES:
            row = {"pattern": pattern, "R": R}
            per = {name: {"psnr": [], "ssim": [], "psnr_clean": [], "ssim_clean": []} for name in methods}
            for ci, case in enumerate(cases):
                nt, nz, _, ny, nx = case.kspace.shape
                frames, scored = scoring_window(nt, case.path.stem, cfg.frames)
                slices = select_slices(nz)
                reference = img4ranking_from_kspace(case.kspace, case.path.stem)
                images = {name: [] for name in methods}
                for z in slices:
                    problem = make_problem(case.kspace[:, z], frames, pattern, R, cfg.seed + ci, case.meta, cfg)
                    for name, fn in methods.items():
                        t0 = time.perf_counter()
                        with torch.inference_mode():
                            img = np.asarray(fn(problem), dtype=np.float32)[scored]
                        timing[name].append(time.perf_counter() - t0)
                        images[name].append(canvas(img, problem, ny))
                for name in methods:
                    recon = crop_selected(np.stack(images[name], axis=1))  # (F, Z, Y, X) -> official crop
                    exact = score_file(recon, reference, challenge_exact=True, scorer="test2025")
                    clean = score_file(recon, reference, challenge_exact=False)
                    per[name]["psnr"].append(exact.psnr)
                    per[name]["ssim"].append(exact.ssim)
                    per[name]["psnr_clean"].append(clean.psnr)
                    per[name]["ssim_clean"].append(clean.ssim)
            for name in methods:
                row[name] = {k: float(np.mean(v)) for k, v in per[name].items()}
            rows.append(row)
            print(f"[quality] {pattern} R{R}: " + ", ".join(f"{n} {row[n]['psnr']:.2f}" for n in methods),
                  file=sys.stderr)
    return rows, timing


def weights_name(arm: str) -> str:
    """File name of an arm's weights under <out>/weights/ ("cmrfm SSL+adapters ktRadial" ->
    "cmrfm_SSL+adapters_ktRadial.safetensors")."""
    return arm.replace(" ", "_") + ".safetensors"


def save_weights(trained: dict[str, torch.nn.Module], folder: Path) -> None:
    """Every trained model of this run as safetensors (no pickle), so figures and inference-only
    ablations can be made again without training; each file is written whole or not at all."""
    from safetensors.torch import save

    for arm, model in trained.items():
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        write_atomic(folder / weights_name(arm), save(tensors, metadata={"arm": arm}))


def load_saved(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """`model` with the weights `save_weights` wrote to `path` (safetensors: no pickle)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


def earlier_methods(path: Path, cfg: QualityConfig, n_cmrfm: int) -> dict[str, Callable[[Problem], np.ndarray]]:
    """The peer arms of an earlier run (`compare_with`) as methods, for the figures: the classical arms
    with the regularisation that run tuned, VarNet from the weights it saved (same build: the same
    parameter target and config). A peer that cannot be rebuilt is left out of the figures, loudly."""
    earlier = json.loads(path.read_text())
    arms = set(earlier["rows"][0]) & PEER_ARMS
    methods: dict[str, Callable[[Problem], np.ndarray]] = {}
    for arm in sorted(arms & CLASSICAL_ARMS):
        method = CLASSICAL_METHODS[arm]
        methods[arm] = functools.partial(classical_image, method, lamda=earlier["tuning"][method][0])
    if "VarNet" in arms:
        weights = path.parent / "weights" / weights_name("VarNet")
        if weights.is_file():
            varnet = load_saved(build_varnet(cfg, n_cmrfm)[0], weights).eval()
            methods["VarNet"] = lambda p: varnet_image(varnet, p).numpy()
        else:
            print(f"[quality] WARNING: {weights} is missing: the figures leave out {path}'s VarNet column "
                  "(its scores are in the tables)", file=sys.stderr)
    return methods


def figure_panels(methods: dict[str, Callable[[Problem], np.ndarray]], cases: list[Case],
                  cfg: QualityConfig) -> dict:
    """Per pattern, frame 1 of the first held-out file's first scored slice at R = figure_R (the problem
    `evaluate` scores there): every method's image, the reference and the reconstructed columns."""
    case = cases[0]
    nt, nz, _, ny, _ = case.kspace.shape
    frames, scored = scoring_window(nt, case.path.stem, cfg.frames)
    z = select_slices(nz)[0]
    keep: dict = {}
    for pattern in cfg.patterns:
        problem = make_problem(case.kspace[:, z], frames, pattern, cfg.figure_R, cfg.seed, case.meta, cfg)
        keep[pattern] = {"reference": canvas(problem.target_image()[scored], problem, ny)[0], "columns": problem.columns}
        for name, fn in methods.items():
            with torch.inference_mode():
                keep[pattern][name] = canvas(np.asarray(fn(problem), dtype=np.float32)[scored], problem, ny)[0]
    return keep


def write_figures(keep: dict, out: Path, names: list[str], R: int) -> list[Path]:
    """Per pattern at R = figure_R: images (full field of view) and error maps on one shared scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for pattern, imgs in keep.items():
        ref = imgs["reference"]
        x0, x1 = imgs["columns"]
        crop = (slice(None), slice(x0, x1)) if x1 - x0 < ref.shape[1] else (slice(None), slice(None))
        ref_c = ref[crop]
        vmax = float(np.percentile(ref_c, 99.5))
        cols = ["reference"] + names
        errs = {n: np.abs(imgs[n][crop] - ref_c) for n in names}
        emax = max(float(np.percentile(e, 99.5)) for e in errs.values()) or 1.0
        h, w = ref_c.shape
        scale = max(256 / w, 256 / h, 1.0) / 100  # each panel at least 256 px across
        fig, axes = plt.subplots(2, len(cols), figsize=(len(cols) * w * scale, 2 * h * scale + 0.6), squeeze=False)
        for j, name in enumerate(cols):
            axes[0, j].imshow(imgs[name][crop], cmap="gray", vmin=0, vmax=vmax)
            axes[0, j].set_title(name, fontsize=9)
            if name != "reference":
                axes[1, j].imshow(errs[name], cmap="magma", vmin=0, vmax=emax)
                axes[1, j].set_title(f"|error| (max {emax:.3g})", fontsize=8)
            for a in axes[:, j]:
                a.axis("off")
        fig.suptitle(f"{pattern} R{R}, frame 1, held-out scanner", fontsize=10)
        fig.tight_layout()
        path = out / f"quality_{pattern}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def inference_timing(methods: dict[str, Callable[[Problem], np.ndarray]], cfg: QualityConfig,
                     size: tuple[int, int, int] = (10, 246, 512)) -> dict[str, dict[str, float]]:
    """Seconds per slice (3 frames) of every method at a real slice size, per pattern at R 16.

    The k-space is the real profile's phantom at that size; Cartesian patterns use the readout crop
    (for every method alike), ktRadial the full matrix. Each method runs once to warm up, then
    `timing_repeats` times in turn with the others; the median is kept."""
    from shards.phantom import coil_maps, random_anatomy, render_images

    coils, ny, nx = size
    rng = np.random.default_rng(cfg.seed)
    img = render_images("cine_sax", 12, 1, ny, nx, 2.0, random_anatomy(rng), rng, detail=True)[:, 0]
    k = np_fft2c(img[:, None] * coil_maps(coils, ny, nx, 2.0, rng)[None]).astype(np.complex64)
    out: dict[str, dict[str, float]] = {}
    for pattern in cfg.patterns:
        problem = make_problem(k, np.arange(cfg.frames), pattern, 16, cfg.seed, {"modality": "cine", "view": "sax"}, cfg)
        runs: dict[str, list[float]] = {name: [] for name in methods}
        with torch.inference_mode():
            for name, fn in methods.items():
                fn(problem)  # warm-up (allocations, ESPIRiT kernels)
            for _ in range(max(cfg.timing_repeats, 1)):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    fn(problem)
                    runs[name].append(time.perf_counter() - t0)
        for name in methods:
            out.setdefault(name, {})[pattern] = float(np.median(runs[name]))
        print(f"[quality] inference at {size} x {cfg.frames} frames, {pattern} R16: "
              + ", ".join(f"{n} {out[n][pattern]:.2f} s" for n in methods), file=sys.stderr)
    return out


# ---- main -----------------------------------------------------------------------------------------


def tiny_overrides(cfg: QualityConfig) -> QualityConfig:
    return dataclasses.replace(
        cfg, patients_per_scanner=1, eval_patients=1, nz_max=1, train_seconds=min(cfg.train_seconds, 4.0),
        pretrain_seconds=min(cfg.pretrain_seconds, 3.0), adapter_seconds=min(cfg.adapter_seconds, 1.0),
        sense_lamdas=cfg.sense_lamdas[:2], l1_lamdas=cfg.l1_lamdas[:2], tune_slices=1, varnet_cascades=2,
        model=dataclasses.replace(cfg.model, dim=32, depth=1, heads=2, cascades=2, conv_channels=4, patch=4))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(QualityConfig, argv, description="real-difficulty quality benchmark")
    if cfg.tiny:
        cfg = tiny_overrides(cfg)
    bad = sorted(set(cfg.patterns) - set(PATTERNS))
    if bad or not cfg.patterns:
        raise SystemExit(f"bench/quality.py: patterns {bad or '(none)'} not among {', '.join(PATTERNS)}")
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"bench/quality.py: unknown arm(s) {unknown}; known: {', '.join(ARMS)} (comma-separated)")
    inputs = [("compare_with", p) for p in cfg.compare_with] + [
        (what, path) for what, path in (("scratch_init", cfg.scratch_init), ("varnet_init", cfg.varnet_init)) if path]
    for what, path in inputs:
        if not Path(path).is_file():  # fail before hours of training, not after
            raise SystemExit(f"bench/quality.py: {what} {path}: no such file")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    train_cases, eval_cases = corpus(cfg, out)
    print(f"[quality] {len(train_cases)} training files, {len(eval_cases)} held-out files "
          f"({cfg.held_out}); shapes {[c.kspace.shape for c in eval_cases]}", file=sys.stderr)

    methods: dict[str, Callable[[Problem], np.ndarray]] = {
        "zero-filled": lambda p: classical_image("zero_filled", p, 0.0)}
    trained: dict[str, torch.nn.Module] = {}  # saved under <out>/weights/
    cost: dict[str, dict] = {}
    tuning: dict[str, tuple[float, dict]] = {}
    torch.manual_seed(cfg.seed)
    n_cmrfm = parameter_count(build_model(cfg.model, device="meta"))

    if CLASSICAL_ARMS & set(cfg.arms):  # regularisation picked on training slices, never the held-out ones
        tuner = ProblemSampler(train_cases, cfg, cfg.seed + 4)
        tune_problems = []
        for pattern in cfg.patterns:
            tuner.patterns = (pattern,)
            tune_problems += [tuner() for _ in range(cfg.tune_slices)]
        for arm, lamdas in (("CG-SENSE", cfg.sense_lamdas), ("L1-wavelet", cfg.l1_lamdas)):
            method = CLASSICAL_METHODS[arm]
            if arm in cfg.arms:
                tuning[method] = tune_classical(method, lamdas, tune_problems)
                methods[arm] = functools.partial(classical_image, method, lamda=tuning[method][0])

    if "VarNet" in cfg.arms:  # same labels, masks, loss and budget; parameter count matched to cmrfm
        varnet, n_varnet = build_varnet(cfg, n_cmrfm)
        if cfg.varnet_init:
            load_saved(varnet, cfg.varnet_init)
            print(f"[quality] VarNet starts from {cfg.varnet_init}", file=sys.stderr)
        cost["VarNet"] = train_supervised(varnet, varnet_image, ProblemSampler(train_cases, cfg, train_seed(cfg) + 1), cfg,
                                          cfg.train_seconds, cfg.lr, "VarNet") | {"parameters": n_varnet}
        methods["VarNet"] = lambda p: varnet_image(varnet, p).numpy()
        trained["VarNet"] = varnet

    if "cmrfm scratch" in cfg.arms:  # the same architecture, supervised from random init
        torch.manual_seed(train_seed(cfg))
        scratch = build_model(cfg.model)
        if cfg.scratch_init:
            load_saved(scratch, cfg.scratch_init)
            print(f"[quality] cmrfm scratch starts from {cfg.scratch_init}", file=sys.stderr)
        groups = control_groups(scratch, cfg.lr, cfg.lr_control)
        cost["cmrfm scratch"] = train_supervised(scratch, cmrfm_image, ProblemSampler(train_cases, cfg, train_seed(cfg) + 1),
                                                 cfg, cfg.train_seconds, cfg.lr, "cmrfm scratch", groups,
                                                 max_steps=cfg.train_steps) | {"parameters": n_cmrfm}
        methods["cmrfm scratch"] = lambda p: cmrfm_image(scratch, p)
        trained["cmrfm scratch"] = scratch

    if "cmrfm SSL+adapters" in cfg.arms:  # SSDU pretraining (no reference), then one adapter per pattern
        torch.manual_seed(train_seed(cfg))
        pretrained = build_model(cfg.model)
        arm = cost["cmrfm SSL+adapters"] = {"pretrain": train_ssl(pretrained, ProblemSampler(train_cases, cfg, train_seed(cfg) + 2), cfg),
                                            "parameters": n_cmrfm}
        adapted = {}
        for pattern in cfg.patterns:
            model = copy.deepcopy(pretrained)
            add_adapters(model, cfg.adapter_rank, 2.0 * cfg.adapter_rank, cfg.adapter_targets)
            params = adapter_parameters(model)
            arm[pattern] = train_supervised(model, cmrfm_image, ProblemSampler(train_cases, cfg, train_seed(cfg) + 3, (pattern,)),
                                            cfg, cfg.adapter_seconds, cfg.lr_adapter, f"adapter {pattern}", params)
            arm["trainable"] = sum(p.numel() for p in params)
            merge_adapters(model)
            adapted[pattern] = model.eval()
            trained[f"cmrfm SSL+adapters {pattern}"] = model
        methods["cmrfm SSL+adapters"] = lambda p: cmrfm_image(adapted[p.meta["pattern"]], p)

    rows, timing = evaluate(methods, eval_cases, cfg)
    save_weights(trained, out / "weights")
    drawn = methods | {n: f for path in cfg.compare_with for n, f in earlier_methods(Path(path), cfg, n_cmrfm).items()
                       if n not in methods}
    drawn = {n: drawn[n] for n in ["zero-filled", *ARMS] if n in drawn}  # columns in the bench's arm order
    figures = write_figures(figure_panels(drawn, eval_cases, cfg), out, list(drawn), cfg.figure_R)
    real_size = (4, 48, 96) if cfg.tiny else (10, 246, 512)
    # every method drawn is timed here, side by side, the earlier runs' peers included (their own timings
    # were taken under another load); this run's timings win over theirs in with_earlier_arms
    speed = inference_timing(drawn, cfg, real_size)
    for path in cfg.compare_with:  # the first file that has an arm this run lacks provides it
        rows, cost, timing, speed, tuning = with_earlier_arms(Path(path), rows, cost, timing, speed, tuning)
    report(cfg, rows, cost, timing, tuning, figures, time.perf_counter() - t_all, out, eval_cases, speed, real_size)
    return 0


def with_earlier_arms(path: Path, rows: list[dict], cost: dict, timing: dict, speed: dict,
                      tuning: dict) -> tuple[list[dict], dict, dict, dict, dict]:
    """This run's results with the arms of an earlier run (`compare_with`) that this one did not run,
    columns in the bench's arm order; SystemExit if the two runs did not score the same problems."""
    try:
        earlier = json.loads(path.read_text())
        old_rows = {(r["pattern"], r["R"]): r for r in earlier["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"bench/quality.py: compare_with {path}: not a results.json of this bench ({e})")
    merged = []
    for r in rows:
        old = old_rows.get((r["pattern"], r["R"]))
        if old is None or old.get("zero-filled") != r["zero-filled"]:
            raise SystemExit(f"bench/quality.py: compare_with {path}: its zero-filled score for {r['pattern']} "
                             f"R{r['R']} differs from this run's, so the problems differ (corpus, seed, frames "
                             "or crop); the arms cannot be put side by side")
        # only the peers: an earlier run's cmrfm column is another model, not a baseline
        names = ["zero-filled"] + [a for a in ARMS if a in r or (a in old and a in PEER_ARMS)]
        merged.append({"pattern": r["pattern"], "R": r["R"]} | {a: r[a] if a in r else old[a] for a in names})
    added = [a for a in merged[0] if a not in rows[0]]
    print(f"[quality] from {path}: {', '.join(added) or 'no arm'} (zero-filled scores identical in every cell)",
          file=sys.stderr)
    cost = {a: earlier["cost"][a] for a in added if a in earlier.get("cost", {})} | cost
    timing = {a: [earlier["timing_s_per_slice"][a]] for a in added} | timing
    speed = {a: earlier["inference_real_size"]["seconds"][a] for a in added} | speed
    earlier_tuning = {CLASSICAL_METHODS[a]: earlier.get("tuning", {}).get(CLASSICAL_METHODS[a])
                      for a in added if a in CLASSICAL_METHODS}
    tuning = {m: (t[0], {float(k): v for k, v in t[1].items()}) for m, t in earlier_tuning.items() if t} | tuning
    return merged, cost, timing, speed, tuning


def report(cfg: QualityConfig, rows: list[dict], cost: dict, timing: dict, tuning: dict, figures: list[Path],
           total_s: float, out: Path, eval_cases: list[Case], speed: dict, real_size: tuple[int, int, int]) -> None:
    names = [n for n in rows[0] if n not in ("pattern", "R")]
    lines = [f"PSNR / SSIM on the held-out {cfg.held_out} cine_sax ({len(eval_cases)} files, "
             f"{[tuple(c.kspace.shape) for c in eval_cases]}), official crop; challenge-exact first, clean below\n",
             "| pattern | R | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key in ("", "_clean"):
        if key:
            lines += ["", "clean (reference as the reference):", "",
                      "| pattern | R | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in rows:
            lines.append(f"| {r['pattern']} | {r['R']} | " + " | ".join(
                f"{r[n]['psnr' + key]:.2f} / {r[n]['ssim' + key]:.4f}" for n in names) + " |")
        mean = {n: (np.mean([r[n]["psnr" + key] for r in rows]), np.mean([r[n]["ssim" + key] for r in rows]))
                for n in names}
        lines.append("| **mean** | | " + " | ".join(f"**{mean[n][0]:.2f} / {mean[n][1]:.4f}**" for n in names) + " |")
    lines += ["", "| arm | parameters | training s | steps | s/step | inference s/slice |", "|---|---|---|---|---|---|"]
    for n in names:
        c = cost.get(n, {})
        if n == "cmrfm SSL+adapters":
            pre = c["pretrain"]
            secs = pre["seconds"] + sum(c[p]["seconds"] for p in cfg.patterns)
            steps = f"{pre['steps']} SSL + " + "/".join(str(c[p]["steps"]) for p in cfg.patterns)
            lines.append(f"| {n} | {c['parameters']:,} (+{c['trainable']:,} LoRA per pattern) | {secs:.0f} | {steps} | "
                         f"{pre['step_s']:.2f} | {np.mean(timing[n]):.2f} |")
        elif c:
            lines.append(f"| {n} | {c['parameters']:,} | {c['seconds']:.0f} | {c['steps']} | {c['step_s']:.2f} | "
                         f"{np.mean(timing[n]):.2f} |")
        else:
            lines.append(f"| {n} | - | - | - | - | {np.mean(timing[n]):.2f} |")
    lines += ["", f"Inference seconds per slice at {real_size[0]} coils x {real_size[1]} x {real_size[2]}, "
              f"{cfg.frames} frames, R 16 (this CPU, {torch.get_num_threads()} thread(s); median of "
              f"{max(cfg.timing_repeats, 1)} run(s) per method, the methods in turn; a method whose weights or "
              "settings this run could not rebuild keeps its own run's timing):", "",
              "| method | " + " | ".join(cfg.patterns) + " |", "|---|" + "---|" * len(cfg.patterns)]
    lines += [f"| {n} | " + " | ".join(f"{speed[n][p]:.2f}" for p in cfg.patterns) + " |" for n in names]
    cells = [(r["pattern"], r["R"]) for r in rows]
    goals = []
    ours = [n for n in ("cmrfm scratch", "cmrfm SSL+adapters") if n in names]
    if ours:
        best = max(ours, key=lambda n: np.mean([r[n]["psnr"] for r in rows]))
        goals.append(f"Goals (best cmrfm arm: {best}):")
        classical = [n for n in ("CG-SENSE", "L1-wavelet") if n in names]
        if classical:
            ahead = sum(all(r[best]["psnr"] > r[c]["psnr"] and r[best]["ssim"] > r[c]["ssim"] for c in classical)
                        for r in rows)
            goals.append(f"- ahead of {' and '.join(classical)} in PSNR and SSIM: {ahead}/{len(cells)} cells "
                         f"({'met' if ahead == len(cells) else 'NOT met'})")
        if "VarNet" in names:
            ahead = sum(r[best]["psnr"] > r["VarNet"]["psnr"] for r in rows)
            gap = float(np.mean([r[best]["psnr"] - r["VarNet"]["psnr"] for r in rows]))
            n_v, n_c = cost["VarNet"]["parameters"], cost[best]["parameters"]
            goals += [f"- ahead of VarNet: {ahead}/{len(cells)} cells, mean {gap:+.2f} dB "
                      f"({'met' if ahead >= 7 and gap > 0 else 'NOT met'})",
                      f"- VarNet parameters {n_v:,} vs cmrfm {n_c:,} ({100 * (n_v / n_c - 1):+.1f}%, goal within 10%)"]
        if "CG-SENSE" in names:
            goals.append("- inference at the real slice size no slower than CG-SENSE: " + ", ".join(
                f"{p} {speed[best][p]:.2f} vs {speed['CG-SENSE'][p]:.2f} s" for p in cfg.patterns))
    for method, (lam, scores) in tuning.items():
        goals.append(f"- {method} lamda {lam:g}, picked on training slices (`tune_slices` per pattern): "
                     + ", ".join(f"{k:g} -> {v:.2f} dB" for k, v in scores.items()))
    goals.append(f"- figures: {', '.join(str(f) for f in figures)}")
    lines += [""] + goals + [
              f"\nSeed {cfg.seed} (training seed {train_seed(cfg)}); model {dataclasses.asdict(cfg.model)}; crop_readout {cfg.crop_readout}; "
              f"total {total_s / 60:.1f} min on this machine.",
              f"Command: python bench/quality.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip()]
    text = "\n".join(lines)
    print(text)
    (out / "quality.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows, "cost": cost,
                                                  "timing_s_per_slice": {k: float(np.mean(v)) for k, v in timing.items()},
                                                  "inference_real_size": {"size": list(real_size), "seconds": speed},
                                                  "tuning": {k: [v[0], v[1]] for k, v in tuning.items()}},
                                                 indent=2, default=float) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
