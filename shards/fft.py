"""The centred orthonormal 2-D FFT in numpy, for code that runs before or beside the model.

Same convention as models/fft.py (its torch twin, where the convention is documented in full): the
MATLAB `fft2c`/`ifft2c` of the official CMRxRecon code, `fftshift(fft2(ifftshift(x)), norm="ortho")`
over the last two axes `(ky, kx)` / `(y, x)`, DC at index N // 2, right for odd sizes.
"""

from __future__ import annotations

import numpy as np

_AXES = (-2, -1)


def fft2c(x: np.ndarray) -> np.ndarray:
    """Image (..., Y, X) -> k-space (..., Y, X), centred and orthonormal."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=_AXES), axes=_AXES, norm="ortho"), axes=_AXES)


def ifft2c(k: np.ndarray) -> np.ndarray:
    """k-space (..., Y, X) -> image (..., Y, X), centred and orthonormal."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=_AXES), axes=_AXES, norm="ortho"), axes=_AXES)
