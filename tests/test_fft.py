"""models/fft.py against numpy: centred orthonormal FFTs, even and odd sizes (docs/cmrxrecon.md §4.7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.fft import fft2c, ifft2c

SHAPES = [(8, 10), (9, 7), (162, 448), (161, 445), (1, 5)]


def _complex(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_numpy_matlab_convention(shape: tuple[int, int]) -> None:
    x = _complex((2, 3, *shape))
    axes = (-2, -1)
    want_k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)
    want_x = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)
    got_k, got_x = fft2c(torch.from_numpy(x)), ifft2c(torch.from_numpy(x))
    assert got_k.dtype == got_x.dtype == torch.complex64
    np.testing.assert_allclose(got_k.numpy(), want_k, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_x.numpy(), want_x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_and_unitary(shape: tuple[int, int]) -> None:
    x = torch.from_numpy(_complex((4, *shape), seed=1))
    torch.testing.assert_close(fft2c(ifft2c(x)), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fft2c(x).abs().pow(2).sum(), x.abs().pow(2).sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(9, 7), (8, 10)])
def test_dc_at_n_over_2(shape: tuple[int, int]) -> None:
    k = fft2c(torch.ones(shape, dtype=torch.complex64))
    peak = np.unravel_index(int(k.abs().argmax()), shape)
    assert peak == (shape[0] // 2, shape[1] // 2)
    # a centred point in k-space is a constant image: the inverse puts DC back where it was
    delta = torch.zeros(shape, dtype=torch.complex64)
    delta[shape[0] // 2, shape[1] // 2] = 1
    torch.testing.assert_close(ifft2c(delta).abs(), torch.full(shape, 1 / np.sqrt(np.prod(shape))))


def test_reversed_shift_order_is_wrong_for_odd_sizes() -> None:
    """The loadFun.py order rolls odd axes by a pixel: the convention is not a detail (trap 8)."""
    x = torch.from_numpy(_complex((9, 7), seed=2))
    k = fft2c(x)
    reversed_order = torch.fft.ifftshift(torch.fft.ifft2(torch.fft.fftshift(k), norm="ortho"))
    assert not torch.allclose(reversed_order, x, atol=1e-3)
    torch.testing.assert_close(ifft2c(k), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 8, 10), (2, 9, 7)])
def test_numpy_twin_in_shards_matches_the_torch_transform(shape: tuple[int, ...]) -> None:
    """shards.fft (numpy: corpus, scoring, baselines) and models.fft (torch) are one convention."""
    from shards import fft as np_fft

    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    np.testing.assert_allclose(np_fft.fft2c(x), fft2c(torch.from_numpy(x)).numpy(), atol=1e-5)
    np.testing.assert_allclose(np_fft.ifft2c(x), ifft2c(torch.from_numpy(x)).numpy(), atol=1e-5)
    np.testing.assert_allclose(np_fft.ifft2c(np_fft.fft2c(x)), x, atol=1e-5)
