"""The GPU training path's precision, checked on CPU: every size runs forward and backward with bf16
parameters (what DeepSpeed's bf16 mode trains), the transformer really computes in bf16, while the
FFTs, the coil expand/reduce (SENSE) and data consistency stay complex64; the loss is finite and
within a few percent of the same weights' fp32 loss, and every gradient is finite."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import models.coils as coils
import models.recon as recon
from models.consistency import DataConsistency
from models.sizes import SIZES, build_model

META = {"modality": "Cine", "view": "sax", "pattern": "Uniform", "R": 8, "vendor": "Siemens", "field_T": 3.0}


def _batch(t: int = 2, c: int = 4, y: int = 32, x: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    kspace = torch.randn(1, t, c, y, x, dtype=torch.complex64, generator=g)
    mask = (torch.rand(1, t, y, x, generator=g) < 0.3).float()
    mask[:, :, y // 2 - 4: y // 2 + 4] = 1                     # ACS
    return kspace * mask.unsqueeze(2), mask


def _loss(out: dict, kspace: torch.Tensor) -> torch.Tensor:
    """A k-space + image loss of the kind pretraining uses (float32)."""
    return (out["kspace"] - kspace).abs().mean() + out["image"].abs().mean()


def _record_physics(monkeypatch) -> dict[str, set]:
    """Wrap the FFTs, SENSE operators and data consistency; record the dtypes they return."""
    seen: dict[str, set] = defaultdict(set)

    def wrap(module, name):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            seen[name].add(out.dtype)
            return out

        monkeypatch.setattr(module, name, spy)

    for module, name in [(coils, "fft2c"), (coils, "ifft2c"), (recon, "sense_forward"), (recon, "sense_adjoint")]:
        wrap(module, name)
    real_dc = DataConsistency.forward

    def dc(self, predicted, measured, mask):
        out = real_dc(self, predicted, measured, mask)
        seen["data_consistency"].add(out.dtype)
        return out

    monkeypatch.setattr(DataConsistency, "forward", dc)
    return seen


@pytest.mark.parametrize("size", [pytest.param(s, marks=[pytest.mark.slow, pytest.mark.long]) if s == "1b" else s for s in SIZES])
def test_bf16_forward_backward_keeps_physics_complex64_and_tracks_fp32(size: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model(size)
    with torch.no_grad():                     # give the learned paths weight, so bf16 can show
        for m in model.modules():
            if hasattr(m, "gain") and isinstance(m.gain, torch.nn.Parameter):
                m.gain.fill_(0.5)
    kspace, mask = _batch()
    with torch.no_grad():
        loss32 = _loss(model(kspace, mask, [META]), kspace).item()
    model = model.to(torch.bfloat16)          # in place: what DeepSpeed's bf16 mode does
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    seen = _record_physics(monkeypatch)
    block_dtypes = set()
    hook = model.cascades[0].backbone.blocks[0].mlp.fc1.register_forward_hook(
        lambda mod, inp, out: block_dtypes.add(out.dtype))
    out = model(kspace, mask, [META])
    loss16 = _loss(out, kspace)
    loss16.backward()
    hook.remove()
    assert block_dtypes == {torch.bfloat16}                              # the transformer ran in bf16
    assert set(seen) == {"fft2c", "ifft2c", "sense_forward", "sense_adjoint", "data_consistency"}
    assert all(d == {torch.complex64} for d in seen.values()), dict(seen)
    assert out["image"].dtype == out["kspace"].dtype == out["sens"].dtype == torch.complex64
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32, rel=0.05)
    assert loss16.item() != loss32                                        # bf16 did change something
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)
