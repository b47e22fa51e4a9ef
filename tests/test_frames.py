"""The loader reads only the frames it uses: a 3-frame window of a 12-frame cine slice costs about a
quarter of the slice's k-space bytes, not all of them (shards.frames). Expected values come from
numpy: the windows equal the same frames of np.load of the whole member, and the bytes the process
read (the kernel's /proc/self/io rchar, independent of how the loader reads) stay far under the
k-space bytes that decoding every frame would read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.frames import HEAD_BYTES, LazyNpy, MemberRef
from shards.loader import LoaderConfig, make_loader
from shards.manifest import Manifest
from shards.sample import Sample, SampleError


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def refs_of(path: Path) -> dict[str, MemberRef]:
    with tarfile.open(path) as tf:
        return {m.name: MemberRef(str(path), m.offset_data, m.size, tf.extractfile(m).read(min(m.size, HEAD_BYTES)))
                for m in tf}


def npy(arr: np.ndarray, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(arr) if fortran else arr, allow_pickle=False)
    return buf.getvalue()


def test_lazy_windows_equal_numpy_and_read_only_their_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((12, 3, 5, 7)) + 1j * rng.standard_normal((12, 3, 5, 7))).astype(np.complex64)
    m = (rng.random((12, 5, 7)) > 0.5).astype(np.float32)
    write_tar(tmp_path / "a.tar", {"pad.txt": b"x" * 1000, "k.npy": npy(k), "m.npy": npy(m), "f.npy": npy(k, fortran=True)})
    refs = refs_of(tmp_path / "a.tar")
    lazy = LazyNpy(refs["k.npy"])
    assert (lazy.shape, lazy.dtype, lazy.ndim, lazy.bytes_read) == (k.shape, k.dtype, 4, 0)
    frame = k[0].nbytes
    for frames in ([4, 5, 6], [9, 10, 11], [10, 11, 11], [0]):        # clamped windows repeat the last frame
        before = lazy.bytes_read
        assert np.array_equal(lazy[np.array(frames)], k[frames])
        assert lazy.bytes_read - before == (max(frames) - min(frames) + 1) * frame
    assert np.array_equal(lazy[3], k[3]) and np.array_equal(lazy[2:5], k[2:5]) and np.array_equal(lazy[-1], k[-1])
    assert np.array_equal(np.asarray(lazy), k)
    mask = LazyNpy(refs["m.npy"])
    assert np.array_equal(mask[np.minimum(np.array([10, 11, 12]), 11)], m[[10, 11, 11]])
    fortran = LazyNpy(refs["f.npy"])                                    # never written by convert: read whole
    assert np.array_equal(fortran[np.array([1, 2])], k[[1, 2]])
    with pytest.raises(IndexError):
        lazy[np.array([12])]


def test_lazy_members_refuse_pickles_and_name_truncation(tmp_path: Path) -> None:
    write_tar(tmp_path / "b.tar", {"k.npy": npy(np.zeros((4, 2, 3, 3), np.complex64))})
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write_tar(tmp_path / "c.tar", {"o.npy": obj.getvalue()})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        LazyNpy(refs_of(tmp_path / "c.tar")["o.npy"])
    ref = refs_of(tmp_path / "b.tar")["k.npy"]
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: ref.offset + 200])          # the file ends inside frame 1
    lazy = LazyNpy(ref)                                                 # the header is intact
    with pytest.raises(ValueError, match="truncated .npy member"):
        lazy[np.array([2, 3])]
    # a Sample built from references validates shapes against each other as from bytes
    with pytest.raises(SampleError, match="meta.json lacks"):
        Sample.from_files("s", {"kspace.npy": ref, "meta.json": json.dumps({"key": "s"}).encode()})


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def test_a_pass_reads_the_window_not_every_frame(shard_dir: Path) -> None:
    """One eval pass over the 12-frame cine samples with a 3-frame window: the process reads well
    under half the k-space bytes of those samples (reading every frame reads all of them, 1.0x), and
    every window is bit-equal to the first 3 frames of the whole member divided by its scale."""
    full: dict[str, np.ndarray] = {}
    for p in Manifest.read(shard_dir).shard_paths(shard_dir, "train"):
        with tarfile.open(p) as tf:
            metas = {m.name.split(".")[0]: json.load(tf.extractfile(m)) for m in tf if m.name.endswith("meta.json")}
            for m in tf:
                key = m.name.split(".")[0]
                if m.name.endswith("kspace.npy") and metas[key]["modality"] == "Cine":
                    full[key] = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
    assert full and all(k.shape[0] == 12 for k in full.values())
    kspace_bytes = sum(k.nbytes for k in full.values())
    cfg = LoaderConfig(shards=str(shard_dir), split="train", mode="eval", workers=0, micro_batch=1, frames=3,
                       select={"modality": ["Cine"]})
    list(make_loader(cfg))                                              # imports and caches warm
    before = _rchar()
    batches = list(make_loader(cfg))
    read = _rchar() - before
    assert sorted(b["meta"][0]["__key__"] for b in batches) == sorted(full)
    assert read < 0.5 * kspace_bytes, f"read {read} bytes for {kspace_bytes} bytes of k-space ({read / kspace_bytes:.2f}x)"
    for b in batches:
        k, scale = full[b["meta"][0]["__key__"]], b["scale"][0].numpy()
        assert np.array_equal(b["target"][0].numpy(), (k[:3] / scale).astype(np.complex64))


def test_eval_windows_of_undersampled_samples_read_mask_and_reference_lazily(shard_dir: Path) -> None:
    """Validation shards carry the acquired kus, its mask and the hidden reference: all three come
    from the same frames as np.load of the whole members."""
    whole: dict[str, dict[str, np.ndarray]] = {}
    for p in Manifest.read(shard_dir).shard_paths(shard_dir, "val"):
        with tarfile.open(p) as tf:
            for m in tf:
                key, _, member = m.name.partition(".")
                if member.endswith(".npy"):
                    whole.setdefault(key, {})[member] = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
    cfg = LoaderConfig(shards=str(shard_dir), split="val", mode="eval", workers=0, micro_batch=1, frames=3)
    n = 0
    for b in make_loader(cfg):
        arrays, scale = whole[b["meta"][0]["__key__"]], b["scale"][0].numpy()
        frames = b["meta"][0]["frames"]
        assert np.array_equal(b["kspace"][0].numpy(), (arrays["kspace.npy"][frames] / scale).astype(np.complex64))
        mask = arrays["mask.npy"]
        assert np.array_equal(b["mask"][0].numpy(), mask[np.minimum(frames, mask.shape[0] - 1)])
        if "ref.npy" in arrays:
            assert np.array_equal(b["target"][0].numpy(), (arrays["ref.npy"][frames] / scale).astype(np.complex64))
            n += 1
    assert n > 0


def test_window_reads_give_the_stream_that_whole_reads_give(shard_dir: Path) -> None:
    """Training mode (random windows, retrospective masks): the first batches are identical with
    `lazy_frames` on and off, so exact resume and every seeded stream are unchanged."""
    def first(lazy: bool, n: int = 6) -> list[dict]:
        it = iter(make_loader(LoaderConfig(shards=str(shard_dir), split="train", workers=0, micro_batch=2,
                                           frames=3, lazy_frames=lazy)))
        return [next(it) for _ in range(n)]

    for a, b in zip(first(True), first(False)):
        assert [m["__key__"] for m in a["meta"]] == [m["__key__"] for m in b["meta"]]
        assert [m["frames"] for m in a["meta"]] == [m["frames"] for m in b["meta"]]
        for name in ("kspace", "mask", "target", "scale"):
            assert a[name].shape == b[name].shape and bool((a[name] == b[name]).all()), name
