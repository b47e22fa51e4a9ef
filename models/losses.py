"""Losses and similarity measures shared by pretraining and fine-tuning.

- `ssim`: scikit-image's `structural_similarity` in torch, differentiable and batched, with the
  settings the CMRxRecon scorer uses: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance
  (N / (N - 1) with N = 49), the given data_range, mean over the valid region. skimage filters the
  whole image with reflect padding and then crops (win_size - 1) // 2 = 3 px from every border;
  a window that never leaves the image (`avg_pool2d`, no padding) gives exactly that region.
- `l1`: mean absolute difference (complex inputs: modulus of the complex difference).
- `nmse_kspace`: ||M (pred - target)||^2 / ||M target||^2 per sample, mean over the batch; the
  self-supervised loss on the held-out k-space set (M = Lambda) and a k-space fidelity metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WIN_SIZE = 7
K1, K2 = 0.01, 0.03


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor) -> torch.Tensor:
    """SSIM of real images x, y (..., H, W) -> (...) one value per image (0-d for one 2-D image).

    data_range: a float, or a tensor broadcastable to the leading shape (...), e.g. per-image ranges.
    H and W must be at least 7. Computed in at least float32.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[-1] < WIN_SIZE or x.shape[-2] < WIN_SIZE:
        raise ValueError(f"ssim: images must be at least {WIN_SIZE}x{WIN_SIZE}, got {tuple(x.shape[-2:])}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = x.to(dtype).reshape(-1, 1, h, w)  # (N, 1, H, W)
    y = y.to(dtype).reshape(-1, 1, h, w)

    def mean(z: torch.Tensor) -> torch.Tensor:  # local means over the valid 7x7 windows
        return F.avg_pool2d(z, WIN_SIZE, stride=1)  # (N, 1, H-6, W-6)

    cov_norm = WIN_SIZE**2 / (WIN_SIZE**2 - 1)  # sample covariance, skimage use_sample_covariance=True
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)

    r = torch.as_tensor(data_range, dtype=dtype, device=x.device)
    r = r.expand(lead).reshape(-1, 1, 1, 1) if r.ndim else r
    c1, c2 = (K1 * r) ** 2, (K2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3)).reshape(lead)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over all elements (complex: modulus of the difference) -> 0-d tensor."""
    return (pred - target).abs().mean()


def nmse_kspace(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Normalised k-space error on the locations in `mask`, per sample, averaged over the batch.

    pred, target: complex (B, T, C, Y, X); mask: (B, T, Y, X) (broadcast over coils) or the same
    shape as pred. Returns a 0-d tensor: mean_b ||M (pred_b - target_b)||^2 / ||M target_b||^2.
    """
    if mask.ndim == pred.ndim - 1:
        mask = mask.unsqueeze(2)  # (B, T, 1, Y, X)
    err = ((pred - target) * mask).abs().pow(2).flatten(1).sum(1)  # (B,)
    ref = (target * mask).abs().pow(2).flatten(1).sum(1)
    return (err / ref.clamp_min(eps)).mean()
