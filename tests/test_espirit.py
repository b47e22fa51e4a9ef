"""models/espirit.py: ESPIRiT maps in torch equal sigpy's; the model's "espirit" sensitivity estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.espirit import calibration_matrix, espirit_maps
from models.fft import fft2c
from models.sizes import ModelConfig, build_model


def _coil_object(ny: int = 40, nx: int = 48, coils: int = 6, seed: int = 0):
    """A smooth object seen by `coils` smooth, normalised coil maps; returns (object, maps, k-space)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, ny), torch.linspace(-1, 1, nx), indexing="ij")
    obj = ((yy**2 / 0.7 + xx**2 / 0.6) < 1).float() * (1 + 0.4 * torch.cos(5 * yy) * torch.sin(3 * xx))
    centres = torch.rand(coils, 2, generator=g) * 2.4 - 1.2
    phases = torch.rand(coils, generator=g) * 6.28
    maps = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 1.5) * torch.exp(1j * (ph + 0.5 * xx))
                        for (cy, cx), ph in zip(centres.tolist(), phases.tolist())]).to(torch.complex64)
    maps = maps / (maps.abs() ** 2).sum(0).sqrt()
    return obj, maps, fft2c(obj * maps)  # (Y, X), (C, Y, X), (C, Y, X)


def test_calibration_matrix_rows_are_the_patches_in_sigpys_order() -> None:
    """Row (i, j) holds the kw x kw patch at (i, j), coil by coil, each patch row-major (a hand loop)."""
    calib = torch.randn(3, 7, 8, dtype=torch.complex64)
    kw = 4
    mat = calibration_matrix(calib, kw)
    rows = [np.concatenate([calib[c, i:i + kw, j:j + kw].numpy().ravel() for c in range(3)])
            for i in range(7 - kw + 1) for j in range(8 - kw + 1)]
    np.testing.assert_array_equal(mat.numpy(), np.stack(rows))


def test_full_grid_maps_equal_sigpy_espiritcalib() -> None:
    """With the eigen-problem on the full grid the arithmetic is sigpy's: same maps, same support."""
    sp_app = pytest.importorskip("sigpy.mri.app")
    _, _, k = _coil_object()
    ny, nx = k.shape[-2:]
    calib = k[:, ny // 2 - 10:ny // 2 + 10, nx // 2 - 10:nx // 2 + 10]
    ours, _ = espirit_maps(calib, (ny, nx), grid=10**6)
    ref = sp_app.EspiritCalib(k.numpy(), calib_width=20, show_pbar=False).run()
    assert (np.abs(ref).sum(0) > 0).mean() > 0.3  # the support is not trivially empty
    np.testing.assert_array_equal(np.abs(ours.numpy()).sum(0) > 0, np.abs(ref).sum(0) > 0)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-4)


def test_coarse_grid_maps_match_sigpy_up_to_interpolation() -> None:
    """The coarse-grid solve (the default for large images) gives the same map directions at 99% of
    the support and nearly the same support."""
    sp_app = pytest.importorskip("sigpy.mri.app")
    _, _, k = _coil_object(120, 144, seed=1)
    ny, nx = k.shape[-2:]
    calib = k[:, ny // 2 - 10:ny // 2 + 10, nx // 2 - 10:nx // 2 + 10]
    ours, _ = espirit_maps(calib, (ny, nx), grid=48)
    ref = sp_app.EspiritCalib(k.numpy(), calib_width=20, show_pbar=False).run()
    a, b = np.abs(ours.numpy()).sum(0) > 0, np.abs(ref).sum(0) > 0
    assert (a & b).sum() / (a | b).sum() > 0.97
    corr = np.abs((ref.conj() * ours.numpy()).sum(0))[a & b]
    assert np.percentile(corr, 1) > 0.999, np.percentile(corr, 1)


def test_maps_recover_the_true_coil_sensitivities_inside_the_object() -> None:
    """Noiseless data from known normalised maps: ESPIRiT returns them up to one phase per pixel
    (|<S_true, S>| close to 1), sum_c |S_c|^2 = 1 inside its support and 0 outside."""
    obj, true, k = _coil_object(seed=2)
    ny, nx = k.shape[-2:]
    maps, _ = espirit_maps(k[:, ny // 2 - 10:ny // 2 + 10, nx // 2 - 10:nx // 2 + 10], (ny, nx))
    inside = obj > 0.5
    corr = (true.conj() * maps).sum(0).abs()
    assert float(corr[inside].min()) > 0.98, float(corr[inside].min())
    power = (maps.abs() ** 2).sum(0)
    support = power > 0
    torch.testing.assert_close(power[support], torch.ones_like(power[support]), atol=1e-5, rtol=0)
    assert bool(support[inside].all())


def test_too_small_acs_block_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than"):
        espirit_maps(torch.zeros(2, 4, 20, dtype=torch.complex64), (32, 32))


def test_espirit_estimate_gives_a_closer_cg_sense_start_than_acs_division() -> None:
    """Under incoherent sampling with a 20 x 20 calibration block, the untrained model's CG-SENSE
    start with ESPIRiT sensitivities is closer to the fully sampled object than with the ACS-division
    ones; at init the model's sensitivities are exactly the ESPIRiT maps (the refiner is the identity)."""
    obj, _, k = _coil_object(64, 72, seed=3)
    ny, nx = k.shape[-2:]
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(1, 1, ny, nx, generator=g) < 0.25).float()
    mask[..., ny // 2 - 10:ny // 2 + 10, nx // 2 - 10:nx // 2 + 10] = 1.0
    measured = (k * mask[0, 0])[None, None]  # (1, 1, C, Y, X)
    errors = {}
    for estimate in ("acs", "espirit"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(size="tiny", sense_init=20, sense_scope="all", sens_estimate=estimate)).eval()
        with torch.no_grad():
            sens = model.sensitivities(measured, mask)
            from models.coils import sense_adjoint

            image = model.sense_image(sense_adjoint(measured, sens), mask, sens)
        errors[estimate] = float((image.abs()[0, 0] - obj).pow(2).mean())
        if estimate == "espirit":  # the ESPIRiT maps, up to one phase per pixel
            maps, _ = espirit_maps(k[:, ny // 2 - 10:ny // 2 + 10, nx // 2 - 10:nx // 2 + 10], (ny, nx))
            support = (maps.abs() ** 2).sum(0) > 0
            corr = (maps.conj() * sens[0, 0]).sum(0).abs()
            torch.testing.assert_close(corr[support], torch.ones_like(corr[support]), atol=1e-4, rtol=0)
            assert float(sens[0, 0][:, ~support].abs().max()) == 0.0
    assert errors["espirit"] < 0.5 * errors["acs"], errors


def test_espirit_estimate_leaves_a_real_object_real() -> None:
    """The object is real and positive and every coil adds its own phase: the coil-combined zero-filled
    image S^H y is real and positive again inside the object (the map phase is chosen per pixel so),
    not carrying coil 0's phase as plain ESPIRiT maps do."""
    from models.coils import sense_adjoint

    obj, _, k = _coil_object(64, 72, seed=4)
    ny, nx = k.shape[-2:]
    mask = torch.zeros(1, 1, ny, nx)
    mask[..., ::3, :] = 1.0
    mask[..., ny // 2 - 10:ny // 2 + 10, :] = 1.0
    measured = (k * mask[0, 0])[None, None]
    model = build_model(ModelConfig(size="tiny", sens_estimate="espirit")).eval()
    with torch.no_grad():
        image = sense_adjoint(measured, model.sensitivities(measured, mask))[0, 0]
        plain, _ = espirit_maps(k[:, ny // 2 - 10:ny // 2 + 10, :], (ny, nx))
        plain_image = (plain.conj() * torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(
            measured[0, 0], dim=(-2, -1)), norm="ortho"), dim=(-2, -1))).sum(0)
    inside = obj > 0.5
    assert float(torch.angle(image[inside]).abs().mean()) < 0.1
    assert float(torch.angle(plain_image[inside]).abs().mean()) > 0.3  # the test can fail: plain maps do not


def test_unknown_sensitivity_estimate_is_refused() -> None:
    with pytest.raises(ValueError, match="sensitivity estimate"):
        build_model(ModelConfig(size="tiny", sens_estimate="guess"), device="meta")


def test_a_too_small_acs_block_falls_back_to_the_acs_estimate_with_a_warning() -> None:
    """A sample whose calibration block is under the ESPIRiT kernel (4 rows) does not stop training:
    it gets exactly the 'acs' estimate, and the warning names the block and the setting."""
    torch.manual_seed(0)
    _, _, k = _coil_object(40, 48)
    mask = torch.zeros(1, 1, 40, 48)
    mask[..., ::4, :] = 1.0
    mask[..., 18:22, :] = 1.0  # a 4-row ACS
    measured = (k * mask[0, 0])[None, None]
    esp = build_model(ModelConfig(size="tiny", sens_estimate="espirit")).eval()
    acs = build_model(ModelConfig(size="tiny", sens_estimate="acs")).eval()
    acs.load_state_dict(esp.state_dict())
    with torch.no_grad(), pytest.warns(UserWarning, match="4 x 48.*sens_from_acquired"):
        got = esp.sensitivities(measured, mask)
    with torch.no_grad():
        torch.testing.assert_close(got, acs.sensitivities(measured, mask))
