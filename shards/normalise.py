"""Per-sample intensity normalisation (trap 13 of docs/cmrxrecon.md: vendor scales span ~1e9).

`kspace_scale` is THE scale function of cmrfm: the loader divides each sample by it, and
finetune.reconstruct divides by it before the model and multiplies back afterwards. It looks only at
the undersampled data (what a reconstruction sees at test time), never at a fully sampled reference.

scale = 99th percentile of the root-sum-of-squares magnitude of the zero-filled image
        ifft2c(kspace_us * mask), over all frames and pixels.

The percentile (not the max) is robust to a few hot pixels; the value is homogeneous of degree 1 in
the data, so a vendor factor of 1e-3 or 1e7 cancels exactly. An all-zero or non-finite input gives 1.0
(nothing to divide out) instead of a division by zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft

PERCENTILE = 99.0


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (duck-typed: shards does not need torch here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def zero_filled_rss(kspace_us: np.ndarray, centred: bool = True) -> np.ndarray:
    """(..., C, Y, X) complex k-space -> (..., Y, X) float RSS magnitude of the centred ortho iFFT.

    centred=False skips both shifts: the k-space shift only multiplies the image by a phase ramp and
    the image shift only permutes pixels, so the magnitudes are the same multiset (what a percentile
    needs) at a fraction of the memory traffic.
    """
    if centred:
        kspace_us = np.fft.ifftshift(kspace_us, axes=(-2, -1))
    img = scipy.fft.ifft2(kspace_us, norm="ortho", overwrite_x=False)
    rss = np.sqrt(np.sum(img.real ** 2 + img.imag ** 2, axis=-3))
    return np.fft.fftshift(rss, axes=(-2, -1)) if centred else rss


def kspace_scale(kspace_us: Any, mask: Any | None = None) -> float:
    """Normalisation scale of one sample, from undersampled data only.

    Args:
        kspace_us: complex (T, C, Y, X) (or (C, Y, X)) undersampled k-space, numpy or torch.
        mask: optional float (T|1, Y, X) or (Y, X) sampling mask; applied first, so passing fully
            sampled k-space with its mask gives the scale of the undersampled data.
    Returns:
        a positive finite float (1.0 when the data are all zero or not finite).
    """
    k = _as_numpy(kspace_us).astype(np.complex64, copy=False)
    if mask is not None:
        m = _as_numpy(mask).astype(np.float32, copy=False)
        k = k * m[..., None, :, :] if k.ndim == m.ndim + 1 else k * m
    rss = zero_filled_rss(k, centred=False)          # order-free: the percentile ignores pixel positions
    if rss.size == 0:
        return 1.0
    value = float(np.percentile(rss, PERCENTILE))
    if not np.isfinite(value) or value <= 0.0:
        value = float(np.max(rss)) if np.isfinite(rss).all() else 0.0
    return value if np.isfinite(value) and value > 0.0 else 1.0
