"""Data consistency in k-space: keep what was measured, predict only what was not.

Shapes: predicted / measured k-space complex (B, T, C, Y, X); mask float (B, T, Y, X), broadcast
over coils.

- "soft" (fastMRI VarNet): k <- k - lambda * M (k - k0), lambda a learned scalar starting at 1.
  With lambda = 1 it equals hard replacement up to rounding; training may relax it for noisy data.
- "hard": k <- k0 where M = 1, k elsewhere, with `torch.where`, so the output equals the measured
  k-space bit for bit at every sampled location (tests/test_consistency.py).
- "weighted" (sampling-aware weighted DC, SDUM's SWDC idea, arXiv 2512.17137): the soft update with a
  weight that varies over k-space, lambda(y, x) = lambda * exp(a d + b r + c), where d is the fraction
  of the window's frames that sampled the location (kt patterns sample a location in some frames only)
  and r the distance from the k-space centre as a fraction of the half-diagonal (SNR falls with r, so
  trusting a noisy outer sample as much as the centre is wrong). a = b = c = 0 at initialisation:
  exactly "soft".

`cg_sense` solves the Tikhonov-regularised SENSE problem (A^H A + mu I) x = A^H y + mu z by conjugate
gradients (MoDL's data-consistency block, Aggarwal et al., IEEE TMI 2019). With z = 0 it is CG-SENSE,
which the model uses as its starting image (`sense_init`): under incoherent sampling (ktRadial) the
zero-filled image is buried in streaks that four gradient-like DC steps cannot remove, while a few CG
iterations with the learned sensitivities already reach the classical CG-SENSE baseline, so the
cascades only have to learn what SENSE misses (docs/design.md §7).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

DC_MODES = ("soft", "hard", "weighted")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample real inner product Re<a, b> of complex (B, ...) tensors -> (B, 1, ..., 1)."""
    d = (a.conj() * b).real.flatten(1).sum(1)
    return d.reshape((-1,) + (1,) * (a.ndim - 1))


def cg_sense(rhs: torch.Tensor, normal: Callable[[torch.Tensor], torch.Tensor], mu: float | torch.Tensor,
             iterations: int, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Conjugate gradients for (N + mu I) x = rhs, N = A^H A Hermitian positive semi-definite.

    rhs complex (B, T, Y, X); `normal` applies A^H A to such a tensor; every sample of the batch has its
    own step sizes (the samples are independent systems). Returns x after `iterations` steps from x0
    (zeros by default); a sample whose residual reaches zero stops moving (no 0/0).
    """
    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs - (normal(x) + mu * x) if x0 is not None else rhs
    p, rr = r, _dot(r, r)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        q = normal(p) + mu * p
        pq = _dot(p, q)
        alpha = torch.where(pq > tiny, rr / pq.clamp_min(tiny), torch.zeros_like(pq))
        x = x + alpha * p
        r = r - alpha * q
        rr_new = _dot(r, r)
        beta = torch.where(rr > tiny, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        p, rr = r + beta * p, rr_new
    return x


class DataConsistency(nn.Module):
    """Soft (learned weight) or hard (replacement) data consistency."""

    def __init__(self, mode: str = "soft", device=None, dtype=None) -> None:
        super().__init__()
        if mode not in DC_MODES:
            raise ValueError(f"data consistency mode {mode!r} is not one of {DC_MODES}")
        self.mode = mode
        # created here (not by a parent) so its value survives deepspeed.zero.Init partitioning
        self.weight = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if mode != "hard" else None
        # (a, b, c) of the sampling-aware weight map; zeros: the map is 1 everywhere
        self.sampling = nn.Parameter(torch.zeros(3, device=device, dtype=dtype)) if mode == "weighted" else None

    def forward(self, predicted: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """predicted, measured complex64 (B, T, C, Y, X); mask (B, T, Y, X) -> complex64 (B, T, C, Y, X)."""
        sampled = mask.unsqueeze(2)  # (B, T, 1, Y, X)
        if self.mode == "hard":
            return torch.where(sampled > 0, measured, predicted)
        # the weight may be bf16 under DeepSpeed; the k-space arithmetic stays complex64
        weight = self.weight.float()
        if self.mode == "weighted":
            weight = weight * self.weight_map(mask).unsqueeze(2)  # (B, 1, 1, Y, X)
        return predicted - weight * sampled * (predicted - measured)

    def weight_map(self, mask: torch.Tensor) -> torch.Tensor:
        """exp(a d + b r + c) over k-space: mask (B, T, Y, X) -> float32 (B, 1, Y, X)."""
        density = mask.float().mean(1, keepdim=True)  # (B, 1, Y, X), fraction of frames sampled
        ny, nx = mask.shape[-2:]
        y = (torch.arange(ny, device=mask.device, dtype=torch.float32) - ny // 2) / max(ny / 2, 1)
        x = (torch.arange(nx, device=mask.device, dtype=torch.float32) - nx // 2) / max(nx / 2, 1)
        radius = torch.sqrt(y[:, None] ** 2 + x[None, :] ** 2) / 2**0.5  # 0 at the centre, 1 in a corner
        a, b, c = self.sampling.float()
        return torch.exp(a * density + b * radius + c)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
