"""The shipped 1b pretraining config fits an 80 GB GPU by the ZeRO memory arithmetic, and ZeRO-3 stays
one override away.

The arithmetic is the ZeRO paper's (Rajbhandari et al. 2020, §3/§5) for mixed-precision Adam: bf16
parameters (2 bytes per parameter) and gradients (2), fp32 master weights, momentum and variance
(4 + 4 + 4) = 16 bytes per parameter, of which stage 1 partitions the 12 optimizer bytes over the N
data-parallel GPUs, stage 2 also the gradients, stage 3 also the parameters. Activations: 34 bytes
per token per model-width unit per transformer block in bf16 without checkpointing (Korthikanti et
al. 2022, with flash attention: no s^2 term), for the largest matrix of the 2025 release."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cli import load_config
from models.backbone import token_count
from models.conditioning import FIELDS
from models.sizes import build_model, parameter_count, resolve_config
from pretrain.settings import PretrainConfig
from shards.synthetic import REAL_SIZES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain_1b.toml"
GPU_BYTES = 80e9                      # an 80 GB H100/A100; the H200 has 141 GB
WORLDS = (1, 8, 16, 32)               # one GPU, one node, the sbatch default (2 x 8), 4 nodes x 8


def states_per_gpu(params: int, stage: int, world: int) -> float:
    """Bytes of parameters + gradients + Adam state per GPU (ZeRO paper, mixed precision)."""
    p, g, opt = 2 * params, 2 * params, 12 * params
    return {0: p + g + opt, 1: p + g + opt / world, 2: p + (g + opt) / world, 3: (p + g + opt) / world}[stage]


def activation_bytes(size: str, checkpointing: bool) -> float:
    """bf16 activations of one sample at the release's largest matrix (every type at its largest ny and nx)."""
    cfg = resolve_config(size)
    tokens = max(token_count(3, ny[1], nx[1], cfg.patch, len(FIELDS)) for ny, nx in REAL_SIZES.values())
    per_block, blocks = 34 * tokens * cfg.dim, cfg.depth * cfg.cascades
    return per_block * blocks if not checkpointing else 2 * tokens * cfg.dim * blocks + per_block


def test_the_shipped_1b_config_is_zero1_bf16_without_checkpointing_and_fits_80_gb() -> None:
    cfg = load_config(PretrainConfig, CONFIG)
    assert (cfg.model.size, cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == ("1b", 1, "bf16")
    assert cfg.model.activation_checkpointing is False and cfg.deepspeed.offload == "none"
    params = parameter_count(build_model("1b", device="meta"))
    assert 0.9e9 < params < 1.1e9
    act = activation_bytes("1b", cfg.model.activation_checkpointing)
    assert 20e9 < act < 25e9                                          # 22.3 GB per sample at 324 x 518
    micro = cfg.data.micro_batch
    for world in WORLDS:
        need = states_per_gpu(params, cfg.deepspeed.zero_stage, world) + micro * act
        assert need <= 0.8 * GPU_BYTES, f"world {world}: {need / 1e9:.1f} GB > 80% of {GPU_BYTES / 1e9:.0f} GB"
    # the micro-batch is the largest that fits everywhere: one more sample does not, on one GPU
    assert states_per_gpu(params, 1, 1) + (micro + 1) * act > GPU_BYTES
    # unpartitioned states fit many times over: ZeRO-3's extra all-gathers would buy no needed memory
    assert states_per_gpu(params, 0, 1) < 0.25 * GPU_BYTES
    # ZeRO-1 saves most of what there is to save at the sbatch default's 16 GPUs
    assert states_per_gpu(params, 1, 16) < 0.35 * states_per_gpu(params, 0, 16)


def test_the_1b_deepspeed_config_and_the_zero3_override() -> None:
    from pretrain.engine import ds_config

    cfg = load_config(PretrainConfig, CONFIG)
    ds = ds_config(cfg, world=16)
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == cfg.data.micro_batch * cfg.deepspeed.grad_accum * 16 == 64
    three = load_config(PretrainConfig, CONFIG, ["deepspeed.zero_stage=3", "model.activation_checkpointing=true"])
    ds3 = ds_config(three, world=16)
    assert ds3["zero_optimization"]["stage"] == 3
    assert ds3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # the override's memory: states 1 GB per GPU at 16 GPUs, checkpointed activations under 2 GB a sample
    params = parameter_count(build_model("1b", device="meta"))
    assert states_per_gpu(params, 3, 16) < 1.1e9 and activation_bytes("1b", True) < 2e9


@pytest.mark.parametrize("stage,expected", [(0, 16.0), (1, 4.0 + 12 / 8), (2, 2.0 + 14 / 8), (3, 16 / 8)])
def test_state_arithmetic_matches_the_zero_paper_table(stage: int, expected: float) -> None:
    """Bytes per parameter on 8 GPUs as the ZeRO paper's Figure 1 writes them (2+2+K with K = 12)."""
    assert states_per_gpu(1, stage, 8) == pytest.approx(expected)
