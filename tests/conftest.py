"""Session fixtures shared by every test file.

    synthetic_root  a tiny multi-vendor CMRxRecon corpus in the real file formats (v7.3 + v5,
                    2025 training + a validation-style TaskR1 tree + 2024 + fastMRI), written once
    shard_dir       that corpus converted to shards once (small shards: several per split, so
                    that 2 ranks x 2 workers all have something to read)
    tiny_backbone   a random tiny ReconModel in pretrain.checkpoint.export_backbone's format

Both are read-only for tests: a test that needs to damage or extend a tree copies it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: shard size used for the session's shard_dir (small: several shards per split).
SHARD_SAMPLES = 4


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shards.synthetic import SyntheticConfig, write_corpus

    out = tmp_path_factory.mktemp("synthetic") / "corpus"
    return Path(write_corpus(SyntheticConfig.tiny(str(out), workers=2)))


@pytest.fixture(scope="session")
def shard_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shards.convert import ConvertConfig, convert

    out = tmp_path_factory.mktemp("shards") / "shards"
    convert(ConvertConfig(input=str(synthetic_root), out=str(out), shard_samples=SHARD_SAMPLES, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (seed 0) tiny backbone folder: backbone.safetensors + model_config.json."""
    import dataclasses
    import json

    import torch
    from safetensors.torch import save_file

    from models.sizes import build_model
    from pretrain.checkpoint import BACKBONE, MODEL_CONFIG

    folder = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    model = build_model("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / BACKBONE))
    (folder / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config)))
    return folder


class TreeBuilder:
    """Writes small hand-made CMRxRecon trees (for layout and bad-input tests) with the corpus writers."""

    TRAIN = "ChallengeData/MultiCoil/{mod}/TrainingSet"
    VAL = "ChallengeData_ValSet/{task}/MultiCoil/{mod}/ValidationSet"

    def __init__(self, root: Path) -> None:
        import numpy as np

        self.root, self.rng = root, np.random.default_rng(0)

    def kspace(self, nt: int = 4, nz: int = 2, nc: int = 3, ny: int = 21, nx: int = 24, scale: float = 1e-3):
        import numpy as np

        shape = (nt, nz, nc, ny, nx)
        return ((self.rng.standard_normal(shape) + 1j * self.rng.standard_normal(shape)) * scale).astype(np.complex64)

    def write(self, rel: str, key: str, arr, v5: bool = False) -> Path:
        from shards.matfile import write_mat5, write_mat73

        path = self.root / rel
        (write_mat5 if v5 else write_mat73)(path, key, arr)
        return path

    def train_file(self, mod: str, center: str, scanner: str, patient: str, file: str, arr, masks=(), v5=False) -> Path:
        from challenge.masks import make_mask

        base = self.TRAIN.format(mod=mod)
        p = self.write(f"{base}/FullSample/{center}/{scanner}/{patient}/{file}.mat", "kspace", arr, v5)
        nt, _, _, ny, nx = arr.shape if arr.ndim == 5 else (1, *arr.shape)
        for pattern, R in masks:
            self.write(f"{base}/Mask_TaskAll/{center}/{scanner}/{patient}/{file}_mask_{pattern}{R}.mat", "mask",
                       make_mask(pattern, R, nt, ny, nx, seed=1))
        return p

    def val_file(self, task: str, mod: str, center: str, scanner: str, patient: str, file: str, arr,
                 pattern: str = "ktGaussian", R: int = 8, reference: bool = True, mask=None) -> Path:
        from challenge.masks import make_mask

        base = self.VAL.format(task=task, mod=mod)
        nt, _, _, ny, nx = arr.shape
        m = make_mask(pattern, R, nt, ny, nx, seed=2) if mask is None else mask
        sub = f"{center}/{scanner}/{patient}"
        p = self.write(f"{base}/UnderSample_{task}/{sub}/{file}_kus_{pattern}{R}.mat", "kus",
                       arr * (m[:, None, None] if m.shape[1:] == arr.shape[-2:] else 1))
        self.write(f"{base}/Mask_{task}/{sub}/{file}_mask_{pattern}{R}.mat", "mask", m)
        if reference:
            self.write(f"{base}/FullSample_{task}/{sub}/{file}.mat", "kspace", arr)
        return p


@pytest.fixture
def tree(tmp_path: Path) -> TreeBuilder:
    return TreeBuilder(tmp_path / "tree")
