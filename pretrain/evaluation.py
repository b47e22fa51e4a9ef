"""Periodic held-out evaluation: does pretraining reconstruct better than zero-filling?

For every held-out sample with a fully sampled reference (`has_target`):

    reference  = RSS(F^H target)                    (T, Y, X) magnitude, coil-combined
    recon      = RSS(F^H model(kspace, mask, meta)["kspace"])   the data-consistent output k-space,
                                                    combined exactly as the reference and the
                                                    challenge (sum of squares), as finetune does
    zero-filled = RSS(F^H kspace)
    PSNR = 10 log10(max(reference)^2 / MSE),  SSIM = models.losses.ssim per frame, data_range = max(reference)

averaged over samples (and SSIM over frames). The model sees the loader's acquired k-space and mask
as they are, with no Θ/Λ split: this is the reconstruction task itself. Samples without a reference
(undersampled-only trees) are counted but not scored.

Under ZeRO-3 a forward pass is collective, so every rank evaluates the same batches (an eval-mode
loader built for rank 0 of 1) and only rank 0 reports.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from models.coils import rss
from models.fft import ifft2c
from models.losses import ssim


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of magnitude volumes x vs ref (B, ...) with data_range = max(ref) per sample -> (B,)."""
    mse = (x - ref).pow(2).flatten(1).mean(1)
    peak = ref.flatten(1).amax(1)
    return 10 * torch.log10(peak.pow(2) / mse.clamp_min(1e-20))


def image_scores(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(PSNR, SSIM), each (B,), of magnitude images x vs ref, both (B, T, Y, X)."""
    peak = ref.flatten(1).amax(1)                                  # (B,)
    s = ssim(x, ref, data_range=peak[:, None].expand(x.shape[:2])).mean(1)   # (B, T) -> (B,)
    return psnr(x, ref), s


@torch.no_grad()
def evaluate(model: Any, batches: Iterable[dict], device: str | torch.device, max_batches: int) -> dict[str, float]:
    """Mean PSNR/SSIM of the model and of zero-filling over up to `max_batches` held-out batches.

    Args:
        model: the DeepSpeed engine or a ReconModel: (kspace, mask, meta) -> dict with "image".
        batches: loader batches (`kspace`, `mask`, `target`, `has_target`, `meta`; shapes as in docs/design.md §2).
    Returns:
        {"psnr", "ssim", "psnr_zf", "ssim_zf", "scored"}; nan scores when no sample had a reference.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    scored = 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        kspace, mask = batch["kspace"].to(device), batch["mask"].to(device)
        image = rss(ifft2c(model(kspace, mask, batch["meta"])["kspace"].cpu()))   # (B, T, Y, X)
        keep = batch["has_target"].bool()
        if not keep.any():
            continue
        reference = rss(ifft2c(batch["target"][keep]))             # (b, T, Y, X)
        zero_filled = rss(ifft2c(batch["kspace"][keep]))
        p, s = image_scores(image[keep], reference)
        pz, sz = image_scores(zero_filled, reference)
        sums += torch.stack([p.sum(), s.sum(), pz.sum(), sz.sum()]).double()
        scored += int(keep.sum())
    if was_training:
        model.train()
    mean = (sums / scored).tolist() if scored else [float("nan")] * 4
    return {"psnr": mean[0], "ssim": mean[1], "psnr_zf": mean[2], "ssim_zf": mean[3], "scored": float(scored)}
