"""The image-domain backbone: a ViT over space-time patch tokens, conditioned on metadata tokens.

    complex image (B, T, Y, X)                       T adjacent frames are each other's context
      -> real (B, T, Y, X, 2), normalised per sample  (VarNet's NormUnet idea: unit-scale inputs)
      -> zero-pad Y, X up to a multiple of the patch  (any size, odd included; cropped back below)
      -> einops patchify -> (B, T*h*w, p*p*2) -> linear patch embedding + 3-D sin-cos positions
      -> [conditioning tokens (B, 6, D) ; image tokens (B, T*h*w, D)]
      -> timm `Block`s (pre-norm, F.scaled_dot_product_attention)
      -> LayerNorm -> linear head -> unpatchify -> crop -> residual update of the input image

Attention layout: *joint* space-time attention over all T*h*w tokens, patch 8 for the large sizes.
On a real slice (10 coils x 162 x 448, 3 frames) that is 3 x 21 x 56 = 3,528 image tokens (+6).
Why joint and not windowed/axial/factorised:
  - with SDPA (flash / memory-efficient kernels) attention memory is O(N), not O(N^2); activations
    are about 34 * N * D bytes per block in bf16, i.e. ~0.12 GB per block at D = 1024, ~10 GB for
    the 80 blocks of `1b` without activation checkpointing, ~1 GB with it: far inside 80 GB;
  - the N^2 attention FLOPs (4 N^2 D per block) are ~0.6x the linear layers' (24 N D^2) at
    N = 3.5k, D = 1k, so global attention costs less than 2x a windowed one and needs no shifted
    windows, relative-position tables or padding to window multiples;
  - every token sees every frame and the whole field of view, which aliasing from undersampling
    (spread along the whole phase-encode axis) calls for.
The largest 2025 slice (328 x 518, 3 frames) gives ~8k tokens: ~22 GB of activations at 1b
without checkpointing. Patch 16 would quarter the tokens but a 16x16x2 = 512-value linear head per
token loses fine detail; patch 8 is the compromise. Longer windows (all 12 frames) would need
factorised attention; the loader's 3-frame window does not.

Locality (`conv_channels` > 0): a plain ViT at patch 8 sees each 8 x 8 patch only through one linear
map, so fine edges and the pixel-level noise texture are hard for it. A small convolutional stem (two
3 x 3 convolutions per frame) turns the image into `conv_channels` feature maps before patchify, and a
convolutional head after unpatchify refines the transformer's output at full resolution with the
stem's features added back (a one-level U-Net around the transformer, as hybrid CNN-transformer
reconstruction models do). The transformer still carries the global, space-time context.

dtype: parameters may be bf16 (DeepSpeed on GPU). The real input is cast to the parameter dtype at
entry and the output back to float32 at exit; everything outside the backbone (FFTs, data
consistency) stays float32/complex64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


def token_count(frames: int, ny: int, nx: int, patch: int, cond_tokens: int = 0) -> int:
    """Tokens one sample puts through the transformer: T * ceil(Y/p) * ceil(X/p) + conditioning."""
    return frames * math.ceil(ny / patch) * math.ceil(nx / patch) + cond_tokens


def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding (MAE): positions (N,) float -> (N, dim), dim even."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim // 2))
    angles = positions[:, None].float() * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], 1)


def space_time_positions(t: int, h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """3-D sin-cos position embedding for a (t, h, w) token grid -> float32 (t*h*w, dim).

    The channels are split between frame, row and column (1/4, 3/8, 3/8, each even). Rows and
    columns are counted from the grid centre, so the centre of the field of view (where the heart
    usually is) has the same embedding for every matrix size.
    """
    d_t = 2 * (dim // 8)
    d_y = 2 * ((dim - d_t) // 4)
    d_x = dim - d_t - d_y
    arange = lambda n: torch.arange(n, device=device, dtype=torch.float32)  # noqa: E731
    e_t = _sincos(arange(t), d_t)[:, None, None].expand(t, h, w, d_t)
    e_y = _sincos(arange(h) - (h - 1) / 2, d_y)[None, :, None].expand(t, h, w, d_y)
    e_x = _sincos(arange(w) - (w - 1) / 2, d_x)[None, None, :].expand(t, h, w, d_x)
    return torch.cat([e_t, e_y, e_x], -1).reshape(t * h * w, dim)


class Backbone(nn.Module):
    """Residual image refinement: (B, T, Y, X) complex + conditioning tokens -> (B, T, Y, X) complex64.

    Args:
        dim: token width D.
        depth: number of timm `Block`s.
        heads: attention heads (dim must divide by it).
        mlp_ratio: MLP hidden width / dim.
        patch: square patch size p in pixels.
        checkpointing: recompute each block in the backward pass (torch.utils.checkpoint,
            use_reentrant=False): activations of one block instead of all of them.
        conv_channels: width of the convolutional stem and head (0: plain linear patch embedding and
            head, as a ViT).
        gain: initial scale of the residual update (0: ReZero, the untrained backbone is the identity).
        gated: scale each sample's update by a gate read from the conditioning tokens (1 at init).
        device, dtype: passed to every parameter (meta-device builds, deepspeed.zero.Init).
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, patch: int = 8,
                 checkpointing: bool = False, conv_channels: int = 0, gain: float = 0.1, gated: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % heads or dim % 2:
            raise ValueError(f"backbone dim {dim} must be even and divisible by heads {heads}")
        self.dim, self.patch, self.checkpointing = dim, patch, checkpointing
        c = conv_channels or 2  # values per pixel that patchify sees
        self.stem = nn.Sequential(nn.Conv2d(2, c, 3, padding=1, **dd), nn.GELU(),
                                  nn.Conv2d(c, c, 3, padding=1, **dd)) if conv_channels else None
        self.conv_head = nn.Sequential(nn.GELU(), nn.Conv2d(c, c, 3, padding=1, **dd), nn.GELU(),
                                       nn.Conv2d(c, 2, 3, padding=1, **dd)) if conv_channels else None
        self.channels = c
        self.patch_embed = nn.Linear(patch * patch * c, dim, **dd)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, **dd) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, **dd)
        self.head = nn.Linear(dim, patch * patch * c, **dd)
        # the update starts small (or at zero), so an untrained cascade is close to "starting image + data
        # consistency"; a parameter of this module (not a child's) so the value survives deepspeed.zero.Init
        self.gain = nn.Parameter(torch.full((1,), float(gain), **dd))
        # `gated`: a per-sample scale of the update read from the conditioning tokens after the blocks
        # (DiT's adaLN-Zero gate): 2 sigmoid(w . pooled + b), exactly 1 at init (w = b = 0). The
        # convolutional head adds the stem's features back whatever the transformer says, so without a
        # gate the same local correction is applied to a nearly clean ktRadial R8 image as to an R24 one.
        self.gate_weight = nn.Parameter(torch.zeros(dim, **dd)) if gated else None
        self.gate_bias = nn.Parameter(torch.zeros(1, **dd)) if gated else None

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """image complex (B, T, Y, X), cond (B, K, D) -> refined image complex64 (B, T, Y, X)."""
        b, t, ny, nx = image.shape
        p = self.patch
        x = torch.view_as_real(image.to(torch.complex64))  # (B, T, Y, X, 2) float32
        mean = x.mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1, 2)
        std = x.flatten(1).std(1).clamp_min(1e-12)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        x = (x - mean) / std

        h, w = math.ceil(ny / p), math.ceil(nx / p)
        dtype = self.patch_embed.weight.dtype
        feats = rearrange(x, "b t y x c -> b t c y x")  # (B, T, 2, Y, X)
        if self.stem is not None:  # per-frame convolutions: (B, T, C', Y, X)
            feats = self.stem(feats.flatten(0, 1).to(dtype)).unflatten(0, (b, t))
        padded = F.pad(feats, (0, w * p - nx, 0, h * p - ny))  # (B, T, C', h*p, w*p)
        tokens = rearrange(padded, "b t c (h p1) (w p2) -> b (t h w) (p1 p2 c)", p1=p, p2=p)
        tokens = self.patch_embed(tokens.to(dtype))  # (B, T*h*w, D)
        tokens = tokens + space_time_positions(t, h, w, self.dim, tokens.device).to(dtype)
        k = cond.shape[1]
        tokens = torch.cat([cond.to(dtype), tokens], 1)  # (B, K + T*h*w, D)

        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)

        normed = self.norm(tokens)
        delta = self.head(normed[:, k:])  # (B, T*h*w, p*p*C')
        delta = rearrange(delta, "b (t h w) (p1 p2 c) -> b t c (h p1) (w p2)", t=t, h=h, w=w, p1=p, p2=p)
        delta = delta[..., :ny, :nx]  # crop the padding: (B, T, C', Y, X)
        if self.conv_head is not None:  # full-resolution refinement with the stem's features added back
            delta = self.conv_head((delta + feats).flatten(0, 1)).unflatten(0, (b, t))
        delta = rearrange(delta.float(), "b t c y x -> b t y x c") * self.gain.float()
        if self.gate_weight is not None:
            pooled = (normed[:, :k] if k else normed).mean(1).float()  # (B, D)
            gate = 2 * torch.sigmoid(pooled @ self.gate_weight.float() + self.gate_bias.float())  # (B,)
            delta = delta * gate[:, None, None, None, None]
        x = (x + delta) * std + mean  # undo the normalisation
        return torch.view_as_complex(x.contiguous())
