"""SSDU objective: Θ/Λ split of the acquired mask and the loss on Λ only (pretrain/objective.py)."""

from __future__ import annotations

import pytest
import torch

from pretrain.objective import ObjectiveConfig, acs_rows, split_mask, ssdu_loss, ssdu_step_loss


def cartesian_mask(b: int = 2, t: int = 3, ny: int = 40, nx: int = 24, step: int = 4, acs: int = 8) -> torch.Tensor:
    """(B, T, Y, X): every `step`-th phase-encode row (shifted per frame) + `acs` centre rows."""
    m = torch.zeros(b, t, ny, nx)
    for f in range(t):
        m[:, f, f % step::step] = 1
    m[:, :, ny // 2 - acs // 2: ny // 2 + acs // 2] = 1
    return m


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("unit", ["point", "line"])
@pytest.mark.parametrize("selection", ["uniform", "gaussian"])
def test_split_partitions_omega_keeps_acs_and_hits_the_ratio(unit: str, selection: str) -> None:
    omega = cartesian_mask()
    cfg = ObjectiveConfig(loss_fraction=0.4, selection=selection, unit=unit)
    s = split_mask(omega, cfg, gens(2))
    assert torch.equal(s.theta + s.lam, omega)                       # Θ ∪ Λ = Ω
    assert (s.theta * s.lam).sum() == 0                               # Θ ∩ Λ = ∅
    full = acs_rows(omega)                                            # (B, T, Y)
    assert full[..., 16:24].all()                                     # the 8 centre rows found ...
    assert full.sum(-1).le(9).all()                                   # ... plus at most an adjacent sampled row
    acs = acs_rows(omega, cfg.acs_max_rows)                           # capped at 8 rows around Y//2
    assert acs.sum(-1).eq(8).all() and acs[..., 16:24].all()
    assert s.lam[acs[..., None].expand_as(omega)].sum() == 0          # ACS stays in Θ
    eligible = (omega * ~acs[..., None]).sum((-2, -1))
    if unit == "line":
        eligible = eligible / omega.shape[-1]
        got = s.lam.amax(-1).sum(-1)
    else:
        got = s.lam.sum((-2, -1))
    assert torch.allclose(got, torch.round(0.4 * eligible))          # |Λ| = round(ρ |Ω \ ACS|)


def test_gaussian_selection_prefers_the_centre_and_uniform_does_not() -> None:
    omega = torch.ones(64, 1, 64, 64)                                 # no ACS gap: every location eligible
    omega[:, :, 32] = 0                                               # centre row missing -> no ACS
    centre = torch.zeros(64, 64, dtype=torch.bool)
    centre[16:48, 16:48] = True                                       # a quarter of the area
    frac = {}
    for sel in ("uniform", "gaussian"):
        lam = split_mask(omega, ObjectiveConfig(selection=sel, loss_fraction=0.2), gens(64)).lam
        frac[sel] = float(lam[..., centre].sum() / lam.sum())
    assert abs(frac["uniform"] - 0.25) < 0.03
    assert frac["gaussian"] > 0.45


def test_split_is_a_function_of_the_generator_seed() -> None:
    omega = cartesian_mask()
    cfg = ObjectiveConfig()
    a, b, c = (split_mask(omega, cfg, gens(2, seed)) for seed in (5, 5, 6))
    assert torch.equal(a.lam, b.lam) and not torch.equal(a.lam, c.lam)


def test_loss_is_zero_for_a_perfect_prediction_and_blind_to_theta() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 4, 40, 24, dtype=torch.complex64, generator=g)
    omega = cartesian_mask()
    y = k * omega[:, :, None]
    s = split_mask(omega, ObjectiveConfig(), gens(2))
    assert ssdu_loss(y, y, s.lam).item() == pytest.approx(0.0, abs=1e-7)
    noisy = y + 0.1 * torch.randn(y.shape, dtype=torch.complex64, generator=g)
    off_lambda = torch.where(s.lam[:, :, None].bool(), y, noisy)       # errors only outside Λ
    assert ssdu_loss(off_lambda, y, s.lam).item() == pytest.approx(0.0, abs=1e-7)
    assert ssdu_loss(noisy, y, s.lam).item() > 0.1
    # normalised: scaling the data does not change the loss
    assert ssdu_loss(3 * noisy, 3 * y, s.lam).item() == pytest.approx(ssdu_loss(noisy, y, s.lam).item(), rel=1e-5)


class Recorder(torch.nn.Module):
    """A stand-in model: predicts zeros, records what it was given."""

    def forward(self, kspace, mask, meta):
        self.seen = (kspace, mask, meta)
        return {"kspace": torch.zeros_like(kspace), "image": kspace[:, :, 0]}


@pytest.mark.parametrize("acquired_only", [False, True])
def test_the_model_sees_only_theta_on_retrospective_and_acquired_data(acquired_only: bool) -> None:
    """Retrospectively undersampled training batches and undersampled-only (validation-style) batches
    go through the same code: only kspace + its mask Ω are used; `target` is never read."""
    g = torch.Generator().manual_seed(1)
    omega = cartesian_mask()
    k = torch.randn(2, 3, 4, 40, 24, dtype=torch.complex64, generator=g) * omega[:, :, None]
    batch = {"kspace": k, "mask": omega, "meta": [{"__key__": "a"}, {"__key__": "b"}]}
    if not acquired_only:
        batch.update(target=torch.randn_like(k), has_target=torch.tensor([True, True]))
    model = Recorder()
    loss = ssdu_step_loss(model, batch, ObjectiveConfig(splits=2), seed=0, step=3)
    seen_k, seen_mask, seen_meta = model.seen
    assert seen_k.shape[0] == 4 and len(seen_meta) == 4               # 2 splits per sample
    assert ((seen_mask > 0) <= (omega.repeat(2, 1, 1, 1) > 0)).all()   # Θ ⊂ Ω
    assert 0 < seen_mask.sum() < omega.sum() * 2 * 0.9                # ... strictly smaller
    assert (seen_k.abs().sum(2)[seen_mask == 0] == 0).all()           # nothing off Θ reaches the model
    assert not torch.equal(seen_mask[:2], seen_mask[2:])              # independent splits
    assert loss.item() == pytest.approx(2.0, rel=1e-5)                # zero prediction: ℓ2 + ℓ1 ratios = 1 + 1
    # the same sample key at the same step gets the same split on any rank / in any batch position
    swapped = {"kspace": k.flip(0), "mask": omega.flip(0), "meta": batch["meta"][::-1]}
    ssdu_step_loss(model, swapped, ObjectiveConfig(splits=2), seed=0, step=3)
    assert torch.equal(model.seen[1][:2].flip(0), seen_mask[:2])


class CalibrationRecorder(torch.nn.Module):
    def forward(self, kspace, mask, meta, calibration=None):
        self.seen = (kspace, mask, calibration)
        return {"kspace": torch.zeros_like(kspace), "image": kspace[:, :, 0]}


def test_sens_from_acquired_passes_omega_for_calibration_and_theta_as_input() -> None:
    """With `sens_from_acquired` the model still sees only Θ as its input, and gets the whole acquired
    set Ω (k-space and mask) for its sensitivity estimate; without it, no calibration is passed."""
    g = torch.Generator().manual_seed(2)
    omega = cartesian_mask()
    k = torch.randn(2, 3, 4, 40, 24, dtype=torch.complex64, generator=g) * omega[:, :, None]
    batch = {"kspace": k, "mask": omega, "meta": [{"__key__": "a"}, {"__key__": "b"}]}
    model = CalibrationRecorder()
    ssdu_step_loss(model, batch, ObjectiveConfig(sens_from_acquired=True), seed=0, step=1)
    seen_k, seen_mask, (cal_k, cal_m) = model.seen
    assert torch.equal(cal_m, omega) and torch.equal(cal_k, k)
    assert seen_mask.sum() < omega.sum() and (seen_k.abs().sum(2)[seen_mask == 0] == 0).all()
    ssdu_step_loss(model, batch, ObjectiveConfig(), seed=0, step=1)
    assert model.seen[2] is None
