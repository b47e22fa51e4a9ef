"""Per-sample intensity normalisation (trap 13 of docs/cmrxrecon.md: vendor scales span ~1e9).

`kspace_scale` is THE scale function of cmrfm: the loader divides each sample by it, and
finetune.reconstruct divides by it before the model and multiplies back afterwards. It looks only at
the undersampled data (what a reconstruction sees at test time), never at a fully sampled reference.

scale = root-mean-square of the root-sum-of-squares magnitude of the zero-filled image
        ifft2c(kspace_us * mask), over all frames and pixels,
      = sqrt(sum |kspace_us * mask|^2 / (T * Y * X))      (Parseval: the centred FFT is orthonormal)

so it is computed in k-space with one reduction and no FFT: the loader's hot path (bench/data_path.py
P2) and reconstruction pay nothing for it. The value is homogeneous of degree 1 in the data, so a
vendor factor of 1e-3 or 1e7 cancels exactly. An all-zero or non-finite input gives 1.0 (nothing to
divide out) instead of a division by zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (duck-typed: shards does not need torch here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def kspace_scale(kspace_us: Any, mask: Any | None = None) -> float:
    """Normalisation scale of one sample, from undersampled data only.

    Args:
        kspace_us: complex (T, C, Y, X) (or (C, Y, X)) undersampled k-space, numpy or torch.
        mask: optional float (T|1, Y, X) or (Y, X) sampling mask; applied first, so passing fully
            sampled k-space with its mask gives the scale of the undersampled data.
    Returns:
        a positive finite float (1.0 when the data are all zero or not finite).
    """
    k = _as_numpy(kspace_us)
    if mask is not None:
        m = _as_numpy(mask)
        k = k * (m[..., None, :, :] if k.ndim == m.ndim + 1 else m)
    if k.size == 0:
        return 1.0
    coils = k.shape[-3] if k.ndim >= 3 else 1
    energy = float(np.vdot(k, k).real)                 # sum |k|^2 over frames, coils, ky, kx
    value = (energy / (k.size / coils)) ** 0.5         # RMS over the (T, Y, X) pixels of the RSS image
    return value if np.isfinite(value) and value > 0.0 else 1.0
