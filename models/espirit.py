"""ESPIRiT coil sensitivities in torch (Uecker et al., MRM 71:990, 2014), for the model's forward pass.

    calibration matrix   rows = every kernel_width^2 patch of the ACS block, all coils side by side
    null-space split     keep the right singular vectors with s > thresh * s_max (the signal subspace)
    image-domain op.     G(r) = sum_n k_n(r) k_n(r)^H, k_n(r) the coil vector of kernel n's inverse FFT
    maps                 S(r) = top eigenvector of G(r), phase relative to coil 0, zero where its
                         eigenvalue <= crop (no signal there: the SENSE model should not explain noise)

This follows sigpy's `EspiritCalib` step for step (the baseline arms use sigpy, docs/design.md §7), with
one change for speed: G is built and diagonalised on a coarse grid (about `grid` pixels across) and
the maps and eigenvalues are interpolated bilinearly to the image. That is accurate because every
entry of G is a trigonometric polynomial of degree < 2 * kernel_width (a 6-pixel kernel in k-space
is band-limited in the image), so the maps vary on the scale of FOV / 11; the full-resolution
eigen-decomposition costs about 1 s per slice on a CPU core, the coarse one a few milliseconds.
tests/test_espirit.py checks the maps against sigpy's.

Why in the model: under incoherent 2-D undersampling (ktRadial) the 20 x 20 ACS block is all the
calibration data, and dividing its low-resolution coil images by their root-sum-of-squares (the VarNet
estimate) leaves errors that CG-SENSE amplifies: measured on the bench corpus, CG-SENSE with these
maps loses 1-3 dB to the same solver with ESPIRiT maps (BENCHMARKS.md).

Shapes: calibration k-space complex (C, cy, cx) (the ACS block, frames averaged); the maps are
complex64 (C, Y, X) with sum_c |S_c|^2 = 1 inside the support and 0 outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.fft import ifft2c


def calibration_matrix(calib: torch.Tensor, kernel_width: int) -> torch.Tensor:
    """(C, cy, cx) -> (patches, C * kw^2): every kw x kw patch, coils side by side (sigpy's order)."""
    c = calib.shape[0]
    blocks = calib.unfold(1, kernel_width, 1).unfold(2, kernel_width, 1)  # (C, by, bx, kw, kw)
    return blocks.reshape(c, -1, kernel_width * kernel_width).transpose(0, 1).reshape(-1, c * kernel_width**2)


def _interpolate(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of real (N, yc, xc) maps to (N, Y, X) on the centred-FFT pixel grid: pixel j
    of an n-pixel axis sits at (j - n // 2) / n of the field of view, on both grids."""
    n, yc, xc = x.shape
    coords = []
    for fine, coarse in zip(shape, (yc, xc)):
        u = (torch.arange(fine, dtype=torch.float32) - fine // 2) * (coarse / fine) + coarse // 2
        coords.append(2 * u / max(coarse - 1, 1) - 1)  # align_corners=True normalisation
    gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack((gx, gy), -1).to(x.device)[None].expand(n, -1, -1, -1)
    return F.grid_sample(x[:, None].float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=True)[:, 0]


@torch.no_grad()
def espirit_maps(calib: torch.Tensor, shape: tuple[int, int], kernel_width: int = 6, thresh: float = 0.02,
                 crop: float = 0.95, grid: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """ESPIRiT maps (C, Y, X) and their eigenvalue (Y, X) from the ACS block `calib` (C, cy, cx).

    `grid`: pixels across the coarse grid the eigen-problem is solved on (the longer image axis; at
    least 2 * kernel_width per axis; >= the image size = exact sigpy arithmetic, no interpolation).
    """
    c, cy, cx = calib.shape
    if min(cy, cx) < kernel_width:
        raise ValueError(f"ESPIRiT: ACS block {cy} x {cx} is smaller than the {kernel_width}-pixel kernel")
    mat = calibration_matrix(calib.to(torch.complex64), kernel_width)
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    kernels = vh[s > thresh * s.max()].reshape(-1, c, kernel_width, kernel_width)  # (n, C, kw, kw)

    ny, nx = shape
    scale = min(1.0, grid / max(ny, nx))
    yc, xc = (max(round(n * scale), 2 * kernel_width) if scale < 1 else n for n in (ny, nx))
    yc, xc = min(yc, ny), min(xc, nx)
    padded = torch.zeros(kernels.shape[:2] + (yc, xc), dtype=torch.complex64, device=calib.device)
    y0, x0 = yc // 2 - kernel_width // 2, xc // 2 - kernel_width // 2  # sigpy's centred resize
    padded[..., y0:y0 + kernel_width, x0:x0 + kernel_width] = kernels
    img = ifft2c(padded)  # (n, C, yc, xc), orthonormal centred inverse FFT (models/fft.py)
    gram = torch.einsum("ncyx,ndyx->yxcd", img, img.conj()) * (yc * xc / kernel_width**2)
    values, vectors = torch.linalg.eigh(gram)  # ascending: the last is the top eigenpair
    top = vectors[..., -1]  # (yc, xc, C)
    top = top * (top[..., :1].conj() / top[..., :1].abs().clamp_min(1e-30))  # phase of coil 0 := 0
    eig = values[..., -1].real
    if (yc, xc) != (ny, nx):
        parts = torch.cat([top.real.permute(2, 0, 1), top.imag.permute(2, 0, 1), eig[None]])  # (2C+1, yc, xc)
        parts = _interpolate(parts, (ny, nx))
        top = torch.complex(parts[:c], parts[c:2 * c]).permute(1, 2, 0)
        eig = parts[-1]
        top = top / (top.abs() ** 2).sum(-1, keepdim=True).sqrt().clamp_min(1e-30)  # unit norm again
    maps = top.permute(2, 0, 1) * (eig > crop)
    return maps.to(torch.complex64), eig
