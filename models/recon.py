"""ReconModel: an unrolled, physics-aware reconstruction network (VarNet / PromptMR+ / SDUM family).

    forward(kspace, mask, meta):
        sensitivities      S  = SensitivityModel(k0, M)            ACS block (or its ESPIRiT maps) -> CNN -> / RSS
        starting image     x  = S^H F^H M k0                      zero-filled, or with `sense_init` = n:
                           x  = CG_n[(A^H A + mu I) x = A^H k0]     CG-SENSE with the learned S
        for each cascade:  x' = Backbone(x, conditioning(meta))    transformer refinement (image domain)
                           k  = DC(F S x', k0, M)                  soft or hard data consistency
                           x  = S^H F^H k
                           S  = normalise(S + CNN(coil images of k / RSS))   with `sens_per_cascade`
        in the last `final_cascades` cascades, with `final_cg` = n, between the backbone and DC:
                           x' = CG_n[(A^H A + mu I) x = A^H k0 + mu x'] from x'   (MoDL's DC block)
        return image x, multi-coil k-space k, sensitivities S

One call signature for self-supervised pretraining (k0, M = the Theta split of the acquired
samples; the loss reads `kspace` on the held-out Lambda set) and for supervised fine-tuning (loss on
`image` against the reference). Cascades have separate weights by default (VarNet, SDUM);
`share_weights` runs one cascade `cascades` times instead.

Shapes: kspace complex64 (B, T, C, Y, X), mask float32 (B, T, Y, X), meta list of B dicts.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from models.backbone import Backbone
from models.coils import CoilRefiner, SensitivityModel, rss, sense_adjoint, sense_forward, sense_normal
from models.conditioning import Conditioning
from models.consistency import DataConsistency, cg_sense
from models.fft import ifft2c

if TYPE_CHECKING:
    from models.sizes import ModelConfig


# Scalar and per-sample controls of the model: update gains and gates, DC weights, the final solve's mu,
# the sensitivity refiners' gains. Each is one number (or one read-out of the conditioning) that decides
# how much of a whole path is used; at the network's lr Adam moves each by ~lr per step, so over a few
# hundred steps a gate barely leaves 1 (BENCHMARKS.md, session 6). Optimisers may give them a larger lr.
CONTROL_SUFFIXES = (".gain", ".gate_weight", ".gate_bias", ".dc.weight", ".dc.sampling", "final_log_mu",
                    "final_mu_weight")


def is_control_parameter(name: str) -> bool:
    """True for the parameter names (as `named_parameters` gives them) of the model's scalar controls."""
    return name.endswith(CONTROL_SUFFIXES)


class Cascade(nn.Module):
    """One unrolled iteration: backbone refinement, then data consistency in k-space."""

    def __init__(self, cfg: "ModelConfig", device=None, dtype=None) -> None:
        super().__init__()
        self.backbone = Backbone(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.patch,
                                 checkpointing=cfg.activation_checkpointing, conv_channels=cfg.conv_channels,
                                 gain=cfg.refine_gain, gated=cfg.update_gate, device=device, dtype=dtype)
        self.dc = DataConsistency(cfg.dc_mode, device=device, dtype=dtype)
        # per-cascade sensitivity refinement (SDUM's CSME): identity at init (ReZero gain in CoilRefiner)
        self.sens_refiner = CoilRefiner(cfg.sens_channels, cfg.sens_layers, device=device, dtype=dtype) \
            if cfg.sens_per_cascade else None

    def forward(self, image: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor,
                cond: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, T, Y, X), measured (B, T, C, Y, X), mask (B, T, Y, X), sens (B, 1, C, Y, X),
        cond (B, K, D) -> (image (B, T, Y, X), kspace (B, T, C, Y, X)), complex64. `solve` maps the
        refined image to a data-consistent one before the k-space DC (the model's final solve)."""
        refined = self.backbone(image, cond)
        if solve is not None:
            refined = solve(refined)
        kspace = self.dc(sense_forward(refined, sens), measured, mask)
        return sense_adjoint(kspace, sens), kspace

    def refine_sensitivities(self, kspace: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """Sensitivities updated from this cascade's full-resolution multi-coil estimate.

        The coil images of the data-consistent k-space, averaged over frames and divided by their
        root-sum-of-squares, are a full-resolution sensitivity estimate (the ACS one is low
        resolution); the cascade's CNN proposes a correction from it, added with a learned gain that
        starts at 0, and the result is normalised to sum_c |S_c|^2 = 1 again."""
        coils = ifft2c(kspace).mean(1)  # (B, C, Y, X)
        direct = coils / (rss(coils, dim=1)[:, None] + 1e-12 * coils.abs().amax())
        update = self.sens_refiner(direct) - direct  # the CNN's proposal, exactly 0 at init
        sens = sens + update.unsqueeze(1)
        return sens / torch.sqrt((sens.abs() ** 2).sum(2, keepdim=True)).clamp_min(1e-12)


class ReconModel(nn.Module):
    """Sensitivities -> zero-filled image -> cascades of (backbone + data consistency).

    Build it with `models.sizes.build_model(cfg_or_size, device, dtype)`; `cfg` here must be resolved
    (no None fields). `self.config` keeps it, for export next to the weights.
    """

    def __init__(self, cfg: "ModelConfig", device=None, dtype=None) -> None:
        super().__init__()
        self.config = cfg
        self.sensitivities = SensitivityModel(cfg.sens_channels, cfg.sens_layers, estimate=cfg.sens_estimate,
                                              device=device, dtype=dtype)
        self.conditioning = Conditioning(cfg.dim, device=device, dtype=dtype)
        self.cascades = nn.ModuleList(
            Cascade(cfg, device=device, dtype=dtype) for _ in range(1 if cfg.share_weights else cfg.cascades))
        self.iterations = cfg.cascades
        # the final solve's mu = exp(log_mu + w . mean(conditioning tokens)), per sample: how far to trust
        # the data over the cascades' image may differ between patterns and rates (w = 0 at init). Created
        # here, on this module, so the values survive deepspeed.zero.Init (as the backbone's gain).
        if cfg.final_cg:
            self.final_log_mu = nn.Parameter(torch.full((1,), math.log(cfg.final_mu), device=device, dtype=dtype))
            self.final_mu_weight = nn.Parameter(torch.zeros(cfg.dim, device=device, dtype=dtype))

    def unrolled(self) -> Iterator[Cascade]:
        """The cascades in order (the one shared cascade `iterations` times when weights are shared)."""
        for i in range(self.iterations):
            yield self.cascades[i % len(self.cascades)]

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, meta: list[dict],
                calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct a batch of undersampled multi-coil slices.

        Args:
            kspace: complex64 (B, T, C, Y, X), the acquired k-space (values off the mask are ignored).
            mask: float32 (B, T, Y, X), 1 where acquired.
            meta: B dicts with (some of) modality, view, pattern, R, vendor, field_T.
            calibration: (kspace, mask) the sensitivities are estimated from instead (same shapes).
                SSDU passes the whole acquired set here: its loss split takes samples out of the ACS
                block, which leaves ESPIRiT an 8-row block to calibrate on (pretrain/objective.py).
        Returns:
            image: complex64 (B, T, Y, X), coil-combined reconstruction.
            kspace: complex64 (B, T, C, Y, X), the last cascade's multi-coil k-space after data
                consistency (equal to the input at sampled locations in "hard" mode).
            sens: complex64 (B, 1, C, Y, X), sensitivities shared by the T frames.
        """
        self._check(kspace, mask, meta)
        measured = kspace.to(torch.complex64) * mask.unsqueeze(2)
        if calibration is None:
            sens = self.sensitivities(measured, mask)
        else:
            cal_k, cal_m = calibration
            self._check(cal_k, cal_m, meta)
            sens = self.sensitivities(cal_k.to(torch.complex64) * cal_m.unsqueeze(2), cal_m)
        cond = self.conditioning(meta)  # (B, 6, D): one token per metadata field
        image = sense_adjoint(measured, sens)  # zero-filled, coil-combined
        if self.config.sense_init:
            chosen = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
            if self.config.sense_scope == "2d":  # only where the readout is undersampled too (ktRadial)
                chosen = ~(mask == mask[..., :1]).flatten(1).all(1)  # (B,): the mask varies along X
            if bool(chosen.all()):
                image = self.sense_image(image, mask, sens)
            elif bool(chosen.any()):  # solve only the chosen samples; the others keep the zero-filled start
                image = image.clone()
                image[chosen] = self.sense_image(image[chosen], mask[chosen], sens[chosen])
        estimate = measured
        for i, cascade in enumerate(self.unrolled()):
            solve = None
            if self.config.final_cg and i >= self.iterations - self.config.final_cascades:  # the last ones
                solve = lambda z, s=sens: self.final_solve(z, measured, mask, s, cond)  # noqa: E731
            image, estimate = cascade(image, measured, mask, sens, cond, solve)
            if cascade.sens_refiner is not None:
                sens = cascade.refine_sensitivities(estimate, sens)
                image = sense_adjoint(estimate, sens)
        return {"image": image, "kspace": estimate, "sens": sens}

    def solve_mu(self, cond: torch.Tensor) -> torch.Tensor:
        """The final solve's per-sample mu: cond (B, K, D) -> float32 (B,)."""
        return torch.exp(self.final_log_mu.float() + cond.float().mean(1) @ self.final_mu_weight.float())

    def final_solve(self, image: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor,
                    cond: torch.Tensor) -> torch.Tensor:
        """`final_cg` CG iterations on (A^H A + mu I) x = A^H y + mu z from x0 = z (z = `image`), with
        autograd: the cascades learn to give the solve a good prior, and mu is learned.

        Under a 1-D Cartesian mask A^H A only mixes the phase-encode lines the coils alias together, so the
        solve is SENSE unfolding with the cascades' image as the prior; under ktRadial it also fills the
        k-space between spokes from the coils. Where the data say nothing (A's null space) x stays z."""
        mu = self.solve_mu(cond)[:, None, None, None]  # (B, 1, 1, 1)
        normal = functools.partial(sense_normal, sens=sens, mask=mask)
        return cg_sense(sense_adjoint(measured, sens) + mu * image, normal, mu, self.config.final_cg, x0=image)

    def sense_image(self, adjoint: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
        """CG-SENSE from A^H y with the model's sensitivities: `sense_init` CG iterations on
        (A^H A + mu I) x = A^H y. Run without autograd (a fixed solver, not a learned layer: it costs
        one forward and adjoint FFT per iteration and nothing in the backward pass); the sensitivities
        still learn through the cascades' data consistency."""
        with torch.no_grad():
            s = sens.detach()
            normal = functools.partial(sense_normal, sens=s, mask=mask)
            return cg_sense(adjoint.detach(), normal, self.config.sense_mu, self.config.sense_init)

    @staticmethod
    def _check(kspace: torch.Tensor, mask: torch.Tensor, meta: list[dict]) -> None:
        if kspace.ndim != 5 or not kspace.is_complex():
            raise ValueError(f"kspace must be complex (B, T, C, Y, X), got {tuple(kspace.shape)} {kspace.dtype}")
        b, t, _, y, x = kspace.shape
        if tuple(mask.shape) != (b, t, y, x):
            raise ValueError(f"mask must be (B, T, Y, X) = {(b, t, y, x)} to match kspace, got {tuple(mask.shape)}")
        if len(meta) != b:
            raise ValueError(f"meta has {len(meta)} entries for a batch of {b}")

