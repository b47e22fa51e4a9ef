"""models/consistency.py: hard replacement is exact; soft is the VarNet update."""

from __future__ import annotations

import torch

from models.consistency import DataConsistency
from models.sizes import ModelConfig, build_model


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, 3, 4, 9, 11, dtype=torch.complex64, generator=g)
    meas = torch.randn(2, 3, 4, 9, 11, dtype=torch.complex64, generator=g)
    mask = (torch.rand(2, 3, 9, 11, generator=g) < 0.3).float()
    return pred, meas * mask.unsqueeze(2), mask


def test_hard_replaces_exactly() -> None:
    pred, meas, mask = _data()
    out = DataConsistency("hard")(pred, meas, mask)
    sampled = mask.unsqueeze(2).expand_as(out) > 0
    assert sampled.any() and (~sampled).any()
    assert torch.equal(out[sampled], meas[sampled])
    assert torch.equal(out[~sampled], pred[~sampled])


def test_soft_interpolates_with_its_learned_weight() -> None:
    pred, meas, mask = _data(1)
    dc = DataConsistency("soft")
    sampled = mask.unsqueeze(2).expand_as(pred) > 0
    with torch.no_grad():
        dc.weight.fill_(0.25)
    out = dc(pred, meas, mask)
    torch.testing.assert_close(out[sampled], (0.75 * pred + 0.25 * meas)[sampled])
    assert torch.equal(out[~sampled], pred[~sampled])
    out.abs().sum().backward()
    assert dc.weight.grad is not None and dc.weight.grad.abs() > 0


def test_hard_mode_model_output_equals_measured_kspace_at_sampled_locations() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", dc_mode="hard"))
    kspace = torch.randn(1, 2, 3, 13, 17, dtype=torch.complex64)
    mask = (torch.rand(1, 2, 13, 17) < 0.4).float()
    mask[:, :, 5:9] = 1
    out = model(kspace, mask, [{}])["kspace"]
    sampled = mask.unsqueeze(2).expand_as(out) > 0
    assert torch.equal(out[sampled], kspace[sampled])
    assert not torch.allclose(out[~sampled], torch.zeros_like(out[~sampled]))  # it did predict the rest


def _sense_system(seed: int = 2):
    """A small SENSE problem: sensitivities normalised over coils, a random mask, its normal operator."""
    from models.coils import sense_adjoint, sense_forward

    g = torch.Generator().manual_seed(seed)
    sens = torch.randn(2, 1, 3, 6, 5, dtype=torch.complex64, generator=g)
    sens = sens / (sens.abs() ** 2).sum(2, keepdim=True).sqrt()
    mask = (torch.rand(2, 2, 6, 5, generator=g) < 0.4).float()
    rhs = torch.randn(2, 2, 6, 5, dtype=torch.complex64, generator=g)
    return (lambda x: sense_adjoint(sense_forward(x, sens, mask), sens)), rhs


def test_cg_sense_matches_a_direct_solve() -> None:
    """CG on (A^H A + mu I) x = b equals numpy's dense solve of the same system, sample by sample."""
    import numpy as np

    from models.consistency import cg_sense

    normal, rhs = _sense_system()
    mu, n = 0.05, rhs[0].numel()
    x = cg_sense(rhs, normal, mu, iterations=2 * n)
    for b in range(2):  # the dense matrix of sample b's operator, column by column from basis vectors
        basis = torch.eye(n, dtype=torch.complex64).reshape(n, *rhs.shape[1:])
        cols = torch.stack([normal(torch.stack([e, torch.zeros_like(e)]) if b == 0 else
                                   torch.stack([torch.zeros_like(e), e]))[b].reshape(-1) for e in basis], 1)
        expected = np.linalg.solve(cols.numpy().astype(np.complex128) + mu * np.eye(n), rhs[b].reshape(-1).numpy())
        np.testing.assert_allclose(x[b].reshape(-1).numpy(), expected, rtol=0, atol=2e-4 * np.abs(expected).max())


def test_cg_sense_reduces_the_residual_monotonically_and_starts_from_x0() -> None:
    from models.consistency import cg_sense

    normal, rhs = _sense_system(3)
    mu = 0.01
    res = [float(((normal(x) + mu * x) - rhs).abs().pow(2).sum())
           for x in (cg_sense(rhs, normal, mu, k) for k in (0, 2, 5, 10))]
    assert res[0] > res[1] > res[2] > res[3]
    exact = cg_sense(rhs, normal, mu, 200)
    # started at the solution, CG stays there (the residual is already ~0)
    torch.testing.assert_close(cg_sense(rhs, normal, mu, 3, x0=exact), exact, atol=1e-4, rtol=1e-4)


def test_sense_init_starts_closer_to_the_truth_than_zero_filling() -> None:
    """An untrained model's starting image with `sense_init` (CG-SENSE with its own sensitivities) is
    closer to the fully sampled image than the zero-filled adjoint under incoherent undersampling."""
    from models.coils import rss, sense_adjoint
    from models.fft import fft2c, ifft2c

    g = torch.Generator().manual_seed(4)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 40), indexing="ij")
    obj = ((yy**2 / 0.6 + xx**2 / 0.5) < 1).float() * (1 + 0.5 * torch.sin(6 * xx))  # smooth ellipse
    coilmaps = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)) for cy, cx in
                            ((-1, -1), (-1, 1), (1, -1), (1, 1))]).to(torch.complex64)
    full = fft2c(obj[None, None, None] * coilmaps[None, None])  # (1, 1, 4, 48, 40)
    mask = (torch.rand(1, 1, 48, 40, generator=g) < 0.3).float()
    mask[..., 14:34, 10:30] = 1.0  # a fully sampled calibration block, as every official mask has
    ref = rss(ifft2c(full))[0, 0]
    errors = {}
    for n in (0, 10):
        model = build_model(ModelConfig(size="tiny", sense_init=n, sense_mu=0.01)).eval()
        with torch.no_grad():
            measured = full * mask.unsqueeze(2)
            sens = model.sensitivities(measured, mask)
            image = sense_adjoint(measured, sens)
            if n:
                image = model.sense_image(image, mask, sens)
        errors[n] = float((image.abs()[0, 0] - ref).pow(2).mean())
    assert errors[10] < 0.5 * errors[0], errors


def test_weighted_dc_is_soft_at_init_and_follows_its_formula_when_trained() -> None:
    """'weighted' equals 'soft' at initialisation; with (a, b, c) set, the update at each sampled
    location uses lambda * exp(a d + b r + c), d = fraction of frames sampled there, r = distance from
    the centre over the half-diagonal, computed here by hand for one location."""
    import math

    pred, meas, mask = _data(5)
    soft, weighted = DataConsistency("soft"), DataConsistency("weighted")
    torch.testing.assert_close(weighted(pred, meas, mask), soft(pred, meas, mask))
    with torch.no_grad():
        weighted.sampling.copy_(torch.tensor([0.7, -1.2, 0.1]))
        weighted.weight.fill_(0.5)
    b, t, c, y, x = 1, 2, 3, 2, 9  # a location sampled in frame t of sample b
    mask[b, t, y, x] = 1.0
    out = weighted(pred, meas, mask)
    d = float(mask[b, :, y, x].mean())
    r = math.hypot((y - 9 // 2) / 4.5, (x - 11 // 2) / 5.5) / math.sqrt(2)
    lam = 0.5 * math.exp(0.7 * d - 1.2 * r + 0.1)
    expected = pred[b, t, c, y, x] - lam * (pred[b, t, c, y, x] - meas[b, t, c, y, x])
    torch.testing.assert_close(out[b, t, c, y, x], expected)
    unsampled = mask.unsqueeze(2).expand_as(pred) == 0
    assert torch.equal(out[unsampled], pred[unsampled])
    out.abs().sum().backward()
    assert weighted.sampling.grad is not None and weighted.sampling.grad.abs().sum() > 0
