"""Test-time self-supervised adaptation: an adapter fitted to an unseen scanner's own undersampled k-space.

    python -m finetune.reconstruct --set input=TREE --set out=DIR --set adapt.steps=30

A center or scanner that no training set held has, at test time, only undersampled k-space. For each
(center, vendor) group of the input tree and each model its files use (the merged supervised adapter
of their contrast and pattern, or the bare backbone; `adapt.start = "backbone"`: the bare backbone for
every file), a fresh LoRA (B = 0: it starts as a no-op) is trained on T-frame windows of the group's
files with pretraining's SSDU objective (pretrain.objective: the acquired samples split into an input
set Θ and a loss set Λ; the loss is the k-space error on Λ). Only `*_kus_*.mat` and their masks are
read, never a FullSample file.

The known failures of test-time adaptation: (1) drift of the self-supervised loss: with few data, the
loss on the training windows keeps falling while the held-out one rises. The guard: a share of the
windows (`adapt.holdout`) is never trained on; their SSDU loss under fixed splits is measured before
the first step and every `eval_every` steps. The weights with the lowest held-out loss are kept; after
`patience` evaluations in a row above that best the run stops early; when no evaluation beat the
unadapted model the group falls back to it. (2) A held-out SSDU loss that falls while the image gets
worse: measured on a supervised adapter (BENCHMARKS.md, issue 14, third and fourth passes), which
was trained for the whole acquired set -> reference task, not for SSDU's Θ -> Λ one. No
self-supervised loss sees that, so on a supervised adapter the loss gets a consistency anchor
(`adapt.anchor`): the relative change of the window's image from the unadapted model's.
`adapt.max_drift` optionally refuses weights whose held-out image moved more than a limit. The status
("adapted", "stopped early", "fallback"), the start, the anchor used and the held-out drift curve are
logged and written with the adapter.

Output, beside the submission tree (never inside it: the scorer rejects extra files), written under a
staging name and swapped in whole like the tree itself:
    <out>_adapted/adapt_report.json   every group's status, start, anchor, held-out loss and drift curves,
                                      files and seconds
    <out>_adapted/<Center>/<Vendor>/<adapter name or backbone>/adapter_config.json + adapter_model.safetensors
        PEFT layout; the config holds the status, the held-out loss curve, the files adapted on and
        the settings, so the run can be checked and repeated.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from challenge.submission import parse_kus_path
from finetune.reconstruct import ModelBank, file_meta, load_pair, window_frames
from finetune.settings import AdaptConfig, ReconstructConfig, check_adapt_config
from models.adapters import adapter_parameters, add_adapters, adapter_state_dict, layer_regex, \
    load_adapter_state_dict, merge_adapters, save_adapter, select_targets, targets_for
from models.recon import ReconModel
from pretrain.objective import ssdu_step_loss
from shards.normalise import kspace_scale


@dataclass
class Window:
    """One training sample: normalised undersampled k-space (1, T, C, Y, X), mask (1, T, Y, X), meta."""

    kspace: torch.Tensor
    mask: torch.Tensor
    meta: dict


@dataclass
class AdaptResult:
    """What one group's adaptation did (also written to its adapter_config.json)."""

    status: str  # "adapted", "stopped early" or "fallback"
    heldout: list[list] = field(default_factory=list)  # [step, held-out SSDU loss] (JSON pairs)
    drift: list[list] = field(default_factory=list)  # [step, held-out image's relative change from unadapted]
    best_step: int = 0
    steps_run: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    train_windows: int = 0
    heldout_windows: int = 0


def group_of(path: Path) -> tuple[str, str]:
    """(center, vendor folder) of a kus file: the unit test-time adaptation works on."""
    case = parse_kus_path(path)
    return case.center, case.vendor


def draw_windows(paths: list[Path], frames: int, count: int, seed: int,
                 problems: list[str] | None = None) -> list[Window]:
    """Up to `count` T-frame windows (file, slice, non-overlapping frame windows), drawn at random with `seed`.

    Each is normalised by `kspace_scale` as the loader and reconstruct do. Reads only the kus files
    and their masks (finetune.reconstruct.load_pair); an unreadable file is left out and named in
    `problems` (reconstruct reports it again when it reaches it).
    """
    candidates: list[tuple[int, int, int]] = []
    loaded = []
    for path in paths:
        try:
            kspace, mask, _ = load_pair(path)
        except (ValueError, OSError) as exc:
            if problems is not None:
                problems.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
            continue
        loaded.append((kspace, mask, file_meta(path)[0]))
        nt, nz = kspace.shape[:2]
        candidates += [(len(loaded) - 1, z, t) for z in range(nz) for t in range(0, nt, frames)]
    random.Random(seed).shuffle(candidates)
    windows = []
    for i, z, t in candidates[:count]:
        kspace, mask, meta = loaded[i]
        idx, _ = window_frames(t + frames // 2, kspace.shape[0], frames)
        k, m = kspace[idx, z] * mask[idx][:, None], np.asarray(mask[idx], dtype=np.float32)
        k = (k / kspace_scale(k, m)).astype(np.complex64)
        windows.append(Window(torch.from_numpy(k)[None], torch.from_numpy(m)[None],
                              {**meta, "__key__": f"{meta['file']}:{z}:{t}"}))
    return windows


def heldout_loss(model: ReconModel, windows: list[Window], cfg: AdaptConfig, device: torch.device) -> float:
    """Mean SSDU loss over the held-out windows with fixed splits (the same at every evaluation)."""
    model.eval()
    with torch.no_grad():
        losses = [float(ssdu_step_loss(model, batch(w, device), cfg.objective, cfg.seed + 1, 0)) for w in windows]
    return float(np.mean(losses))


def batch(w: Window, device: torch.device) -> dict:
    return {"kspace": w.kspace.to(device), "mask": w.mask.to(device), "meta": [w.meta]}


def image_of(model: ReconModel, w: Window, device: torch.device) -> torch.Tensor:
    """The model's image of one window from its whole acquired set (what reconstruction computes)."""
    b = batch(w, device)
    return model(b["kspace"], b["mask"], b["meta"])["image"]


def relative_change(image: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """||image - anchor||_2 / ||anchor||_2 (complex; a scalar tensor, differentiable in `image`)."""
    eps = torch.finfo(torch.float32).eps
    return torch.linalg.vector_norm(image - anchor) / torch.linalg.vector_norm(anchor).clamp_min(eps)


def unadapted_images(model: ReconModel, windows: list[Window], device: torch.device) -> list[torch.Tensor]:
    """The images of `windows` before any step: the anchor and the reference of the drift guard."""
    model.eval()
    with torch.no_grad():
        return [image_of(model, w, device) for w in windows]


def drift(model: ReconModel, windows: list[Window], anchors: list[torch.Tensor], device: torch.device) -> float:
    """Mean relative change of the held-out windows' images from the unadapted model's (no reference read)."""
    model.eval()
    with torch.no_grad():
        return float(np.mean([float(relative_change(image_of(model, w, device), a)) for w, a in zip(windows, anchors)]))


def snapshot(model: ReconModel) -> dict[str, torch.Tensor]:
    """A copy of the adapter weights (adapter_state_dict's `.cpu()` is the live tensor on a CPU model)."""
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def adapt_model(base: ReconModel, windows: list[Window], cfg: AdaptConfig, device: torch.device,
                log: Callable[[str], None]) -> tuple[ReconModel, AdaptResult]:
    """A copy of `base` with a test-time LoRA fitted to `windows` (guarded); `base` is not changed.

    The loss is the SSDU loss plus, with `cfg.anchor` > 0, that weight times the relative change of the
    window's image from `base`'s. The kept weights are those of the lowest held-out SSDU loss among
    the evaluations whose held-out image drift is within `cfg.max_drift` (when set).
    Returns (model with the LoRA still unmerged, result). On fallback the LoRA is left at zero, so the
    model computes exactly what `base` does.
    """
    check_adapt_config(cfg)
    model = copy.deepcopy(base)
    torch.manual_seed(cfg.seed)
    if "conv" in cfg.layers and not select_targets(model, layer_regex(["conv"])):
        raise ValueError(f"adapt.layers = {cfg.layers}: this backbone has no convolutional stem or head "
                         "(model.conv_channels = 0), so the 'conv' group adapts nothing; set adapt.layers (e.g. attn,mlp)")
    add_adapters(model, cfg.rank, cfg.alpha, targets_for(cfg.targets, cfg.layers), forms=cfg.forms,
                 cascades=cfg.cascades)
    n_held = max(1, round(cfg.holdout * len(windows))) if len(windows) > 1 else 0
    held, train = (windows[:n_held], windows[n_held:]) if n_held else (windows, windows)  # one window: its own guard
    result = AdaptResult(status="adapted", train_windows=len(train), heldout_windows=len(held))
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=cfg.lr, weight_decay=0.0)
    held_anchors = unadapted_images(model, held, device)  # B = 0: exactly `base`'s images
    train_anchors = unadapted_images(model, train, device) if cfg.anchor > 0 else []
    best = heldout_loss(model, held, cfg, device)
    result.heldout.append([0, best])
    result.drift.append([0, 0.0])
    best_state, worse = snapshot(model), 0
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        model.train()
        i = (step - 1) % len(train)
        loss = ssdu_step_loss(model, batch(train[i], device), cfg.objective, cfg.seed, step)
        if cfg.anchor > 0:
            loss = loss + cfg.anchor * relative_change(image_of(model, train[i], device), train_anchors[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.steps_run = step
        if step % max(cfg.eval_every, 1) and step != cfg.steps:
            continue
        value, moved = heldout_loss(model, held, cfg, device), drift(model, held, held_anchors, device)
        result.heldout.append([step, value])
        result.drift.append([step, moved])
        within = cfg.max_drift <= 0 or moved <= cfg.max_drift
        if value < best and within:
            best, best_state, worse, result.best_step = value, snapshot(model), 0, step
        else:
            worse += 1
            if not within:
                log(f"step {step}: the held-out image moved {moved:.4f} from the unadapted one (adapt.max_drift "
                    f"{cfg.max_drift}); these weights are not kept")
            if worse >= cfg.patience and step != cfg.steps:
                result.status = "stopped early"
                log(f"held-out SSDU loss not below its best within the drift limit for {worse} evaluations "
                    f"(step {step}: {value:.6f}, best {best:.6f} at step {result.best_step}); stopping")
                break
    result.seconds = round(time.perf_counter() - t0, 2)
    load_adapter_state_dict(model, best_state)
    if result.best_step == 0:
        result.status = "fallback"
    model.eval()
    return model, result


class TestTimeAdapter:
    """Adapted models for the files of a tree, per (center, vendor, model used), adapted on first use."""

    __test__ = False  # not a pytest class

    def __init__(self, files: list[Path], bank: ModelBank, cfg: ReconstructConfig, log: Callable[[str], None],
                 out: Path) -> None:
        self.bank, self.cfg, self.log = bank, cfg, log
        self.out = out  # the staging folder of <out>_adapted (reconstruct swaps it in whole)
        self.groups: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
        for path in files:
            try:
                self.groups[self.key(path)].append(path)
            except ValueError:  # unparseable name: reconstruct reports it; nothing to adapt
                pass
        self.cache: dict[tuple[str, str, str], tuple[ReconModel, AdaptResult | None]] = {}
        self.results: dict[str, dict] = {}

    def key(self, path: Path) -> tuple[str, str, str]:
        """(center, vendor, what the LoRA sits on): "backbone" for every file with adapt.start = "backbone"."""
        if self.cfg.adapt.start == "backbone":
            return (*group_of(path), "backbone")
        _, contrast, pattern, _ = file_meta(path)
        _, name, _ = self.bank.get(contrast, pattern)
        return (*group_of(path), name)

    def model_for(self, path: Path) -> tuple[ReconModel, str] | None:
        """(adapted model, label) for this file, or None to use the bank's model unchanged."""
        try:
            key = self.key(path)
        except ValueError:
            return None
        if key not in self.cache:
            self.cache[key] = self._adapt(key)
        model, result = self.cache[key]
        if result is None or result.status == "fallback":
            return None
        return model, f"{key[2]}+adapted:{key[0]}/{key[1]}"

    def _adapt(self, key: tuple[str, str, str]) -> tuple[ReconModel, AdaptResult | None]:
        center, vendor, name = key
        files = self.groups[key]
        path0 = files[0]
        _, contrast, pattern, _ = file_meta(path0)
        a = self.cfg.adapt
        # start = "backbone": the supervised adapters are left out; the group is reconstructed with the
        # adapted backbone (BENCHMARKS.md issue 14, fourth pass: adapting on top of a supervised adapter
        # lowered the held-out SSDU loss while the image got worse)
        base = self.bank.backbone if a.start == "backbone" else self.bank.get(contrast, pattern)[0]
        say = lambda msg: self.log(f"adapt {center}/{vendor} ({name}): {msg}")  # noqa: E731
        problems: list[str] = []
        windows = draw_windows(files, self.cfg.frames, a.windows, a.seed, problems)
        for problem in problems:
            say(f"left out of adaptation: {problem}")
        if not windows:
            say("no readable file in the group; reconstructing it unadapted")
            return base, None
        # the anchor keeps a supervised adapter's output near itself (SSDU alone made it worse); on the
        # bare backbone, trained with this very objective, it only slowed the gain (AdaptConfig.anchor)
        a = dataclasses.replace(a, anchor=a.anchor_backbone if name == "backbone" else a.anchor)
        try:
            model, result = adapt_model(base, windows, a, self.bank.device, say)
        except (RuntimeError, ValueError) as exc:  # a shape the network cannot take, or adapter layers
            # the backbone lacks (layers = conv on a conv-less model): reconstruct names the files
            say(f"adaptation failed ({exc}); reconstructing the group unadapted")
            return base, None
        result.files = [str(p) for p in files if not any(str(p) in q for q in problems)]  # the files read
        curve = ", ".join(f"{s}:{v:.4f}" for s, v in result.heldout)
        moved = ", ".join(f"{s}:{v:.4f}" for s, v in result.drift)
        say(f"{result.status} after {result.steps_run} steps in {result.seconds:.1f} s on {result.train_windows} "
            f"window(s) of {len(files)} file(s), start {a.start}, anchor {a.anchor:g}; held-out SSDU loss {curve}; "
            f"held-out image change from unadapted {moved}"
            + ("; the held-out loss never fell: using the unadapted model" if result.status == "fallback" else ""))
        folder = self.out / center / vendor / name
        save_adapter(model, folder, {"cmrfm_test_time": True, "center": center, "vendor": vendor, "base_adapter": name,
                                     "start": a.start,
                                     "adapt": dataclasses.asdict(a), **dataclasses.asdict(result)})
        self.results[f"{center}/{vendor}/{name}"] = {"folder": str(folder.relative_to(self.out)), "start": a.start,
                                                     "anchor": a.anchor, **dataclasses.asdict(result)}
        merge_adapters(model)  # inference at backbone speed
        return model, result
