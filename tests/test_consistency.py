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
