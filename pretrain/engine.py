"""The DeepSpeed engine: the only file in cmrfm that imports deepspeed.

`ds_config(cfg, world)` derives DeepSpeed's JSON from `PretrainConfig` in one place (no hand-kept
JSON that could disagree with the TOML):

    train_micro_batch_size_per_gpu = data.micro_batch
    gradient_accumulation_steps    = deepspeed.grad_accum
    train_batch_size               = micro x accum x world          (computed once, here)
    zero_optimization.stage        = deepspeed.zero_stage (0-3), optional CPU offload
    bf16                           = on for CUDA ("auto"), off on CPU (fp32)
    gradient_clipping              = optim.clip
    optimizer                      = AdamW with torch_adam (the fused ops need a JIT compiler build)
    scheduler                      = WarmupCosineLR, linear warmup, stepped once per optimizer step

`build_engine` builds the model under `deepspeed.zero.Init` for ZeRO-3 (each rank only ever holds
its partition) and swaps in a checkpoint engine that loads with `torch.load(weights_only=True)`:
DeepSpeed 0.19's own `TorchCheckpointEngine.load` passes `weights_only=False`, i.e. full unpickling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from models.sizes import build_model
from pretrain.checkpoint import CheckpointError
from pretrain.dist_env import DistEnv, export_for_torch
from pretrain.settings import PretrainConfig


# The only non-tensor classes DeepSpeed 0.19 puts in its checkpoints (ZeRO optimizer files), found
# with torch.serialization.get_unsafe_globals_in_checkpoint; allowlisted instead of weights_only=False.
DEEPSPEED_SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, but loading with `weights_only=True` (no arbitrary unpickling)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: checkpoint file is missing")
        try:
            with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
            raise CheckpointError(f"{path}: cannot load checkpoint file ({type(exc).__name__}: {exc})") from exc


def resolve_precision(cfg: PretrainConfig) -> str:
    """"bf16" or "fp32": `auto` means bf16 on CUDA, fp32 on CPU (CPU bf16 is slow and not what we test)."""
    p = cfg.deepspeed.precision
    if p == "auto":
        return "bf16" if cfg.run.device == "cuda" else "fp32"
    if p not in ("bf16", "fp32"):
        raise ValueError(f"deepspeed.precision must be 'auto', 'bf16' or 'fp32', got {p!r}")
    return p


def micro_batch(cfg: PretrainConfig) -> int:
    """Samples per rank per forward pass (the loader's batch size)."""
    return int(cfg.data.micro_batch)


def ds_config(cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """DeepSpeed's config dict, derived from `cfg` and the world size (see the module docstring)."""
    ds, opt = cfg.deepspeed, cfg.optim
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload not in ("none", "cpu"):
        raise ValueError(f"deepspeed.offload must be 'none' or 'cpu', got {ds.offload!r}")
    if ds.grad_accum < 1 or micro_batch(cfg) < 1:
        raise ValueError(f"data.micro_batch ({micro_batch(cfg)}) and deepspeed.grad_accum ({ds.grad_accum}) must be >= 1")
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.bucket_size}
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.bucket_size
    if ds.offload == "cpu" and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True   # export_backbone consolidates
        zero["stage3_prefetch_bucket_size"] = ds.bucket_size
    return {
        "train_micro_batch_size_per_gpu": micro_batch(cfg),
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch(cfg) * ds.grad_accum * world,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(cfg) == "bf16"},
        "gradient_clipping": opt.clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
            "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            # DeepSpeed wants >= 1 warmup step: "no warmup" is one step that starts at the full ratio
            "total_num_steps": cfg.run.steps, "warmup_num_steps": max(opt.warmup_steps, 1), "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if opt.warmup_steps > 0 else 1.0, "cos_min_ratio": opt.min_lr_ratio}},
        # torch AdamW on offloaded states instead of DeepSpeedCPUAdam (a C++ JIT build)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def write_ds_config(config: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Record the exact DeepSpeed config as <run_dir>/ds_config.json (temporary name, then rename)."""
    path = Path(run_dir) / "ds_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def init_distributed(dist: DistEnv) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA); a 1-process run gets a 1-rank group too."""
    export_for_torch(dist)   # under srun only SLURM_* are set; env:// rendezvous reads RANK/MASTER_ADDR
    if dist.device.startswith("cuda"):
        torch.cuda.set_device(dist.local_rank)
    deepspeed.init_distributed(dist_backend=dist.backend, auto_mpi_discovery=False, verbose=False,
                               rank=dist.rank, world_size=dist.world_size)


def build_engine(cfg: PretrainConfig, dist: DistEnv, config: dict[str, Any]) -> Any:
    """Seeded model (under zero.Init for ZeRO-3) -> `deepspeed.initialize` -> the engine.

    Every rank seeds identically, so every rank builds the same initial weights (ZeRO-3 then keeps
    only its partition of each parameter as it is created).
    """
    torch.manual_seed(cfg.run.seed)
    stage3 = cfg.deepspeed.zero_stage == 3
    remote = "cpu" if (stage3 and cfg.deepspeed.offload == "cpu") else None
    if cfg.run.init:
        if stage3:
            raise ValueError(f"run.init={cfg.run.init}: starting from exported weights needs ZeRO stage 0-2 "
                             "(under ZeRO-3 each rank builds only its partition)")
        from pretrain.checkpoint import load_backbone

        model = load_backbone(cfg.run.init, device=dist.device).train()  # raises CheckpointError naming the file
    else:
        with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage3, remote_device=remote):
            model = build_model(cfg.model, device=None if stage3 else dist.device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    return engine


def current_lr(engine: Any) -> float:
    """Learning rate of the first parameter group (what the scheduler set for the next step)."""
    return float(engine.get_lr()[0])


def grad_norm(engine: Any) -> float:
    """Global gradient norm of the last optimizer step (before clipping); nan when DeepSpeed has none."""
    value = engine.get_global_grad_norm()
    return float("nan") if value is None else float(value)
