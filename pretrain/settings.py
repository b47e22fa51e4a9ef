"""PretrainConfig: every number of a pretraining run, one typed section per concern.

Loaded with `launch.cli.parse_args(PretrainConfig)` from a TOML file (`configs/pretrain_tiny.toml`)
plus `--set section.key=value` overrides; an unknown key is an error naming the file and the key.
The resolved config is written to `<run.dir>/config.toml` and stored in every checkpoint.

Derived numbers (global batch, DeepSpeed config) are computed once, in `pretrain.engine.ds_config`.
(Not named config.py: `deepspeed pretrain/run.py` puts pretrain/ first on sys.path; docs/style.md §10.2.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.sizes import ModelConfig
from pretrain.objective import ObjectiveConfig
from shards.loader import LoaderConfig


@dataclass
class OptimConfig:
    """AdamW with a linear warmup then cosine decay, stepped once per optimizer step."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of `lr`."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0 to `lr`."""
    weight_decay: float = 0.05
    """Decoupled (AdamW) weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip: float = 1.0
    """Gradient norm clipping threshold (0 = off)."""


@dataclass
class DeepSpeedConfig:
    """What `pretrain.engine.ds_config` turns into DeepSpeed's JSON (written to <run.dir>/ds_config.json)."""

    zero_stage: int = 2
    """ZeRO stage 0-3: 1 partitions optimizer states, 2 also gradients, 3 also parameters."""
    offload: str = "none"
    """"none" or "cpu": keep optimizer states (and, with ZeRO-3, parameters) in host memory."""
    precision: str = "auto"
    """"auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro batch x grad_accum x world size."""
    bucket_size: int = 50_000_000
    """Elements per ZeRO communication bucket (reduce / all-gather / ZeRO-3 prefetch). Each bucket is a
    buffer held per rank: DeepSpeed's default 5e8 (2 GB fp32) dwarfs any model smaller than ~500M."""


@dataclass
class CheckpointConfig:
    """Where and how often training state is saved, and whether to resume from it."""

    dir: str = ""
    """Checkpoint directory; "" means <run.dir>/checkpoints. Holds one folder per tag and the `latest` pointer."""
    every: int = 50
    """Save every this many optimizer steps (and always at the end and on SIGTERM/SIGUSR1); 0 = only then."""
    keep: int = 2
    """Keep the last k checkpoints; older tag folders are deleted after `latest` moved on."""
    resume: bool = True
    """Resume automatically from `<dir>/latest` when it exists."""
    export: bool = True
    """Write <run.dir>/backbone.safetensors + model_config.json at the end of the run."""


@dataclass
class LogConfig:
    """Progress bar, TensorBoard scalars and the periodic held-out evaluation."""

    every: int = 5
    """Write scalars (loss, lr, grad norm, samples/s, skipped samples) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run.dir>/tensorboard (rank 0 only)."""
    eval_every: int = 0
    """Evaluate PSNR/SSIM on the held-out shards every this many steps (0 = only at the end, if eval_shards)."""
    eval_shards: str = ""
    """Held-out shards (a converted directory or a brace pattern, as data.shards); "" = no evaluation."""
    eval_split: str = "val"
    """Split of `eval_shards` to read (validation shards carry the hidden fully sampled reference)."""
    eval_batches: int = 4
    """At most this many held-out batches per evaluation."""


@dataclass
class RunConfig:
    """Length, seed, device and output directory of the run."""

    steps: int = 60
    """Optimizer steps to train for (the run ends at this step; a resumed run continues up to it)."""
    seed: int = 0
    """Seeds model init, the loader and every Θ/Λ split."""
    device: str = "cpu"
    """"cpu" (gloo) or "cuda" (NCCL); the backend follows the device."""
    threads: int = 0
    """torch CPU threads per rank; 0 = cores / ranks on this node (oversubscribed cores run ~5x slower)."""
    dir: str = "out/pretrain"
    """Run directory: config.toml, ds_config.json, tensorboard/, eval.jsonl, backbone export."""
    init: str = ""
    """Start from these weights (a folder or file exported by pretrain.checkpoint.export_backbone, e.g.
    the shipped launch/weights/demo_tiny) instead of a random init; its model_config.json replaces
    [model]. Only for a fresh run: a resumed run continues from its checkpoint. ZeRO stages 0-2."""


@dataclass
class PretrainConfig:
    """Self-supervised (SSDU) pretraining of the reconstruction backbone with DeepSpeed ZeRO."""

    data: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)


def checkpoint_dir(cfg: PretrainConfig) -> Path:
    """The folder holding the tag folders and the `latest` pointer."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / "checkpoints"
