"""shards.loader: the batch contract; eval passes that split disjointly over 2 ranks x 2 workers and
cover the split; exact resume from a state; reproducibility; refused pickle members and truncated
shards are skipped and counted while the rest streams."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.loader import LoaderConfig, make_loader
from shards.manifest import Manifest
from shards.normalise import kspace_scale


def shard_keys(shard_dir: Path, split: str) -> list[str]:
    keys = []
    for p in Manifest.read(shard_dir).shard_paths(shard_dir, split):
        with tarfile.open(p) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf})
    return keys


def batch_keys(batch: dict) -> list[str]:
    return [m["__key__"] for m in batch["meta"]]


def same_batch(a: dict, b: dict) -> bool:
    return batch_keys(a) == batch_keys(b) and all(torch.equal(a[k], b[k]) for k in ("kspace", "mask", "target", "scale"))


def test_batch_contract(shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), split="train", mode="eval", micro_batch=3, frames=3)
    seen = 0
    for batch in make_loader(cfg):
        k, m, t = batch["kspace"], batch["mask"], batch["target"]
        B, T, C, Y, X = k.shape
        assert 1 <= B <= 3 and T == 3 and k.dtype == torch.complex64 and t.dtype == torch.complex64
        assert m.shape == (B, T, Y, X) and m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
        assert batch["has_target"].tolist() == [True] * B                     # fully sampled training data
        kn, mn, tn = k.numpy(), m.numpy()[:, :, None], t.numpy()
        assert not (kn * (1 - mn)).any()                                      # zero off the mask
        assert np.allclose(kn, tn * mn, rtol=1e-5, atol=1e-7)                 # input = masked target
        for i, meta in enumerate(batch["meta"]):
            assert meta["__url__"].endswith(".tar") and meta["frames"] == sorted(meta["frames"])
            assert meta["mask_origin"] == "retrospective" and meta["pattern"] in cfg.patterns and meta["R"] in cfg.accelerations
            assert batch["scale"][i] > 0
            # normalised: the scale of what the model sees is 1
            assert kspace_scale(k[i].numpy(), m[i].numpy()) == pytest.approx(1.0, rel=1e-3)
        seen += B
    assert seen == len(shard_keys(shard_dir, "train"))


def test_eval_on_validation_shards_uses_acquired_mask_and_reference(shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), split="val", mode="eval", micro_batch=2)
    batches = list(make_loader(cfg))
    assert batches
    for batch in batches:
        for i, meta in enumerate(batch["meta"]):
            assert meta["mask_origin"] == "acquired" and meta["set"] == "UnderSample"
            assert batch["has_target"][i].item() == meta["has_reference"]
            if not meta["has_reference"]:
                assert not batch["target"][i].any()
    assert any(b["has_target"].any() for b in batches)


def test_two_ranks_two_workers_see_disjoint_samples_that_cover_an_epoch(shard_dir: Path) -> None:
    all_keys = shard_keys(shard_dir, "train")
    per_rank = []
    for rank in range(2):
        cfg = LoaderConfig(shards=str(shard_dir), split="train", mode="eval", workers=2, micro_batch=2)
        per_rank.append([k for b in make_loader(cfg, rank=rank, world=2) for k in batch_keys(b)])
    assert all(per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys)          # each sample exactly once


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_state_yields_the_same_next_batch(shard_dir: Path, workers: int) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), split="train", workers=workers, micro_batch=3, bucket_limit=4, seed=7)
    loader = make_loader(cfg)
    states, batches = [], []
    for batch in loader:
        batches.append(batch)
        states.append(json.loads(json.dumps(loader.state_dict())))        # what a checkpoint stores
        if len(batches) == 10:
            break
    with_pending = [i for i, s in enumerate(states[:-1]) if any(st["pending"] for st in s["streams"])]
    assert with_pending, "no state with samples waiting in buckets: the test would not exercise them"
    for i in sorted({with_pending[0], len(states) // 2, 0}):
        restored = make_loader(cfg, state=states[i])
        nxt = next(iter(restored))
        assert same_batch(nxt, batches[i + 1]), (i, batch_keys(nxt), batch_keys(batches[i + 1]))
    with pytest.raises(ValueError, match="world"):
        make_loader(cfg, rank=0, world=2, state=states[0])


def test_reproducible_for_a_seed(shard_dir: Path) -> None:
    def first(seed: int) -> list[dict]:
        it = iter(make_loader(LoaderConfig(shards=str(shard_dir), split="train", micro_batch=2, seed=seed)))
        return [next(it) for _ in range(4)]

    a, b, c = first(1), first(1), first(2)
    assert all(same_batch(x, y) for x, y in zip(a, b))
    assert not all(same_batch(x, y) for x, y in zip(a, c))


def _copy_tar(src: Path, dst: Path, extra: dict[str, bytes] | None = None, limit: int | None = None) -> list[str]:
    """Copy the samples of `src` into `dst` (first `limit`), adding `extra` members to the first one."""
    keys: list[str] = []
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            key = m.name.split(".", 1)[0]
            if key not in keys:
                if limit is not None and len(keys) == limit:
                    break
                if keys == [] and extra:
                    for name, data in extra.items():
                        info = tarfile.TarInfo(f"{key}.{name}")
                        info.size = len(data)
                        tout.addfile(info, io.BytesIO(data))
                keys.append(key)
            tout.addfile(m, tin.extractfile(m))
    return keys


def test_pickle_members_are_refused_and_counted(shard_dir: Path, tmp_path: Path, caplog) -> None:
    src = Manifest.read(shard_dir).shard_paths(shard_dir, "train")
    k1 = _copy_tar(src[0], tmp_path / "a-000.tar", extra={"pyd": b"\x80\x04K\x01."}, limit=2)
    k2 = _copy_tar(src[1], tmp_path / "a-001.tar", extra={"pkl": b"\x80\x04K\x02."}, limit=2)
    cfg = LoaderConfig(shards=str(tmp_path / "a-{000..001}.tar"), mode="eval", micro_batch=1)
    loader = make_loader(cfg)
    with caplog.at_level(logging.WARNING, logger="cmrfm.shards.loader"):
        got = [k for b in loader for k in batch_keys(b)]
    assert sorted(got) == sorted([k1[1], k2[1]])
    assert loader.skipped == 2
    assert f"__key__={k1[0]}" in caplog.text and "refused member(s) ['pyd']" in caplog.text
    assert "a-001.tar" in caplog.text and "['pkl']" in caplog.text


def test_truncated_shard_is_skipped_counted_and_the_rest_streams(shard_dir: Path, tmp_path: Path, caplog) -> None:
    src = Manifest.read(shard_dir).shard_paths(shard_dir, "train")
    for p in src:
        shutil.copy(p, tmp_path / p.name)
    victim = tmp_path / src[1].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    all_keys = shard_keys(shard_dir, "train")
    with tarfile.open(src[1]) as tf:
        victim_keys = {m.name.split(".", 1)[0] for m in tf}
    loader = make_loader(LoaderConfig(shards=str(tmp_path / "train-*.tar"), mode="eval", micro_batch=2))
    with caplog.at_level(logging.WARNING, logger="cmrfm.shards.loader"):
        got = [k for b in loader for k in batch_keys(b)]
    assert loader.skipped >= 1
    assert set(all_keys) - victim_keys <= set(got)                  # every other shard streamed fully
    assert len(got) == len(set(got)) and len(set(got) & victim_keys) < len(victim_keys)
    assert victim.name in caplog.text and "unreadable tar" in caplog.text


# ---- issue 11 items 6, 7: no hang on unreadable shards, a missing path says so ---------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_no_readable_shard_stops_with_an_error_naming_the_shards(shard_dir: Path, tmp_path: Path, workers: int) -> None:
    """Training mode is endless: with every shard unreadable it used to log skips forever. Now a
    stream that draws all its shards in a row without one usable sample raises, naming them."""
    from shards.loader import ShardError

    for i in range(2):
        (tmp_path / f"bad-{i:03d}.tar").write_bytes(b"\0" * 700 + b"not a tar")
    cfg = LoaderConfig(shards=str(tmp_path / "bad-*.tar"), mode="train", micro_batch=1, workers=workers)
    with pytest.raises(ShardError, match=r"no usable sample in \d+ shards in a row") as info:
        next(iter(make_loader(cfg)))
    assert "bad-000.tar" in str(info.value) or "bad-001.tar" in str(info.value)


@pytest.mark.timeout(120)
def test_every_sample_refused_stops_too(shard_dir: Path, tmp_path: Path) -> None:
    from shards.loader import ShardError

    src = Manifest.read(shard_dir).shard_paths(shard_dir, "train")[0]
    with tarfile.open(src) as tin, tarfile.open(tmp_path / "p-000.tar", "w") as tout:
        for m in tin:                                               # every sample carries a pickle member
            tout.addfile(m, tin.extractfile(m))
            if m.name.endswith(".meta.json"):
                info = tarfile.TarInfo(m.name.replace(".meta.json", ".pyd"))
                info.size = 3
                tout.addfile(info, io.BytesIO(b"\x80\x04."))
    with pytest.raises(ShardError, match="p-000.tar"):
        next(iter(make_loader(LoaderConfig(shards=str(tmp_path / "p-*.tar"), mode="train", micro_batch=1))))


def test_shards_gone_under_a_valid_manifest_and_a_missing_path_are_named(shard_dir: Path, tmp_path: Path) -> None:
    from shards.loader import ShardError

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    for p in copy.glob("train-*.tar"):
        p.unlink()
    with pytest.raises(ShardError, match="none is on disk"):
        make_loader(LoaderConfig(shards=str(copy), split="train"))
    with pytest.raises(ShardError, match=r"nope: does not exist\. Shards are made by: python -m shards.synthetic"):
        make_loader(LoaderConfig(shards=str(tmp_path / "nope")), 0, 2)
    with pytest.raises(ShardError, match="matches no file"):
        make_loader(LoaderConfig(shards=str(tmp_path / "x-*.tar")))
