"""Coil operations: root-sum-of-squares, SENSE expand/reduce, and learned coil sensitivities.

Shapes (the shard sample `(T, C, Y, X)` plus a batch axis):
    image   complex (B, T, Y, X)        coil-combined image
    coils   complex (B, T, C, Y, X)     per-coil images
    kspace  complex (B, T, C, Y, X)     per-coil k-space, DC at (Y//2, X//2) when the data are centred
    mask    float   (B, T, Y, X)        1 where k-space was acquired (broadcast over coils)
    sens    complex (B, 1, C, Y, X)     coil sensitivities, shared by the T frames, sum_c |S_c|^2 = 1

The SENSE forward operator is A x = M F S x (expand over coils, FFT, mask) and its adjoint
A^H k = sum_c conj(S_c) F^H (M k_c); both are linear and exactly adjoint (tests/test_coils.py).

Sensitivities follow fastMRI's VarNet `SensitivityModel`: a low-resolution coil image from the
fully sampled k-space centre (the ACS block), refined per coil by a small CNN, then divided by the
root-sum-of-squares over coils. The ACS block is found from the mask itself (`acs_window`), grown
around the k-space energy peak: 2025 files can have DC about 18 rows off the array centre while the
masks put the ACS at ny//2 (docs/cmrxrecon.md §8 trap 18), so nothing here assumes DC at N//2.

References: Sriram et al., "End-to-End Variational Networks for Accelerated MRI Reconstruction",
MICCAI 2020 (fastMRI `varnet.py`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from models.espirit import espirit_maps
from models.fft import fft2c, ifft2c


def rss(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Root-sum-of-squares over `dim` (the coil axis of (B, T, C, Y, X)): real, that axis removed."""
    return torch.sqrt((x.abs() ** 2).sum(dim))


def sens_expand(image: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """Coil images S_c x. image (B, T, Y, X), sens (B, 1|T, C, Y, X) -> (B, T, C, Y, X)."""
    return image.unsqueeze(2) * sens


def sens_reduce(coils: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """Coil combination sum_c conj(S_c) y_c. coils (B, T, C, Y, X), sens (B, 1|T, C, Y, X) -> (B, T, Y, X)."""
    return (coils * sens.conj()).sum(2)


def sense_forward(image: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A x = M F S x. image (B, T, Y, X), mask (B, T, Y, X) or None (no masking) -> k-space (B, T, C, Y, X)."""
    kspace = fft2c(sens_expand(image, sens))
    return kspace if mask is None else kspace * mask.unsqueeze(2)


def sense_adjoint(kspace: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A^H k = S^H F^H M k. kspace (B, T, C, Y, X), mask (B, T, Y, X) or None -> image (B, T, Y, X)."""
    if mask is not None:
        kspace = kspace * mask.unsqueeze(2)
    return sens_reduce(ifft2c(kspace), sens)


def sense_normal(image: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A^H A x = S^H F^H M F S x, the normal operator CG-SENSE and the model's solves invert: (B, T, Y, X)."""
    return sense_adjoint(sense_forward(image, sens, mask), sens)


def _grow_block(sampled: np.ndarray, y: int, x: int) -> tuple[int, int, int, int]:
    """Largest all-ones rectangle grown one row/column at a time from the seed (y, x).

    Growing all four sides in turn keeps the block square-ish until it meets the ACS edges, so a
    radial spoke through the centre (1-2 px wide) cannot drag it along a whole axis.
    Returns the inclusive bounds (y0, y1, x0, x1).
    """
    ny, nx = sampled.shape
    y0 = y1 = y
    x0 = x1 = x
    grew = True
    while grew:
        grew = False
        if y0 > 0 and sampled[y0 - 1, x0:x1 + 1].all():
            y0, grew = y0 - 1, True
        if y1 < ny - 1 and sampled[y1 + 1, x0:x1 + 1].all():
            y1, grew = y1 + 1, True
        if x0 > 0 and sampled[y0:y1 + 1, x0 - 1].all():
            x0, grew = x0 - 1, True
        if x1 < nx - 1 and sampled[y0:y1 + 1, x1 + 1].all():
            x1, grew = x1 + 1, True
    return y0, y1, x0, x1


def acs_bounds(sampled: np.ndarray, energy: np.ndarray) -> tuple[int, int, int, int]:
    """The fully sampled calibration block of one sample, as inclusive bounds (y0, y1, x0, x1).

    sampled: bool (Y, X), locations acquired in every frame; energy: float (Y, X), sum over frames
    and coils of |k|^2. Two seeds are grown: the energy peak among sampled locations (where DC
    really is) and the array centre (where the official masks put the ACS); the larger block wins,
    the energy-peak one on a tie. With DC off-centre *and* an ACS at the centre (trap 18), that is
    the real 20-line ACS rather than a lone sampled line through DC.
    """
    if not sampled.any():  # nothing acquired in every frame (e.g. an SSL split without ACS)
        return 0, sampled.shape[0] - 1, 0, sampled.shape[1] - 1
    peak = np.unravel_index(int(np.argmax(np.where(sampled, energy, -1.0))), sampled.shape)
    blocks = [_grow_block(sampled, int(peak[0]), int(peak[1]))]
    cy, cx = sampled.shape[0] // 2, sampled.shape[1] // 2
    if sampled[cy, cx]:
        blocks.append(_grow_block(sampled, cy, cx))
    area = [(b[1] - b[0] + 1) * (b[3] - b[2] + 1) for b in blocks]
    return blocks[int(np.argmax(area))]  # argmax returns the first (energy-peak) block on a tie


def acs_window(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A {0,1} window over the ACS block of each sample.

    kspace complex (B, T, C, Y, X), mask (B, T, Y, X) -> float32 (B, 1, 1, Y, X) on kspace's device.
    The search runs on the CPU in numpy: it is a few hundred tiny comparisons per sample, which
    would each be a device sync on a GPU.
    """
    sampled = (mask > 0).all(1)  # (B, Y, X): acquired in every frame
    union = (mask > 0).any(1)
    energy = (kspace.abs() ** 2).sum((1, 2))  # (B, Y, X)
    sampled_np, union_np = sampled.cpu().numpy(), union.cpu().numpy()
    energy_np = energy.detach().float().cpu().numpy()
    window = np.zeros(sampled_np.shape, dtype=np.float32)
    for b in range(sampled_np.shape[0]):
        # kt masks with no location common to all frames: fall back to any frame's samples
        sampled_b = sampled_np[b] if sampled_np[b].any() else union_np[b]
        y0, y1, x0, x1 = acs_bounds(sampled_b, energy_np[b])
        window[b, y0:y1 + 1, x0:x1 + 1] = 1.0
    return torch.from_numpy(window).to(kspace.device)[:, None, None]  # (B, 1, 1, Y, X)


class CoilRefiner(nn.Module):
    """A small residual CNN applied to each coil image separately (coils folded into the batch).

    The update is scaled by a learned gain that starts at zero (ReZero), so at initialisation the
    refiner is the identity and the sensitivities are the plain ACS estimate. The gain is a parameter
    of this module, not of a child: deepspeed.zero.Init partitions each module's parameters when that
    module's __init__ ends, so zeroing a child's weight here would silently do nothing (checked).
    """

    def __init__(self, channels: int = 16, layers: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        convs: list[nn.Module] = [nn.Conv2d(2, channels, 3, padding=1, **dd), nn.GELU()]
        for _ in range(layers - 2):
            convs += [nn.Conv2d(channels, channels, 3, padding=1, **dd), nn.GELU()]
        self.body = nn.Sequential(*convs)
        self.out = nn.Conv2d(channels, 2, 3, padding=1, **dd)
        self.gain = nn.Parameter(torch.zeros(1, **dd))

    def forward(self, coils: torch.Tensor) -> torch.Tensor:
        """coils complex (B, C, Y, X) -> refined complex64 (B, C, Y, X)."""
        b, c, y, x = coils.shape
        real = torch.view_as_real(coils.to(torch.complex64)).reshape(b * c, y, x, 2)
        real = real.permute(0, 3, 1, 2)  # (B*C, 2, Y, X)
        # per-coil-image normalisation: the refiner sees unit-scale inputs whatever the vendor's scale
        scale = real.flatten(1).std(1).clamp_min(1e-12)[:, None, None, None]
        dtype = self.out.weight.dtype
        delta = self.out(self.body((real / scale).to(dtype))).float() * self.gain.float() * scale
        out = (real + delta).permute(0, 2, 3, 1).reshape(b, c, y, x, 2)  # (B, C, Y, X, 2)
        return torch.view_as_complex(out.contiguous())


class SensitivityModel(nn.Module):
    """Coil sensitivities: an estimate from the ACS block -> CoilRefiner -> divide by RSS.

    estimate "acs": the ACS block's low-resolution coil images (VarNet); "espirit": ESPIRiT maps of the
    same block (models/espirit.py), far more accurate when the ACS block is small (ktRadial's 20 x 20).
    """

    def __init__(self, channels: int = 16, layers: int = 3, eps: float = 1e-10, estimate: str = "acs",
                 device=None, dtype=None) -> None:
        super().__init__()
        if estimate not in SENS_ESTIMATES:
            raise ValueError(f"sensitivity estimate {estimate!r} is not one of {SENS_ESTIMATES}")
        self.refiner = CoilRefiner(channels, layers, device=device, dtype=dtype)
        self.eps = eps
        self.estimate = estimate

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """kspace complex64 (B, T, C, Y, X) (zero where not acquired), mask (B, T, Y, X)
        -> sens complex64 (B, 1, C, Y, X) with sum_c |S_c|^2 = 1 wherever the coils see signal."""
        window = acs_window(kspace, mask)  # (B, 1, 1, Y, X)
        # coil sensitivities do not change over the cardiac cycle: average the frames' ACS data
        acs = (kspace * mask.unsqueeze(2) * window).sum(1) / (mask.unsqueeze(2) * window).sum(1).clamp_min(1.0)
        if self.estimate == "espirit":
            coils = self.refiner(torch.stack([_espirit(a, w[0, 0]) for a, w in zip(acs, window)]))
        else:
            coils = self.refiner(ifft2c(acs))  # (B, C, Y, X) low-resolution coil images
        power = (coils.abs() ** 2).sum(1, keepdim=True)  # (B, 1, Y, X)
        # eps relative to each sample's peak: k-space scales differ by 1e9 between vendors (trap 13)
        floor = self.eps * power.flatten(1).amax(1).clamp_min(torch.finfo(power.dtype).tiny)[:, None, None, None]
        norm = torch.sqrt(power + floor)
        return (coils / norm).unsqueeze(1)  # (B, 1, C, Y, X)


SENS_ESTIMATES = ("acs", "espirit")
ESPIRIT_KERNEL = 6  # ESPIRiT's kernel width (sigpy's default)
ESPIRIT_MAX_CALIB = 32
"""Longest calibration side used by ESPIRiT: a Cartesian ACS spans the whole readout, but the SVD's cost
grows with the patch count and the maps are smooth, so the central 32 columns carry the information."""


def _espirit(acs: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """ESPIRiT maps (C, Y, X) of one sample from its frame-averaged ACS k-space (C, Y, X) and window (Y, X)."""
    rows = torch.nonzero(window.sum(1)).flatten()
    cols = torch.nonzero(window.sum(0)).flatten()
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    hy, hx = min(y1 - y0, ESPIRIT_MAX_CALIB) // 2, min(x1 - x0, ESPIRIT_MAX_CALIB) // 2
    if min(hy, hx) * 2 < ESPIRIT_KERNEL:  # e.g. an SSDU input set that kept a few ACS rows: no crash
        warnings.warn(f"ESPIRiT: the ACS block is {y1 - y0} x {x1 - x0}, smaller than the {ESPIRIT_KERNEL}-pixel "
                      "kernel; this sample uses the 'acs' sensitivity estimate (with SSDU set "
                      "objective.sens_from_acquired = true)", stacklevel=2)
        return ifft2c(acs)
    calib = acs[:, cy - hy:cy - hy + 2 * hy, cx - hx:cx - hx + 2 * hx].detach()
    maps, _ = espirit_maps(calib, tuple(acs.shape[-2:]), kernel_width=ESPIRIT_KERNEL)
    # ESPIRiT fixes each pixel's phase to coil 0's, so S^H y carries coil 0's phase (1.6 rad on average
    # on the bench corpus) and the network would have to learn it. A phase per pixel is free (the
    # SENSE model cannot see it), so take the one that makes the low-resolution coil-combined image
    # real and positive, as the "acs" estimate's maps do implicitly.
    combined = (maps.conj() * ifft2c(acs.detach())).sum(0)
    return maps * torch.where(combined.abs() > 0, torch.sgn(combined), torch.ones_like(combined))
