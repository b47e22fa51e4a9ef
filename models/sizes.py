"""Named model sizes and the one builder: `build_model(cfg_or_size, device=None, dtype=None)`.

A stage config names a size and may override single fields (TOML `[model]` section):

    [model]
    size = "tiny"
    cascades = 2          # every other field is left out, i.e. None: the size's value is used

Rule: each architecture field left at None takes the value of `SIZES[size]`; a field that is set
wins. That is all (`resolve_config`). `activation_checkpointing` is not part of a size and defaults
to off.

`python -m models.sizes` prints each size's parameter count (`1b` is built on the meta device: no
memory is allocated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from models.backbone import token_count
from models.conditioning import FIELDS
from models.recon import ReconModel


@dataclass
class ModelConfig:
    """The reconstruction model's architecture (a `[model]` section of a stage config)."""

    size: str = "tiny"
    """Named size in SIZES: "tiny", "small", "base" or "1b"; None fields below take its values."""
    dim: int | None = None
    """Token width D of every backbone."""
    depth: int | None = None
    """Transformer blocks per cascade."""
    heads: int | None = None
    """Attention heads (dim must divide by it)."""
    mlp_ratio: float | None = None
    """MLP hidden width / dim."""
    patch: int | None = None
    """Square patch size in pixels; the image is zero-padded to a multiple of it and cropped back."""
    cascades: int | None = None
    """Unrolled iterations of backbone + data consistency."""
    share_weights: bool | None = None
    """One cascade's weights reused for every iteration (False: separate weights, as VarNet/SDUM)."""
    dc_mode: str | None = None
    """Data consistency: "soft" (learned weight), "hard" (exact replacement) or "weighted" (soft with a
    learned sampling-aware weight map over k-space, models/consistency.py)."""
    sens_channels: int | None = None
    """Width of the coil-sensitivity refinement CNN."""
    sens_layers: int | None = None
    """Convolutions in the coil-sensitivity refinement CNN (>= 2)."""
    sens_estimate: str | None = None
    """What the sensitivity CNN refines: "acs" (the ACS block's low-resolution coil images divided by
    their RSS, VarNet) or "espirit" (ESPIRiT maps of the ACS block, models/espirit.py)."""
    conv_channels: int | None = None
    """Width of the backbone's convolutional stem and head (0: a plain ViT patch embedding and head)."""
    sense_init: int | None = None
    """CG iterations of the starting image: CG-SENSE with the learned sensitivities (0: zero-filled)."""
    sense_scope: str | None = None
    """Which samples get the CG-SENSE start: "all", or "2d", only masks that also undersample the
    readout (ktRadial). With 1-D (Cartesian) undersampling at R_eff 5-10 SENSE is ill-conditioned (large
    g-factor noise, coherent residual aliasing) and the zero-filled start trained better (BENCHMARKS.md)."""
    sense_mu: float | None = None
    """Tikhonov weight mu of the starting CG-SENSE, (A^H A + mu I) x = A^H y, in normalised k-space units."""
    sens_per_cascade: bool | None = None
    """Refine the coil sensitivities after every cascade from its full-resolution estimate (SDUM's CSME)."""
    refine_gain: float | None = None
    """Initial scale of each cascade's residual update (0: ReZero, an untrained cascade leaves the image
    to data consistency; with `sense_init` the untrained model is CG-SENSE)."""
    update_gate: bool | None = None
    """Scale each cascade's update per sample by a gate read from its conditioning tokens (DiT's
    adaLN-Zero gate, 1 at init; models/backbone.py): the update can shrink on nearly clean inputs."""
    final_cg: int | None = None
    """CG iterations of a data-consistency solve in the last cascade(s) (`final_cascades`), between the
    backbone and the DC (MoDL's DC block): x = argmin ||M F S x - y||^2 + mu ||x - z||^2 from x0 = z,
    z the backbone's image, with a learned per-sample mu (0: off). The cascades' DC replaces measured
    samples coil by coil; this solve also moves the unmeasured ones by the coils' coupling (parallel
    imaging), models/recon.py."""
    final_cascades: int | None = None
    """How many of the last cascades get the solve (1: the last only; `cascades`: every one, as MoDL)."""
    final_mu: float | None = None
    """Initial mu of the final solve, in normalised k-space units (A^H A has eigenvalues in [0, 1])."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (saves activation memory)."""


SIZES: dict[str, ModelConfig] = {
    # ~0.3M parameters: tests, CI and the 2-core demo pipeline
    "tiny": ModelConfig("tiny", dim=64, depth=2, heads=4, mlp_ratio=4.0, patch=4, cascades=3,
                        share_weights=False, dc_mode="soft", sens_channels=8, sens_layers=3, sens_estimate="acs", conv_channels=8,
                        sense_init=0, sense_scope="2d", sense_mu=0.01, refine_gain=0.1,
                        sens_per_cascade=False, update_gate=False, final_cg=0, final_cascades=1, final_mu=0.01),
    # ~19M: CPU-trainable experiments
    "small": ModelConfig("small", dim=256, depth=6, heads=4, mlp_ratio=4.0, patch=8, cascades=4,
                         share_weights=False, dc_mode="soft", sens_channels=16, sens_layers=3, sens_estimate="acs", conv_channels=0,
                         sense_init=0, sense_scope="2d", sense_mu=0.01, refine_gain=0.1,
                        sens_per_cascade=False, update_gate=False, final_cg=0, final_cascades=1, final_mu=0.01),
    # ~101M
    "base": ModelConfig("base", dim=512, depth=8, heads=8, mlp_ratio=4.0, patch=8, cascades=4,
                        share_weights=False, dc_mode="soft", sens_channels=32, sens_layers=4, sens_estimate="acs", conv_channels=0,
                        sense_init=0, sense_scope="2d", sense_mu=0.01, refine_gain=0.1,
                        sens_per_cascade=False, update_gate=False, final_cg=0, final_cascades=1, final_mu=0.01),
    # ~1.01B: 4 cascades x 20 blocks of ViT-L width (D 1024, 16 heads of 64)
    "1b": ModelConfig("1b", dim=1024, depth=20, heads=16, mlp_ratio=4.0, patch=8, cascades=4,
                      share_weights=False, dc_mode="soft", sens_channels=32, sens_layers=5, sens_estimate="acs", conv_channels=0,
                      sense_init=0, sense_scope="2d", sense_mu=0.01, refine_gain=0.1,
                        sens_per_cascade=False, update_gate=False, final_cg=0, final_cascades=1, final_mu=0.01),
}


def resolve_config(cfg: ModelConfig | str) -> ModelConfig:
    """A size name or a partial config -> a config with every field set (None fields from the size)."""
    if isinstance(cfg, str):
        cfg = ModelConfig(size=cfg)
    if cfg.size not in SIZES:
        raise ValueError(f"unknown model size {cfg.size!r}; known sizes: {sorted(SIZES)}")
    base = SIZES[cfg.size]
    filled = {f.name: getattr(base, f.name) if getattr(cfg, f.name) is None else getattr(cfg, f.name)
              for f in dataclasses.fields(ModelConfig)}
    if filled["sense_scope"] not in ("all", "2d"):
        raise ValueError(f"model.sense_scope must be 'all' or '2d', got {filled['sense_scope']!r}")
    if filled["final_cg"] and not 1 <= filled["final_cascades"] <= filled["cascades"]:
        raise ValueError(f"model.final_cascades must be 1..cascades ({filled['cascades']}), got {filled['final_cascades']}")
    return ModelConfig(**filled)


def build_model(cfg: ModelConfig | str, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> ReconModel:
    """Build the ReconModel for a size name or a (partial) ModelConfig.

    device="meta" allocates nothing (parameter counting, torchtitan-style deferred init); under
    deepspeed.zero.Init leave device None and the parameters are partitioned as they are created.
    """
    return ReconModel(resolve_config(cfg), device=device, dtype=dtype)


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (shared ones counted once; works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def tokens_per_sample(cfg: ModelConfig | str, frames: int, ny: int, nx: int) -> int:
    """Tokens through each backbone for one (frames, ny, nx) sample, conditioning tokens included."""
    cfg = resolve_config(cfg)
    return token_count(frames, ny, nx, cfg.patch, cond_tokens=len(FIELDS))


def main() -> None:
    print(f"{'size':<6} {'parameters':>15}  tokens/sample (3 x 162 x 448)")
    for name in SIZES:
        model = build_model(name, device="meta")
        print(f"{name:<6} {parameter_count(model):>15,}  {tokens_per_sample(name, 3, 162, 448):,}")


if __name__ == "__main__":
    main()
