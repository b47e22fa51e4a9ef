"""Centred, orthonormal 2-D FFTs over the last two axes (the MATLAB / fastMRI convention).

Convention (the one place it is stated; docs/cmrxrecon.md §4.7, trap 8):

    ifft2c(k) = fftshift(ifft2(ifftshift(k)), norm="ortho")     k-space -> image
    fft2c(x)  = fftshift(fft2(ifftshift(x)),  norm="ortho")     image   -> k-space

- The last two axes are (ky, kx) in k-space and (y, x) in image space: h5py order, Y = phase encode,
  X = readout. Every leading axis (batch, frame, coil) is carried along untouched.
- DC sits at index N // 2 (0-based) on each axis, for even *and* odd N.
- The order of the shifts matters only for odd N: `ifftshift` first, `fftshift` last. The reversed
  order (the official Python `loadFun.py`) rolls an odd axis by one pixel, and 2025 has many odd ny.
- `norm="ortho"` makes both transforms unitary: fft2c(ifft2c(k)) == k and ||fft2c(x)|| == ||x||.
- Inputs are promoted to complex64 (complex128 is kept); the transforms never run in half precision.
"""

from __future__ import annotations

import torch

_DIMS = (-2, -1)


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    # cuFFT/pocketfft have no bf16 complex path, and the physics must not lose precision anyway
    if x.dtype == torch.complex128:
        return x
    return x.to(torch.complex64)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Image -> k-space. x: complex (..., Y, X) -> complex64 (..., Y, X), DC at (Y//2, X//2)."""
    x = torch.fft.ifftshift(_as_complex(x), dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """K-space -> image. k: complex (..., Y, X), DC at (Y//2, X//2) -> complex64 (..., Y, X)."""
    k = torch.fft.ifftshift(_as_complex(k), dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), dim=_DIMS)
