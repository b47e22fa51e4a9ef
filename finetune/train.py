"""Supervised fine-tuning of one LoRA adapter per (contrast, sampling pattern) on a frozen backbone.

    accelerate launch --config_file launch/accelerate_cpu.yaml -m finetune.train \
        --config configs/finetune_tiny.toml --set adapter.contrast=cine --set adapter.pattern=ktRadial

The pretrained backbone (pretrain.checkpoint.load_backbone) is frozen; LoRA adapters
(models.adapters: B = 0, so training starts exactly at the backbone) are the only parameters the
optimizer sees. The data are the training shards of that contrast (meta["modality"]), undersampled
on the fly with retrospective masks of that pattern at the configured accelerations (8/16/24); the
loss is (1 - SSIM) + L1 on the root-sum-of-squares image of the model's multi-coil k-space against
the RSS of the fully sampled reference: the coil combination the challenge scores (docs/cmrxrecon.md
§6.1). Output: <run.adapters>/<contrast>_<pattern>/adapter_config.json + adapter_model.safetensors
(PEFT's format; written under temporary names and renamed).

Benchmark arms: `run.full_finetune` trains every parameter of the pretrained model, `run.from_scratch`
every parameter of a randomly initialised one; both save a full model as backbone.safetensors +
model_config.json in the same folder (pretrain.checkpoint.load_backbone reads it back).

Distributed: accelerate (DDP, gloo on CPU / NCCL on GPUs) wraps the model; each rank reads its own
shards (shards.loader splits by node). Plain `python -m finetune.train` is one process. Resumable
from <run.dir>/state (finetune.resume: safetensors + JSON, no pickle); the loader position is part
of the state, so a resumed run continues with the batch the interrupted one would have used next.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from tqdm import tqdm

from finetune.resume import latest_tag, load_state, save_state, state_owner
from finetune.settings import AdapterSpec, FinetuneConfig, FinetuneLoss
from launch.cli import dump_config, parse_args
from models.adapters import adapter_parameters, add_adapters, layer_regex, save_adapter, select_targets, targets_for
from models.coils import rss
from models.fft import ifft2c
from models.losses import ssim
from models.recon import ReconModel
from models.sizes import build_model
from launch.outputs import FolderLock, publish_dir, remove_stale_staging, staging_path, write_atomic
from pretrain.checkpoint import MODEL_CONFIG, discard_incomplete, load_backbone, lock_dir, write_backbone
from shards.loader import make_loader, resolve_shards
from challenge.masks import PATTERNS_2025
from challenge.ranking import crop_size, crop_start
from shards.sample import member_key


#: adapter.contrast / adapter.pattern value meaning "every contrast" / "every 2025 pattern": a full model
#: trained on all of them (run.full_finetune or run.from_scratch), e.g. the shipped demo backbone.
ALL = "all"


def adapter_name(contrast: str, pattern: str) -> str:
    """Folder name of an adapter in the bank: `<contrast>_<pattern>`, contrast lower-case ("cine_ktRadial")."""
    return f"{contrast.strip().lower()}_{pattern.strip()}"


def run_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.run.dir or Path("out/finetune") / adapter_name(cfg.adapter.contrast, cfg.adapter.pattern))


# ---- model -------------------------------------------------------------------------------------


def build_trainable(cfg: FinetuneConfig, device: torch.device) -> ReconModel:
    """The model with exactly the parameters this run trains left requires_grad=True.

    adapter (default): pretrained backbone frozen + LoRA on `adapter.layers` (default: the convolutional
    stem and head, rank 16) or `.targets` in `.cascades`;
    full_finetune: pretrained backbone, everything trainable; from_scratch: random init (seeded),
    architecture from the backbone's model_config.json when there is one, else from [model].
    """
    if cfg.run.full_finetune and cfg.run.from_scratch:
        raise ValueError("run.full_finetune and run.from_scratch exclude each other")
    if ALL in (cfg.adapter.contrast.strip().lower(), cfg.adapter.pattern.strip().lower()) and not (
            cfg.run.full_finetune or cfg.run.from_scratch):
        raise ValueError(f"adapter.contrast/pattern = {ALL!r} trains one full model on everything: it needs "
                         "run.full_finetune or run.from_scratch (an adapter belongs to one contrast and pattern)")
    if cfg.run.from_scratch:
        torch.manual_seed(cfg.run.seed)
        source = Path(cfg.run.backbone)
        config_path = (source if source.is_dir() else source.parent) / MODEL_CONFIG
        arch = dataclasses.replace(cfg.model, **json.loads(config_path.read_text())) if config_path.is_file() else cfg.model
        return build_model(arch, device=device).train()
    model = load_backbone(cfg.run.backbone, device=device).train()
    if cfg.run.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    torch.manual_seed(cfg.run.seed)  # same LoRA A init on every rank (DDP also broadcasts rank 0's)
    add_configured_adapters(model, cfg.adapter)
    return model


def add_configured_adapters(model: ReconModel, a: AdapterSpec) -> list[str]:
    """`a`'s adapters on `model` (models.adapters.add_adapters); a layer group the model lacks is named
    with the setting to change (the default "conv" needs a backbone with a convolutional stem and head)."""
    try:
        return add_adapters(model, a.rank, a.alpha, targets_for(a.targets, a.layers), a.dropout, a.forms, a.cascades)
    except ValueError as exc:
        if "conv" not in a.layers or select_targets(model, layer_regex(["conv"])):
            raise
        raise ValueError(f"adapter.layers = {a.layers}: this backbone has no convolutional stem or head "
                         f"(model.conv_channels = {getattr(getattr(model, 'config', None), 'conv_channels', '?')}), "
                         "so the 'conv' group adapts nothing; set adapter.layers (e.g. attn,mlp)") from exc


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer gets: the adapters when the model has them, else every trainable parameter."""
    adapters = adapter_parameters(model)
    return adapters if adapters else [p for p in model.parameters() if p.requires_grad]


# ---- data --------------------------------------------------------------------------------------


def sample_filter(cfg: FinetuneConfig) -> Callable[[dict], bool]:
    """meta -> whether this run trains on the sample: its contrast (any for contrast "all"), not a
    held-out center/scanner."""
    contrast = cfg.adapter.contrast.strip().lower()
    centers, scanners = set(cfg.run.exclude_centers), set(cfg.run.exclude_scanners)

    def keep(meta: dict) -> bool:
        return ((contrast == ALL or str(meta.get("modality", "")).lower() == contrast)
                and meta.get("center") not in centers and meta.get("scanner") not in scanners)

    return keep


def shard_metas(shards: str, split: str) -> list[dict]:
    """meta.json of every sample in the shards (the k-space members are skipped, not decoded).

    A shard that cannot be read (truncated, damaged) is named in a warning and skipped, as the loader
    skips it; only members named like a converted sample (`<key>.meta.json`, no path) count.
    """
    metas = []
    for url in resolve_shards(shards, split):
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    named = member_key(member.name)
                    if member.isreg() and named is not None and named[1] == "meta.json":
                        metas.append(json.load(tar.extractfile(member)))
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            print(f"[finetune] skipping shard {url}: unreadable ({type(exc).__name__}: {exc}); its samples are "
                  f"not counted (the loader skips it too)", file=sys.stderr)
    return metas


def count_training_samples(cfg: FinetuneConfig) -> int:
    """Fully sampled samples of the shards this run may train on (0 is an error, said before training)."""
    keep = sample_filter(cfg)
    return sum(1 for m in shard_metas(cfg.data.shards, cfg.data.split) if m.get("fully_sampled") and keep(m))


def training_batches(loader: Any, keep: Callable[[dict], bool], limit: int = 10_000) -> Iterator[dict]:
    """The loader's batches reduced to kept samples that have a fully sampled target.

    The loader already reads only this contrast (`data.select`); held-out centers and scanners and
    samples without a reference are dropped here. `limit` consecutive samples without a match means
    the shards hold none (an error, not a hang).
    """
    misses = 0
    for batch in loader:
        idx = [i for i, m in enumerate(batch["meta"]) if keep(m) and bool(batch["has_target"][i])]
        if not idx:
            misses += len(batch["meta"])
            if misses > limit:
                raise ValueError(f"{loader.cfg.shards}: no training sample with a reference matches this run's "
                                 f"contrast / centers / scanners in {limit} samples")
            continue
        misses = 0
        sel = torch.tensor(idx)
        yield {k: (v[sel] if isinstance(v, torch.Tensor) else [v[i] for i in idx]) for k, v in batch.items()}


# ---- loss and step -----------------------------------------------------------------------------


def rss_image(kspace: torch.Tensor) -> torch.Tensor:
    """Multi-coil k-space (B, T, C, Y, X) -> RSS magnitude image (B, T, Y, X) (what img4ranking combines)."""
    return rss(ifft2c(kspace), dim=2)


def ranking_window(ny: int, nx: int) -> tuple[slice, slice]:
    """Rows and columns of an (ny, nx) image that the challenge's ranking crop keeps (challenge.ranking:
    the central round(ny/2) phase-encode rows and round(nx/3) readout columns)."""
    sx, sy = crop_size(nx, ny)
    y0, x0 = crop_start(ny, sy), crop_start(nx, sx)
    return slice(y0, y0 + sy), slice(x0, x0 + sx)


def supervised_loss(model: torch.nn.Module, batch: dict, weights: FinetuneLoss,
                    window: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """w_ssim (1 - SSIM) + w_l1 L1 between RSS(model k-space) and RSS(reference), per 2-D frame.

    SSIM's data_range is each reference frame's max (the scorer's choice, §6.2); the images are
    already normalised by the sample's kspace_scale, so L1 is on a common scale across vendors.
    weights.region "ranking": both images are cropped first to `window` (rows, columns), by default
    the ranking crop of the full matrix (`ranking_window`), the only pixels the challenge scores.
    """
    out = model(batch["kspace"], batch["mask"], batch["meta"])
    return region_loss(rss_image(out["kspace"]), rss_image(batch["target"]), weights, window)


def region_loss(pred: torch.Tensor, ref: torch.Tensor, weights: FinetuneLoss,
                window: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`image_loss` on the pixels weights.region names: all, or `window` (rows, columns; by default the
    ranking crop of the images' own matrix). Shared by supervised_loss and the benchmark's peer models."""
    if weights.region == "ranking":
        rows, cols = window or ranking_window(*ref.shape[-2:])
        pred, ref = pred[..., rows, cols], ref[..., rows, cols]
    return image_loss(pred, ref, weights)


def image_loss(pred: torch.Tensor, ref: torch.Tensor, weights: FinetuneLoss) -> tuple[torch.Tensor, dict[str, float]]:
    """w_ssim (1 - SSIM) + w_l1 L1 of magnitude images (..., T, Y, X) against the reference's, per sample
    (the leading dims; (T, Y, X) is one sample), then the mean over samples. SSIM's data_range is each
    reference frame's max. Shared by supervised_loss and the benchmark's peer models.

    weights.log: the mean of the per-sample losses' logarithms instead. The challenge ranks by mean
    PSNR, a logarithm of each image's error, so a 10% smaller error counts the same on an easy problem
    (ktRadial R8, loss ~0.01) as on a hard one (Uniform R24, ~0.15); the plain mean lets the hard ones
    set nearly every gradient (BENCHMARKS.md, issue 10, "Log loss")."""
    data_range = ref.amax(dim=(-2, -1)).clamp_min(1e-6)  # (..., T)
    s = ssim(pred, ref, data_range).mean(-1)  # (...) per sample
    e = (pred - ref).abs().mean(dim=(-3, -2, -1))  # (...)
    per_sample = weights.ssim * (1.0 - s) + weights.l1 * e
    loss = per_sample.clamp_min(1e-12).log().mean() if weights.log else per_sample.mean()
    return loss, {"loss": float(loss.detach()), "ssim": float(s.mean().detach()), "l1": float(e.mean().detach())}


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at run.steps."""
    o, total = cfg.optim, max(cfg.run.steps, 1)
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min((step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, accelerator: Accelerator,
               cfg: FinetuneConfig, step: int) -> dict[str, float]:
    """One optimizer step on one batch; returns the loss terms and the learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    batch = {k: (v.to(accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    loss, terms = supervised_loss(model, batch, cfg.loss)
    if not math.isfinite(terms["loss"]):
        keys = [m.get("__key__") for m in batch["meta"]]
        raise FloatingPointError(f"non-finite loss at step {step}: {terms} (samples {keys})")
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if cfg.optim.clip > 0:
        terms["grad_norm"] = float(accelerator.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.clip))
    optimizer.step()
    return {**terms, "lr": optimizer.param_groups[0]["lr"]}


# ---- outputs -----------------------------------------------------------------------------------


def save_result(model: ReconModel, cfg: FinetuneConfig, stats: dict[str, Any]) -> Path:
    """Write the adapter (PEFT format) or, for full / scratch runs, the whole model, into the bank.

    Its files (adapter_config.json + adapter_model.safetensors, or backbone.safetensors +
    model_config.json, and finetune_info.json) are written into a staging folder that replaces
    `<bank>/<contrast>_<pattern>` in one step (launch.outputs.publish_dir): a reader sees the old
    adapter or the new one, never a mismatched pair. The bank entry is locked while it is written.
    """
    out = Path(cfg.run.adapters) / adapter_name(cfg.adapter.contrast, cfg.adapter.pattern)
    info = {"contrast": cfg.adapter.contrast.lower(), "pattern": cfg.adapter.pattern,
            "accelerations": list(cfg.data.accelerations), "base_model_name_or_path": str(cfg.run.backbone),
            "steps": cfg.run.steps, "trained_shapes": stats.get("shapes", [])}
    with FolderLock(out):
        remove_stale_staging(out)
        staging = staging_path(out)
        try:
            if adapter_parameters(model):
                save_adapter(model, staging, info)
            else:
                write_backbone(staging, model.state_dict(), model.config,
                               {"mode": "full" if cfg.run.full_finetune else "scratch"})
                write_atomic(staging / "finetune_info.json", json.dumps(info, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)   # the old entry stays as it was
            raise
        return publish_dir(staging, out)


@dataclass
class TrainResult:
    """What one run did: where its output is and what it cost."""

    output: Path
    steps: int
    trainable: int
    total: int
    step_time_s: float
    last: dict[str, float]


def train(cfg: FinetuneConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """Train one adapter (or full model) as `cfg` says; every rank calls it; rank 0 writes the outputs."""
    acc = accelerator or Accelerator(cpu=cfg.run.device == "cpu")
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    folder = run_dir(cfg)
    n_samples = count_training_samples(cfg)
    if n_samples == 0:
        raise ValueError(f"{cfg.data.shards}: no fully sampled {cfg.data.split} sample of contrast "
                         f"{cfg.adapter.contrast!r} (centers {cfg.run.exclude_centers} and scanners "
                         f"{cfg.run.exclude_scanners} held out): no training sample for this adapter")
    if main:
        dump_config(cfg, folder / "config.toml")
    # accelerate names the CPU "cpu:0" in multi-process runs, which safetensors refuses
    device = torch.device("cpu") if acc.device.type == "cpu" else acc.device
    model = build_trainable(cfg, device)
    params = trainable_parameters(model)
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    patterns = list(PATTERNS_2025) if cfg.adapter.pattern.strip().lower() == ALL else [cfg.adapter.pattern]
    # read only this contrast ("all": every one): shards without it are dropped, other samples
    # skipped before decoding
    contrast = cfg.adapter.contrast.strip().lower()
    select = cfg.data.select if contrast == ALL else {**cfg.data.select, "modality": [contrast]}
    data_cfg = dataclasses.replace(cfg.data, patterns=patterns, mode="train", select=select)
    loader = make_loader(data_cfg, rank, world)
    start = 0
    if main:   # one owner per run folder; only a dead writer's *.incomplete states are removed
        lock_dir(folder)
        discard_incomplete(folder / "state", log=lambda msg: print(f"[finetune] {msg}", file=sys.stderr))
    acc.wait_for_everyone()
    tag = latest_tag(folder / "state") if cfg.run.resume else None
    owner = state_owner(tag)
    if tag is not None:
        restored = load_state(tag, model, optimizer, rank)
        start = int(restored["step"])
        loader.load_state_dict(restored["loader"])
        if main:
            print(f"[finetune] resumed from {tag} at step {start}", file=sys.stderr)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    if main:
        print(f"[finetune] {adapter_name(cfg.adapter.contrast, cfg.adapter.pattern)}: {world} rank(s) on "
              f"{acc.device}, {n_train:,} trainable of {n_total:,} parameters ({100 * n_train / n_total:.2f}%), "
              f"steps {start}->{cfg.run.steps}, micro-batch {cfg.data.micro_batch}/rank, {n_samples} training slices", file=sys.stderr)
    writer = None
    if main and cfg.run.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(folder / "tensorboard"))
    batches = training_batches(loader, sample_filter(cfg))
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, disable=not (main and cfg.run.progress),
               desc="finetune", unit="step")
    shapes: set[tuple[int, ...]] = set()
    terms: dict[str, float] = {}
    times: list[float] = []
    for step in bar:
        batch = next(batches)
        shapes.add(tuple(batch["kspace"].shape[2:]))
        t0 = time.perf_counter()
        terms = train_step(ddp_model, optimizer, batch, acc, cfg, step)
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", samples_per_s=f"{len(batch['meta']) * world / times[-1]:.1f}")
        if writer is not None and (step + 1) % max(cfg.run.log_every, 1) == 0:
            for k, v in terms.items():
                writer.add_scalar(f"finetune/{k}", v, step + 1)
            writer.add_scalar("finetune/samples_per_s", len(batch["meta"]) * world / times[-1], step + 1)
        every = cfg.run.checkpoint_every
        if (every > 0 and (step + 1) % every == 0) or step + 1 == cfg.run.steps:
            save_state(folder / "state", step + 1, acc.unwrap_model(ddp_model), optimizer, rank,
                       loader.state_dict(), acc.wait_for_everyone, owner=owner)
    if writer is not None:
        writer.close()
    model = acc.unwrap_model(ddp_model)
    output = Path(cfg.run.adapters) / adapter_name(cfg.adapter.contrast, cfg.adapter.pattern)
    if main:
        output = save_result(model, cfg, {"shapes": sorted(list(s) for s in shapes)})
        print(f"[finetune] wrote {output}", file=sys.stderr)
    acc.wait_for_everyone()
    step_time = sum(times[1:]) / max(len(times) - 1, 1) if times else float("nan")  # first step: warm-up
    return TrainResult(output, cfg.run.steps, n_train, n_total, step_time, terms)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(FinetuneConfig, argv, description="fine-tune one adapter per contrast x pattern")
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
