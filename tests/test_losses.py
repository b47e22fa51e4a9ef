"""models/losses.py: SSIM equals scikit-image's; L1 and k-space NMSE by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from models.losses import l1, nmse_kspace, ssim


def _pair(shape: tuple[int, int], data_range: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random(shape) * data_range
    b = np.clip(a + rng.normal(0, 0.2 * data_range, shape), 0, None)
    return a, b


@pytest.mark.parametrize("data_range", [1.0, 255.0, 4.2e-3, 1e4])
@pytest.mark.parametrize("shape", [(40, 53), (7, 7), (64, 31)])
def test_ssim_matches_skimage(data_range: float, shape: tuple[int, int]) -> None:
    a, b = _pair(shape, data_range, seed=int(data_range * 10) % 97 + shape[1])
    want = structural_similarity(a, b, data_range=data_range, win_size=7, use_sample_covariance=True,
                                 gaussian_weights=False, K1=0.01, K2=0.03)
    got = ssim(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), data_range)
    assert got.ndim == 0
    assert abs(got.item() - want) < 1e-4


def test_ssim_is_batched_with_per_image_data_ranges() -> None:
    ranges = [1.0, 30.0, 0.5]
    pairs = [_pair((20, 24), r, seed=i) for i, r in enumerate(ranges)]
    x = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)
    y = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)
    got = ssim(x, y, torch.tensor(ranges))
    want = [structural_similarity(a, b, data_range=r) for (a, b), r in zip(pairs, ranges)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    x.requires_grad_(True)
    (1 - ssim(x, y, torch.tensor(ranges)).mean()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ssim_of_identical_images_is_one() -> None:
    x = torch.rand(2, 12, 12)
    torch.testing.assert_close(ssim(x, x, 1.0), torch.ones(2))


def test_l1_complex_and_real() -> None:
    a = torch.tensor([1 + 1j, 0j], dtype=torch.complex64)
    b = torch.tensor([1 - 2j, 4 + 0j], dtype=torch.complex64)
    torch.testing.assert_close(l1(a, b), torch.tensor(3.5))
    torch.testing.assert_close(l1(torch.tensor([1.0, -2.0]), torch.zeros(2)), torch.tensor(1.5))


def test_nmse_kspace_counts_only_masked_locations_per_sample() -> None:
    target = torch.ones(2, 1, 2, 1, 4, dtype=torch.complex64)
    pred = target.clone()
    mask = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]], [[[1.0, 0.0, 0.0, 0.0]]]])  # (B=2, T=1, Y=1, X=4)
    pred[..., 3] = 100  # off the mask in both samples: ignored
    assert nmse_kspace(pred, target, mask) == 0
    pred[0, ..., 0] = 2  # sample 0: error 1 on 1 of 2 locations per coil -> 2 / 4
    pred[1, ..., 0] = 1 + 3j  # sample 1: |3j|^2 = 9 on its only location -> 18 / 2
    torch.testing.assert_close(nmse_kspace(pred, target, mask), torch.tensor((0.5 + 9.0) / 2))


def _image_loss_by_hand(pred: np.ndarray, ref: np.ndarray, w_ssim: float, w_l1: float) -> float:
    """One sample (T, Y, X): w_ssim (1 - mean SSIM over frames, each frame's range its max) + w_l1 L1."""
    s = np.mean([structural_similarity(p, r, data_range=r.max()) for p, r in zip(pred, ref)])
    return w_ssim * (1 - s) + w_l1 * np.abs(pred - ref).mean()


@pytest.mark.parametrize("log", [False, True])
def test_image_loss_per_sample_and_log(log: bool) -> None:
    """finetune.train.image_loss: the plain loss is the mean of per-sample losses; with `log` it is the
    mean of their logarithms (not the log of the mean), so a sample with a 10x smaller error still
    counts. Expected values from scikit-image's SSIM and numpy."""
    from finetune.settings import FinetuneLoss
    from finetune.train import image_loss

    rng = np.random.default_rng(3)
    ref = rng.random((2, 3, 20, 24)) + 0.5
    noise = rng.normal(0, 1, ref.shape) * np.array([0.3, 0.003])[:, None, None, None]  # hard and easy sample
    pred = np.abs(ref + noise)
    per = [_image_loss_by_hand(p, r, 0.7, 1.3) for p, r in zip(pred, ref)]
    assert per[0] > 20 * per[1]
    want = np.mean(np.log(per)) if log else np.mean(per)
    got, terms = image_loss(torch.tensor(pred, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32),
                            FinetuneLoss(ssim=0.7, l1=1.3, log=log))
    assert abs(got.item() - want) < 1e-4 * max(1.0, abs(want))
    # one sample (T, Y, X), as the benchmark's VarNet arm passes it
    one, _ = image_loss(torch.tensor(pred[1], dtype=torch.float32), torch.tensor(ref[1], dtype=torch.float32),
                        FinetuneLoss(ssim=0.7, l1=1.3, log=log))
    assert abs(one.item() - (np.log(per[1]) if log else per[1])) < 1e-4 * max(1.0, abs(np.log(per[1])))


@pytest.mark.parametrize("ny, nx", [(41, 90), (48, 97), (246, 512)])
def test_ranking_window_is_the_challenge_crop(ny: int, nx: int) -> None:
    """finetune.train.ranking_window selects exactly the pixels challenge.ranking.crop_selected keeps."""
    from challenge.ranking import crop_selected
    from finetune.train import ranking_window

    index = np.arange(ny * nx, dtype=np.float64).reshape(ny, nx) + 1  # > 0: abs() leaves it unchanged
    rows, cols = ranking_window(ny, nx)
    want = np.sort(crop_selected(index[None, None]).ravel())
    np.testing.assert_array_equal(np.sort(index[rows, cols].ravel()), want)


class _Fixed(torch.nn.Module):
    """A 'model' that returns a fixed k-space, whatever its input."""

    def __init__(self, kspace: torch.Tensor) -> None:
        super().__init__()
        self.kspace = kspace

    def forward(self, kspace, mask, meta):
        return {"kspace": self.kspace}


def test_ranking_region_loss_reads_only_the_scored_pixels() -> None:
    """An error outside the ranking crop costs nothing with loss.region = "ranking" and something with
    "full"; an error inside costs in both."""
    from finetune.settings import FinetuneLoss
    from finetune.train import ranking_window, supervised_loss

    rng = np.random.default_rng(0)
    t, c, ny, nx = 2, 3, 40, 60
    img = rng.random((1, t, c, ny, nx)) + 1.0
    fft = lambda x: np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))  # noqa: E731
    rows, cols = ranking_window(ny, nx)
    outside, inside = img.copy(), img.copy()
    outside[..., :rows.start, :] *= 1.5  # rows above the crop only
    inside[..., rows, cols] *= 1.5
    batch = {"kspace": None, "mask": None, "meta": [{}], "target": torch.tensor(fft(img), dtype=torch.complex64)}
    loss = lambda pred, region: supervised_loss(_Fixed(torch.tensor(fft(pred), dtype=torch.complex64)), batch,  # noqa: E731
                                                FinetuneLoss(region=region))[0].item()
    assert loss(outside, "ranking") < 1e-5 < 1e-2 < loss(outside, "full")
    assert loss(inside, "ranking") > 1e-2 and loss(inside, "full") > 1e-2
    with pytest.raises(ValueError, match="region"):
        FinetuneLoss(region="heart")
