"""Self-supervised objective: SSDU, learning from undersampled k-space alone.

The acquired samples Ω of each frame are split into two disjoint sets (Yaman et al. 2020):

    Ω = Θ ∪ Λ,   Θ ∩ Λ = ∅,   |Λ| ≈ ρ·|Ω \\ ACS|,   ACS ⊆ Θ

    x̂ = f(P_Θ y, Θ)                          the model sees only the input set Θ
    L  = ‖P_Λ(y − F S x̂)‖₂ / ‖P_Λ y‖₂        the loss is scored only where the model could not see
       + ‖P_Λ(y − F S x̂)‖₁ / ‖P_Λ y‖₁        (SSDU's normalised ℓ2 + ℓ1 k-space loss)

where y is the acquired k-space, P the sampling projection and F S x̂ the model's predicted multi-coil
k-space (`out["kspace"]`). Nothing here needs a fully sampled reference: retrospectively undersampled
training shards and undersampled-only ("UnderSample", validation-style) shards are treated alike,
since both arrive from the loader as `kspace` + its acquired `mask` Ω.

Mask semantics: 1 = sampled. Θ keeps the ACS block (the contiguous run of acquired phase-encode rows
through the k-space centre) because the model estimates coil sensitivities from it; only the rest is
eligible for Λ. Λ is drawn without replacement with uniform or Gaussian (centre-weighted, std =
`gauss_std` × size, as in SSDU's reference code) probabilities, either per k-space point (SSDU) or per
whole phase-encode line ("line": closer to how Cartesian data is acquired). Several splits per sample
(`splits > 1`, multi-mask SSDU, Yaman et al. 2022) repeat each sample with independent splits.

The split of a sample is seeded from (seed, step, sample key), not from a process's RNG, so it is the
same whichever rank sees the sample: resume and 1-vs-N-rank runs draw identical splits.

References:
    B. Yaman et al., "Self-supervised learning of physics-guided reconstruction neural networks
    without fully sampled reference data", Magn. Reson. Med. 84(6), 2020 (SSDU).
    B. Yaman et al., "Ground-truth free multi-mask self-supervised physics-guided deep learning in
    accelerated MRI", Magn. Reson. Med. 87(4), 2022.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ObjectiveConfig:
    """How Ω is split into the input set Θ and the loss set Λ."""

    loss_fraction: float = 0.4
    """ρ: fraction of the acquired non-ACS samples moved to the loss set Λ (SSDU uses 0.4)."""
    selection: str = "gaussian"
    """"uniform" or "gaussian" (centre-weighted) choice of the Λ samples."""
    gauss_std: float = 0.25
    """std of the Gaussian selection weights, as a fraction of the k-space size (SSDU: N/4)."""
    unit: str = "point"
    """"point": Λ is drawn per k-space sample (SSDU); "line": per whole phase-encode row."""
    keep_acs: bool = True
    """Keep the central ACS rows in Θ (the model's sensitivity estimate needs them)."""
    acs_max_rows: int = 8
    """Keep at most this many ACS rows around the centre (0 = the whole ACS). A full 20-24-row ACS would
    take the highest-energy samples out of every loss set, and all of a small matrix; SSDU's reference
    code keeps only a small central block."""
    sens_from_acquired: bool = False
    """Estimate the coil sensitivities from every acquired sample (Omega), not from the input set Theta
    (standard SSDU practice: the maps come from the full calibration data, only data consistency
    sees Theta). Needed with `model.sens_estimate = "espirit"`: Theta keeps at most `acs_max_rows` ACS
    rows, too few for ESPIRiT's 6 x 6 kernels (the bench's SSL arm collapsed by 3 dB without it)."""
    splits: int = 1
    """Independent Θ/Λ splits per sample (multi-mask SSDU); the batch is repeated this many times."""
    l1_weight: float = 1.0
    """Weight of the normalised ℓ1 term next to the normalised ℓ2 term."""


@dataclass
class Split:
    """One Θ/Λ split of a batch. Masks are float32 {0,1}, shape (B, T, Y, X), Θ + Λ = Ω, Θ·Λ = 0."""

    theta: torch.Tensor
    lam: torch.Tensor


def acs_rows(omega: torch.Tensor, max_rows: int = 0) -> torch.Tensor:
    """The ACS block: the contiguous run of acquired phase-encode rows through the centre row Y//2.

    Args:
        omega: (..., Y, X) acquired mask.
        max_rows: keep at most this many rows of it around the centre (0 = all).
    Returns:
        bool (..., Y): True on the ACS rows (all False when the centre row was not acquired).
    """
    acquired = omega.amax(dim=-1) > 0                      # (..., Y): row holds any sample
    ny = acquired.shape[-1]
    c = ny // 2                                            # DC row (fftshift convention)
    # distance from the centre to the first missing row, above and below
    up = acquired[..., c:].long().cumprod(dim=-1)          # 1 while rows c, c+1, ... are acquired
    down = acquired[..., : c + 1].flip(-1).long().cumprod(dim=-1)
    n_up, n_down = up.sum(-1, keepdim=True), down.sum(-1, keepdim=True)   # (..., 1)
    y = torch.arange(ny, device=omega.device)
    block = (y >= c - n_down + 1) & (y < c + n_up) & (n_up > 0)
    if max_rows > 0:
        block &= (y >= c - max_rows // 2) & (y < c - max_rows // 2 + max_rows)
    return block


def _selection_weights(shape: tuple[int, int], cfg: ObjectiveConfig, device: torch.device) -> torch.Tensor:
    """(Y, X) non-negative weights of each location being chosen for Λ."""
    ny, nx = shape
    if cfg.selection == "uniform":
        return torch.ones(ny, nx, device=device)
    if cfg.selection != "gaussian":
        raise ValueError(f"objective.selection must be 'uniform' or 'gaussian', got {cfg.selection!r}")
    gy = torch.exp(-0.5 * ((torch.arange(ny, device=device) - ny // 2) / (cfg.gauss_std * ny)) ** 2)
    gx = torch.exp(-0.5 * ((torch.arange(nx, device=device) - nx // 2) / (cfg.gauss_std * nx)) ** 2)
    return gy[:, None] * gx[None, :]


def sample_seed(seed: int, step: int, key: str, repeat: int = 0) -> int:
    """A 63-bit seed for one sample's split: identical on every rank that sees the sample at that step."""
    return (zlib.crc32(f"{seed}|{step}|{repeat}|{key}".encode()) << 31) ^ (seed * 1_000_003 + step)


def split_mask(omega: torch.Tensor, cfg: ObjectiveConfig, generators: list[torch.Generator]) -> Split:
    """Split each acquired mask Ω into an input set Θ and a loss set Λ (ACS kept in Θ).

    Args:
        omega: (B, T, Y, X) float {0,1}, the acquired sampling mask of the batch.
        cfg: split settings (ρ, selection, unit, ACS).
        generators: one CPU `torch.Generator` per sample (B of them): the split's only randomness.
    Returns:
        Split(theta, lam), both (B, T, Y, X) float32.
    """
    b, t, ny, nx = omega.shape
    if len(generators) != b:
        raise ValueError(f"split_mask: {len(generators)} generators for a batch of {b}")
    acquired = omega > 0
    eligible = acquired & ~acs_rows(omega, cfg.acs_max_rows)[..., None] if cfg.keep_acs else acquired  # (B, T, Y, X)
    weights = _selection_weights((ny, nx), cfg, omega.device)
    if cfg.unit == "line":
        eligible_units = eligible.any(-1)                               # (B, T, Y): candidate rows
        weights = weights.mean(-1)                                      # (Y,)
    elif cfg.unit == "point":
        eligible_units = eligible.flatten(-2)                           # (B, T, Y*X)
        weights = weights.flatten()                                     # (Y*X,)
    else:
        raise ValueError(f"objective.unit must be 'point' or 'line', got {cfg.unit!r}")
    # Weighted sampling without replacement via Gumbel top-k: key = log w + Gumbel noise; the k largest
    # keys are a draw of k items with probabilities ∝ w (Efraimidis-Spirakis), vectorised over frames.
    uniform = torch.stack([torch.rand(eligible_units.shape[1:], generator=g) for g in generators]).to(omega.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
    keys = torch.where(eligible_units, weights.clamp_min(1e-30).log() + gumbel, torch.full_like(gumbel, -torch.inf))
    k = torch.round(cfg.loss_fraction * eligible_units.sum(-1, keepdim=True)).long()   # (B, T, 1)
    order = keys.argsort(dim=-1, descending=True).argsort(dim=-1)        # rank of every unit's key
    chosen = (order < k) & eligible_units
    if cfg.unit == "line":
        lam = chosen[..., None] & eligible                               # whole rows, acquired samples only
    else:
        lam = chosen.view(b, t, ny, nx)
    lam = lam.float()
    return Split(theta=acquired.float() - lam, lam=lam)


def ssdu_loss(pred_kspace: torch.Tensor, kspace: torch.Tensor, lam: torch.Tensor, l1_weight: float = 1.0) -> torch.Tensor:
    """Normalised ℓ2 + ℓ1 k-space error on the loss set Λ only, averaged over samples.

    Args:
        pred_kspace: (B, T, C, Y, X) complex, the model's multi-coil k-space prediction.
        kspace: (B, T, C, Y, X) complex, the acquired k-space y.
        lam: (B, T, Y, X) float {0,1}, the loss set (broadcast over coils).
    Returns:
        scalar float32: mean over the batch of ‖Λ(y−ŷ)‖₂/‖Λy‖₂ + w·‖Λ(y−ŷ)‖₁/‖Λy‖₁.
    """
    m = lam[:, :, None].to(torch.float32)                                # (B, T, 1, Y, X)
    err = ((pred_kspace.to(torch.complex64) - kspace.to(torch.complex64)) * m).flatten(1)   # (B, N)
    ref = (kspace.to(torch.complex64) * m).flatten(1)
    eps = torch.finfo(torch.float32).eps
    # vector_norm: its gradient at 0 is 0 (|z| and sqrt(sum |z|^2) written by hand give nan there),
    # and a sample whose Λ is empty then simply contributes 0
    l2 = torch.linalg.vector_norm(err, 2, dim=1) / torch.linalg.vector_norm(ref, 2, dim=1).clamp_min(eps)
    l1 = torch.linalg.vector_norm(err, 1, dim=1) / torch.linalg.vector_norm(ref, 1, dim=1).clamp_min(eps)
    return (l2 + l1_weight * l1).mean()


def ssdu_step_loss(model: Callable[..., dict], batch: dict, cfg: ObjectiveConfig, seed: int, step: int) -> torch.Tensor:
    """SSDU on one batch: split Ω, run the model on Θ-masked k-space, score Λ.

    Args:
        model: `ReconModel` (or the DeepSpeed engine wrapping it): (kspace, mask, meta) -> dict with "kspace".
        batch: a loader batch (`kspace` (B,T,C,Y,X), `mask` (B,T,Y,X), `meta` list of B dicts with "__key__").
        cfg: the objective section; seed, step: make each sample's split reproducible (see `sample_seed`).
    Returns:
        scalar loss (mean over the B·splits split samples).
    """
    kspace, omega, meta = batch["kspace"], batch["mask"], batch["meta"]
    keys = [str(m.get("__key__", m.get("key", i))) for i, m in enumerate(meta)]
    if cfg.splits > 1:   # multi-mask SSDU: the same sample, several independent splits
        kspace = kspace.repeat(cfg.splits, 1, 1, 1, 1)
        omega = omega.repeat(cfg.splits, 1, 1, 1)
        meta = list(meta) * cfg.splits
    gens = [torch.Generator().manual_seed(sample_seed(seed, step, keys[i % len(keys)], i // len(keys)))
            for i in range(kspace.shape[0])]
    split = split_mask(omega, cfg, gens)
    calibration = {"calibration": (kspace, omega)} if cfg.sens_from_acquired else {}
    out = model(kspace * split.theta[:, :, None].to(kspace.real.dtype), split.theta, meta, **calibration)
    return ssdu_loss(out["kspace"], kspace, split.lam, cfg.l1_weight)
