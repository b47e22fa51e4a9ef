"""Data consistency in k-space: keep what was measured, predict only what was not.

Shapes: predicted / measured k-space complex (B, T, C, Y, X); mask float (B, T, Y, X), broadcast
over coils.

- "soft" (fastMRI VarNet): k <- k - lambda * M (k - k0), lambda a learned scalar starting at 1.
  With lambda = 1 it equals hard replacement up to rounding; training may relax it for noisy data.
- "hard": k <- k0 where M = 1, k elsewhere, with `torch.where`, so the output equals the measured
  k-space bit for bit at every sampled location (tests/test_consistency.py).
"""

from __future__ import annotations

import torch
from torch import nn

DC_MODES = ("soft", "hard")


class DataConsistency(nn.Module):
    """Soft (learned weight) or hard (replacement) data consistency."""

    def __init__(self, mode: str = "soft", device=None, dtype=None) -> None:
        super().__init__()
        if mode not in DC_MODES:
            raise ValueError(f"data consistency mode {mode!r} is not one of {DC_MODES}")
        self.mode = mode
        # created here (not by a parent) so its value survives deepspeed.zero.Init partitioning
        self.weight = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if mode == "soft" else None

    def forward(self, predicted: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """predicted, measured complex64 (B, T, C, Y, X); mask (B, T, Y, X) -> complex64 (B, T, C, Y, X)."""
        sampled = mask.unsqueeze(2)  # (B, T, 1, Y, X)
        if self.mode == "hard":
            return torch.where(sampled > 0, measured, predicted)
        # the weight may be bf16 under DeepSpeed; the k-space arithmetic stays complex64
        return predicted - self.weight.float() * sampled * (predicted - measured)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
