"""The reconstruction model, pure PyTorch (torch, timm, einops; no shards, DeepSpeed or torch.distributed).

    fft.py           centred orthonormal FFTs (the one FFT convention)
    coils.py         RSS, SENSE expand/reduce, ACS search, learned coil sensitivities
    consistency.py   soft / hard data consistency
    conditioning.py  metadata -> conditioning tokens (unknown values -> a learned "unknown")
    backbone.py      ViT over space-time patch tokens (timm Blocks)
    recon.py         ReconModel: sensitivities -> zero-filled -> cascades -> image, k-space
    sizes.py         ModelConfig, SIZES, build_model
    losses.py        ssim (skimage-exact), l1, nmse_kspace
    adapters.py      LoRA adapters in PEFT's file format

Import from the submodules directly, e.g. `from models.sizes import build_model`.
"""
