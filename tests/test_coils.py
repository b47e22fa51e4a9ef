"""models/coils.py: SENSE operator adjointness, RSS, sensitivity normalisation, the ACS search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.coils import SensitivityModel, acs_bounds, acs_window, rss, sense_adjoint, sense_forward
from models.fft import fft2c


def _crandn(*shape: int, dtype=torch.complex128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=g)


@pytest.mark.parametrize("shape", [(2, 3, 4, 9, 7), (1, 2, 3, 8, 10)])
def test_sense_forward_and_adjoint_pass_the_dot_product_test(shape: tuple[int, ...]) -> None:
    b, t, c, y, x = shape
    image, kspace = _crandn(b, t, y, x, seed=1), _crandn(*shape, seed=2)
    sens = _crandn(b, 1, c, y, x, seed=3)
    mask = (torch.rand(b, t, y, x, generator=torch.Generator().manual_seed(4)) < 0.5).double()
    lhs = torch.vdot(sense_forward(image, sens, mask).flatten(), kspace.flatten())  # <A x, k>
    rhs = torch.vdot(image.flatten(), sense_adjoint(kspace, sens, mask).flatten())  # <x, A^H k>
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    assert abs(lhs) > 1e-3  # not a vacuous 0 == 0


def test_rss_matches_numpy() -> None:
    coils = _crandn(2, 3, 4, 5, 6, dtype=torch.complex64)
    want = np.sqrt((np.abs(coils.numpy()) ** 2).sum(2))
    np.testing.assert_allclose(rss(coils).numpy(), want, rtol=1e-6)


def _phantom(y: int, x: int, dc_row_shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth positive object seen by 4 smooth coils -> (kspace (1, 2, 4, Y, X), true sens (4, Y, X)).

    dc_row_shift moves the k-space energy peak off the array centre (a linear phase in the image)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, y), torch.linspace(-1, 1, x), indexing="ij")
    obj = torch.exp(-(yy**2 + xx**2) * 3).to(torch.complex64) + 0.2
    centres = [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    sens = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2) * torch.exp(1j * (cy * yy + cx * xx))
                        for cy, cx in centres]).to(torch.complex64)
    sens = sens / rss(sens, 0)
    ramp = torch.exp(2j * torch.pi * dc_row_shift * torch.arange(y)[:, None] / y).to(torch.complex64)
    kspace = fft2c(sens * obj * ramp)  # (4, Y, X)
    return kspace[None, None].expand(1, 2, 4, y, x).clone(), sens


def _uniform_mask(y: int, x: int, r: int, acs_centre: int, acs: int = 20) -> torch.Tensor:
    mask = torch.zeros(1, 2, y, x)
    mask[..., ::r, :] = 1
    mask[..., acs_centre - acs // 2: acs_centre - acs // 2 + acs, :] = 1
    return mask


def test_sensitivities_sum_of_squares_is_one() -> None:
    kspace, _ = _phantom(40, 36)
    mask = _uniform_mask(40, 36, 4, 20)
    model = SensitivityModel(channels=8, layers=3)
    torch.nn.init.constant_(model.refiner.gain, 0.5)  # a refiner that is not the identity
    sens = model(kspace * mask.unsqueeze(2), mask)
    assert sens.shape == (1, 1, 4, 40, 36) and sens.dtype == torch.complex64
    torch.testing.assert_close(rss(sens, 2), torch.ones(1, 1, 40, 36), rtol=1e-5, atol=1e-5)


def test_initial_sensitivities_match_the_true_coil_profiles() -> None:
    kspace, true = _phantom(48, 40)
    mask = _uniform_mask(48, 40, 4, 24)
    est = SensitivityModel(channels=8, layers=3)(kspace * mask.unsqueeze(2), mask)[0, 0]  # (4, Y, X)
    corr = torch.vdot(est.flatten(), true.flatten()).abs() / (est.norm() * true.norm())
    assert corr > 0.97


def test_acs_found_where_the_energy_is_when_dc_is_off_centre() -> None:
    y, x, shift = 80, 64, -18
    kspace, _ = _phantom(y, x, dc_row_shift=shift)
    dc = y // 2 + shift
    mask = _uniform_mask(y, x, 6, acs_centre=dc)  # the ACS follows DC, away from the array centre
    window = acs_window(kspace * mask.unsqueeze(2), mask)[0, 0, 0]
    rows = torch.nonzero(window.any(1)).flatten()
    assert dc - 10 >= rows.min() - 1 and rows.max() + 1 >= dc + 9  # the whole 20-line block (+ an adjacent line)
    assert rows.max() - rows.min() + 1 <= 22 and window[:, 0].any() and window[:, -1].any()  # full readout
    assert not window[y // 2 + 5].any()  # and nothing at the array centre


def test_acs_block_at_centre_wins_over_a_lone_line_through_off_centre_dc() -> None:
    """Trap 18 as the 2025 data have it: ACS at ny//2, DC ~18 rows away on a single sampled line."""
    sampled = np.zeros((80, 64), bool)
    sampled[30:50] = True  # the official ACS, centred at ny//2
    sampled[22] = True  # one Uniform line, through the true DC
    energy = np.zeros((80, 64))
    energy[22, 32] = 1.0
    assert acs_bounds(sampled, energy) == (30, 49, 0, 63)


def test_radial_block_is_not_dragged_along_a_spoke() -> None:
    sampled = np.zeros((60, 70), bool)
    sampled[20:40, 25:45] = True  # 20 x 20 ACS block
    sampled[:, 35] = True  # a vertical spoke through the centre
    sampled[30, :] = True  # a horizontal one
    energy = np.random.default_rng(0).random((60, 70))
    assert acs_bounds(sampled, energy) == (20, 39, 25, 44)
