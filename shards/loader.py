"""The streaming loader: tar shards -> shape-bucketed batches of normalised, undersampled k-space.

    loader = make_loader(LoaderConfig(shards="out/shards", split="train"), rank, world)
    for batch in loader: ...                 # batch dict below
    state = loader.state_dict()              # JSON-able; a checkpoint stores it
    make_loader(cfg, rank, world, state=state)   # or loader.load_state_dict(state): same next batch

The pipeline, per worker (see `_Stream.__iter__`), is a list of stages:

    shard list -> [selection: shards whose manifest strata hold no selected sample dropped] ->
    split by node (rank) -> split by worker -> [training: every epoch a fresh seeded
    permutation, forever] -> tar (seekable reads, webdataset key grouping; with a selection, meta.json
    first and unselected samples passed over unread) -> explicit .npy/.json decoding
    (no pickle; any other member refused; arrays lazy: header only) -> temporal window of `frames`
    adjacent frames (only those frames' bytes are read from the tar: shards.frames) ->
    mask (the acquired one, or drawn on the fly from the official pattern families) ->
    per-sample normalisation (shards.normalise.kspace_scale) -> bucket by shape -> tensors

Batch (every sample of one batch has the same (C, Y, X): BUCKETING, not padding: a sample is never
resized, padded or resampled; a batch waits until `micro_batch` samples of one shape have arrived.
At most `bucket_limit` samples wait; beyond that the oldest bucket leaves as a smaller batch, so
B <= micro_batch):

    kspace      complex64 (B, T, C, Y, X)  undersampled input, divided by `scale`
    mask        float32   (B, T, Y, X)     sampling mask of `kspace`
    target      complex64 (B, T, C, Y, X)  fully sampled, divided by `scale` (zeros where has_target is False)
    has_target  bool      (B,)
    scale       float32   (B,)             the factor divided out (kspace_scale of the undersampled input)
    meta        list[dict]                 meta.json + __key__, __url__, frames (T indices), pattern and R
                                           of the mask actually applied, mask_origin ("acquired"|"retrospective")

Reproducibility. Nothing uses global or per-process random state: the shard order of epoch e is
`default_rng([seed, e]).permutation`, and everything random about one sample (window start, pattern,
R, ktGaussian seed) comes from `default_rng([seed, epoch, shard index, offset in shard])`. So a
(seed, rank, world, workers) quadruple fixes the stream exactly. (webdataset's own `resampled=True`
is not reproducible even with a seed: docs/toolchain.md.)

State. Each logical worker stream is described by its cursor (draw number, sample offset in that
shard), the positions of the samples waiting in its buckets, and its skip count. The loader keeps
the state reported with the last batch it handed out (later, prefetched batches do not count), plus
which worker's batch comes next. Restoring re-reads the waiting samples (same positions -> same
random draws -> same tensors) and starts the DataLoader workers rotated so that the round-robin
continues with the right one: the restored loader yields exactly the batch the original would have.

Bad data: a sample that fails to decode or process, and the unread rest of a truncated tar, is
skipped with a warning naming __url__ and __key__ and counted (`loader.skipped`). Bounded: a training
stream that draws every one of its shards in a row without one usable sample raises ShardError naming
them (tars gone under a valid manifest, every sample refused) instead of looping forever. Shards a
manifest lists that are not on disk are named when the loader is built (all gone: an error).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from challenge.masks import ACCELERATIONS_2025, PATTERNS_2025, make_mask
from shards.mix import MixPlan, MixSource, plan_mix
from shards.normalise import kspace_scale
from shards.frames import HEAD_BYTES, MemberRef
from shards.sample import ARRAY_MEMBERS, META_MEMBER, Sample
from shards.select import MAKE_SHARDS, Selection, ShardError, matches, shard_entries  # noqa: F401 (re-exported)

# Backstop only: this module never calls webdataset's default decoders (which unpickle .pyd/.pkl).
os.environ.setdefault("WDS_SECURE", "1")
log = logging.getLogger("cmrfm.shards.loader")
STATE_VERSION = 1


@dataclass
class LoaderConfig:
    """Where the shards are and how batches are built."""

    shards: str = "out/shards"
    """a converted directory (its manifest lists the shards), or a brace pattern / glob of .tar files"""
    split: str = "train"
    """split of the manifest to read ("train" | "val" | "test"); ignored for a pattern"""
    mode: str = "train"
    """"train": endless, reshuffled each epoch, random windows and masks; "eval": every sample once,
    in order, first `frames` frames, acquired mask and hidden reference when present"""
    micro_batch: int = 2
    frames: int = 3
    """T: adjacent frames per sample (clamped/replicated when the series is shorter)"""
    workers: int = 0
    """DataLoader worker processes (0: read in the calling process)"""
    seed: int = 0
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS_2025))
    accelerations: list[int] = field(default_factory=lambda: list(ACCELERATIONS_2025))
    use_acquired_mask: bool = True
    """undersampled samples always use their acquired mask; this only matters for fully sampled
    samples that carry one (never written by shards.convert today)"""
    bucket_limit: int = 8
    """most samples waiting in shape buckets before the oldest bucket leaves as a smaller batch"""
    prefetch: int = 2
    """batches prefetched per worker"""
    lazy_frames: bool = True
    """read only the `frames` of the window from each .npy member (shards.frames); False reads every
    frame of a sample, as the loader did before (kept for bench/data_path.py's side-by-side P7)"""
    mix: list[MixSource] = field(default_factory=list)
    """corpora to mix ([[data.mix]] tables: shards, select, weight; shards.mix); empty: `shards` alone"""
    mix_by: list[str] = field(default_factory=list)
    """stratum fields whose value combinations are the mixed groups, e.g. ["modality", "center"]"""
    temperature: float = 1.0
    """group shares ~ samples ** (1 / temperature) unless the sources carry weights (1: as stored)"""
    select: dict[str, list[str]] = field(default_factory=dict)
    """only these samples, e.g. {modality = ["cine"], center = ["Center001"]} (shards.select): shards
    without any are dropped (manifest strata) before the split over ranks and workers, and the other
    samples of a mixed shard are skipped from their meta.json, before their k-space is read"""


# --------------------------------------------------------------------------------------------- shards


def resolve_shards(spec: str, split: str, select: Selection | None = None) -> list[str]:
    """Shard paths to read: the manifest's list for `split` (a directory; with a selection, only
    shards that hold selected samples), or a brace pattern / glob (shards.select.shard_entries)."""
    return [url for url, _ in shard_entries(spec, split, select)]


@dataclass(frozen=True)
class ShardPlan:
    """Which shard each (rank, worker) reads at each draw. Shard lists are split by node, then by
    worker: shard i goes to rank i % world, then to worker (i // world) % workers."""

    n_shards: int
    rank: int
    world: int
    workers: int
    seed: int
    endless: bool

    def _mine(self, order: np.ndarray, worker: int) -> np.ndarray:
        node = order[self.rank::self.world]          # split by node
        return node[worker::self.workers]           # split by worker

    def per_epoch(self, worker: int) -> int:
        return len(self._mine(np.arange(self.n_shards), worker))

    def draw(self, worker: int, d: int) -> tuple[int, int] | None:
        """(epoch, shard index) of draw `d` of `worker`, or None when an eval pass is over."""
        n = self.per_epoch(worker)
        if n == 0 or (not self.endless and d >= n):
            return None
        epoch, i = divmod(d, n)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_shards) if self.endless \
            else np.arange(self.n_shards)
        return epoch, int(self._mine(order, worker)[i])


# --------------------------------------------------------------------------------------------- stages


def _raw_samples(url: str, start: int, keep: Callable[[int, dict], bool] | None = None,
                 lazy: bool = True) -> Iterator[tuple[int, str, dict[str, bytes | MemberRef]]]:
    """(offset, key, {member: bytes | MemberRef}) for the samples of one tar from `start` on, grouped
    by key as webdataset does (`<key>.<member>`, key = name up to the first dot). Members of skipped
    samples are not read. A truncated tar raises (tarfile.TarError/OSError/EOFError) after its intact part.

    The array members (kspace/mask/ref.npy) come as a MemberRef: their place in the tar and their
    first bytes (the .npy header), so that `prepare` reads only the frames of its window
    (shards.frames); the other members (meta.json, and anything the decoder will refuse) as bytes.
    `lazy=False` reads every member whole (bytes).

    With `keep(offset, meta)` (selection, mixing), a sample's meta.json is read first and the sample
    is passed over (its k-space never read) unless kept; offsets still count every sample, so
    positions do not depend on the decision. A meta.json that does not parse lets the sample
    through, so that decoding reports it.

    The tar is opened seekable ("r:"): each member is one read() call. webdataset's tar_file_iterator
    streams ("r|*") in 10 KiB reads, which cost 37% of the loader's time on real-sized samples."""

    def read(tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
        data = tf.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError(f"unexpected end of data in {info.name}")
        return data

    def member(tf: tarfile.TarFile, ext: str, info: tarfile.TarInfo, end: int) -> bytes | MemberRef:
        if not lazy or ext not in ARRAY_MEMBERS:
            return read(tf, info)
        if info.offset_data + info.size > end:                 # seekable reads past the end see no error
            raise tarfile.ReadError(f"unexpected end of data in {info.name}")
        return MemberRef(url, info.offset_data, info.size, tf.extractfile(info).read(min(info.size, HEAD_BYTES)))

    def wanted(tf: tarfile.TarFile, off: int, members: dict[str, tarfile.TarInfo]) -> bool:
        if keep is None or META_MEMBER not in members:
            return True
        try:
            meta = json.loads(read(tf, members[META_MEMBER]))
        except ValueError:
            return True
        return not isinstance(meta, dict) or keep(off, meta)

    with tarfile.open(url, mode="r:") as tf:
        end = os.fstat(tf.fileobj.fileno()).st_size
        key, off, members = None, -1, {}
        for info in itertools.chain(tf, [None]):
            if info is not None and not info.isreg():
                continue
            k = None if info is None else info.name.partition(".")[0]
            if k != key:
                if key is not None and off >= start and wanted(tf, off, members):
                    yield off, key, {ext: member(tf, ext, m, end) for ext, m in members.items()}
                key, off, members = k, off + 1, {}
            if info is not None and off >= start:
                members[info.name.partition(".")[2]] = info


class _FixedMasks:
    """Uniform and ktRadial masks depend on no seed, and frame i of them only on i (ktRadial: golden
    angle i * 137.5 deg): keep, per (pattern, R, ny, nx), the longest series drawn so far (ktRadial
    takes ~10 ms a frame at real sizes), so any later window of that shape is a lookup."""

    def __init__(self, size: int = 32) -> None:
        self.size, self.cache = size, OrderedDict()

    def __call__(self, pattern: str, R: int, nt: int, ny: int, nx: int) -> np.ndarray:
        key = (pattern, R, ny, nx)
        have = self.cache.get(key)
        if have is None or have.shape[0] < nt:
            have = make_mask(pattern, R, nt, ny, nx, seed=0).astype(bool)
            self.cache[key] = have
        self.cache.move_to_end(key)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return have


_fixed_masks = _FixedMasks()


def _draw_mask(pattern: str, R: int, frames: np.ndarray, nt: int, ny: int, nx: int, seed: int) -> np.ndarray:
    """The mask of a `nt`-frame series at `frames` -> float32 (T, Y, X)."""
    if pattern == "ktGaussian":
        return make_mask(pattern, R, nt, ny, nx, seed=seed)[frames]
    return _fixed_masks(pattern, R, int(frames.max()) + 1, ny, nx)[frames].astype(np.float32)


def prepare(sample: Sample, rng: np.random.Generator, cfg: LoaderConfig, train: bool) -> dict[str, Any]:
    """One decoded sample -> one example: window, mask, normalisation (numpy; shapes in the module doc)."""
    k = sample.kspace                                             # (T_all, C, Y, X)
    t_all, _, ny, nx = k.shape
    start = int(rng.integers(0, max(t_all - cfg.frames, 0) + 1)) if train else 0
    frames = np.clip(np.arange(start, start + cfg.frames), 0, t_all - 1)   # replicate the last frame
    meta = dict(sample.meta, __key__=sample.key, __url__=sample.extra.get("__url__", ""), frames=frames.tolist(),
                mix_group=sample.extra.get("mix_group"))
    acquired = sample.mask is not None and (not sample.meta.get("fully_sampled") or cfg.use_acquired_mask)
    if acquired:
        m = sample.mask[np.minimum(frames, sample.mask.shape[0] - 1)]          # 2-D masks: T_mask = 1
        meta["mask_origin"] = "acquired"
    else:
        pattern = str(rng.choice(cfg.patterns))
        R = int(rng.choice(cfg.accelerations))
        m = _draw_mask(pattern, R, frames, t_all, ny, nx, int(rng.integers(2**31 - 1)))
        meta.update(pattern=pattern, R=R, mask_origin="retrospective")
    m = np.ascontiguousarray(m, dtype=np.float32)                # (T, Y, X)
    full = k[frames]                                             # (T, C, Y, X)
    if sample.meta.get("fully_sampled"):
        kus, target = full * m[:, None], full
    else:                                                        # acquired kus: already zero off the mask
        kus = np.array(full, dtype=np.complex64)
        target = None if sample.ref is None else sample.ref[frames]
    scale = np.float32(kspace_scale(kus))                       # kus is already zero off the mask
    return {
        "kspace": (kus / scale).astype(np.complex64, copy=False),
        "mask": m,
        "target": np.zeros_like(kus) if target is None else (target / scale).astype(np.complex64, copy=False),
        "has_target": target is not None,
        "scale": scale,
        "meta": meta,
    }


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Examples of one shape -> the batch dict of tensors (module doc)."""
    return {
        "kspace": torch.from_numpy(np.stack([e["kspace"] for e in examples])),
        "mask": torch.from_numpy(np.stack([e["mask"] for e in examples])),
        "target": torch.from_numpy(np.stack([e["target"] for e in examples])),
        "has_target": torch.tensor([e["has_target"] for e in examples], dtype=torch.bool),
        "scale": torch.tensor([e["scale"] for e in examples], dtype=torch.float32),
        "meta": [e["meta"] for e in examples],
    }


class _Stream:
    """One logical worker's reproducible stream of batches, resumable from a state.

    Each stage is a generator over the previous one; the stream position (`self.next`, the pending
    bucket positions, `self.skipped`) is what `state()` reports with every batch."""

    def __init__(self, mix: MixPlan, plan: ShardPlan, cfg: LoaderConfig, worker: int, state: dict) -> None:
        self.mix, self.urls, self.plan, self.cfg, self.worker = mix, mix.urls, plan, cfg, worker
        self.train = cfg.mode == "train"
        self.next = tuple(state["next"])                 # (draw, offset) of the next raw sample
        self.pending = [tuple(p) for p in state["pending"]]
        self.skipped = int(state["skipped"])
        self.done = bool(state["done"])
        self.fruitless: list[str] = []   # shards drawn in a row that gave no usable sample (bounded)

    def state(self, pending: list[tuple[int, int]]) -> dict:
        return {"next": list(self.next), "pending": [list(p) for p in pending], "skipped": self.skipped,
                "done": self.done}

    def __iter__(self) -> Iterator[dict]:
        """Items {"worker", "batch" (dict or None), "state"}; the final item of a finished eval pass
        has batch None and carries the final skip count."""
        return iter(wds.DataPipeline(
            self.shard_list,     # (draw, epoch, shard index): split by node, by worker, [epochs]
            self.tar,            # (position, key, {member: bytes}): raw samples of those tars
            self.decode,         # (position, Sample): explicit .npy (no pickle) / .json, others refused
            self.prepare,        # (position, example): window, mask, normalisation (numpy)
            self.bucket,         # (examples of one (C, Y, X) shape or None, pending positions)
            self.tensors,        # {"worker", "batch": the batch dict of tensors, "state"}
        ))

    # ------------------------------------------------------------------ stages

    def shard_list(self) -> Iterator[tuple[int, int, int]]:
        if self.done:
            return
        d = self.next[0]
        while (drawn := self.plan.draw(self.worker, d)) is not None:
            yield d, *drawn
            d += 1
            if self.train and d % max(self.plan.per_epoch(self.worker), 1) == 0 and self.skipped:
                log.info("worker %d: epoch %d done, %d samples skipped so far", self.worker, drawn[0], self.skipped)

    def _keep(self, epoch: int, shard: int) -> Callable[[int, dict], bool] | None:
        """The per-sample decision of one shard from its meta.json: selected, and (training) kept by
        the mix's rejection sampling; None when every sample is kept."""
        select = self.mix.selects[self.mix.url_source[shard]]
        mixing = self.train and not self.mix.trivial
        if not select and not mixing:
            return None

        def keep(off: int, meta: dict) -> bool:
            if not matches(meta, select):
                return False
            if not mixing or self.mix.accept(shard, meta, [self.cfg.seed, epoch, shard, off]):
                return True
            # a readable, selected sample the mix passed over: this shard is not what the bounded
            # failure check looks for (unreadable or refused), however many such draws come in a row
            self.fruitless.clear()
            return False

        return keep

    def tar(self, shards: Iterator[tuple[int, int, int]]) -> Iterator[tuple[tuple[int, int], str, dict]]:
        for d, epoch, shard in shards:
            url, key = self.urls[shard], "(start of shard)"
            if self.train and len(self.fruitless) >= max(self.plan.per_epoch(self.worker), 1):
                # every shard of this worker tried in a row, nothing usable: an endless loop otherwise
                raise ShardError(f"worker {self.worker}: no usable sample in {len(self.fruitless)} shards in a row "
                                 f"({', '.join(sorted(set(self.fruitless))[:8])}); {self.skipped} samples skipped: "
                                 f"every shard this rank reads is unreadable or refused")
            self.fruitless.append(url)
            start = self.next[1] if d == self.next[0] else 0
            try:
                for off, key, files in _raw_samples(url, start, self._keep(epoch, shard), self.cfg.lazy_frames):
                    self.next = (d, off + 1)
                    yield (d, off), key, files
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                self._skip(url, f"{key} and the rest of the shard", f"unreadable tar ({exc})")
            self.next = (d + 1, 0)

    def decode(self, raws: Iterator) -> Iterator[tuple[tuple[int, int], Sample]]:
        for pos, key, files in raws:
            if (sample := self._decode_one(pos, key, files)) is not None:
                yield pos, sample

    def prepare(self, samples: Iterator) -> Iterator[tuple[tuple[int, int], dict]]:
        for pos, sample in samples:
            if (ex := self._prepare_one(pos, sample)) is not None:
                yield pos, ex

    def bucket(self, examples: Iterator) -> Iterator[tuple[list | None, list]]:
        """Examples wait per (C, Y, X) until `micro_batch` have the same shape (bucketing, never
        padding); beyond `bucket_limit` waiting samples, the oldest bucket leaves as a smaller batch.
        A restored stream first re-reads the samples that were waiting (same positions, same draws)."""
        B, limit = max(1, self.cfg.micro_batch), max(1, self.cfg.bucket_limit)
        buckets: OrderedDict[tuple, list] = OrderedDict()
        order: dict[tuple[int, int], int] = {}                  # position -> consumption order

        def pending() -> list:
            return sorted((p for b in buckets.values() for p, _ in b), key=order.__getitem__)

        count = 0
        for pos, ex in itertools.chain(self._reload_pending(), examples):
            order[pos], count = count, count + 1
            shape = ex["kspace"].shape[1:]
            buckets.setdefault(shape, []).append((pos, ex))
            group = None
            if len(buckets[shape]) >= B:
                group = buckets.pop(shape)
            elif sum(len(b) for b in buckets.values()) > limit:
                group = buckets.pop(next(iter(buckets)))
            if group is not None:                                # (re-inserted waiting samples never do)
                yield group, pending()
                for p, _ in group:
                    del order[p]
        if self.done:
            return
        self.done = True                                         # eval pass over: flush partial batches
        while buckets:
            group = buckets.pop(next(iter(buckets)))
            yield group, pending()
        if self.skipped:
            log.warning("worker %d: pass over, %d samples skipped", self.worker, self.skipped)
        yield None, []

    def tensors(self, groups: Iterator) -> Iterator[dict]:
        for group, pending in groups:
            batch = None if group is None else collate([ex for _, ex in group])
            yield {"worker": self.worker, "batch": batch, "state": self.state(pending)}

    # ------------------------------------------------------------------ one sample

    def _rng(self, epoch: int, shard: int, offset: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, epoch if self.train else 0, shard, offset])

    def _skip(self, url: str, key: str, why: Any) -> None:
        self.skipped += 1
        log.warning("skipping sample __url__=%s __key__=%s: %s (skipped so far: %d)", url, key, why, self.skipped)

    def _decode_one(self, pos: tuple[int, int], key: str, files: dict[str, bytes]) -> Sample | None:
        url = self.urls[self.plan.draw(self.worker, pos[0])[1]]
        try:
            sample = Sample.from_files(key, files)
        except ValueError as exc:                               # SampleError: refused member, bad npy/json
            self._skip(url, key, exc)
            return None
        sample.extra["__url__"] = url
        g = self.mix.group_of(self.mix.url_source[self.plan.draw(self.worker, pos[0])[1]], sample.meta)
        sample.extra["mix_group"] = None if g is None else self.mix.groups[g].name
        return sample

    def _prepare_one(self, pos: tuple[int, int], sample: Sample) -> dict | None:
        epoch, shard = self.plan.draw(self.worker, pos[0])
        try:
            example = prepare(sample, self._rng(epoch, shard, pos[1]), self.cfg, self.train)
            self.fruitless.clear()
            return example
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self._skip(sample.extra["__url__"], sample.key, exc)
            return None

    def _reload_pending(self) -> list[tuple[tuple[int, int], dict]]:
        """Re-read and re-prepare the samples that were waiting in buckets when the state was taken."""
        out: dict[tuple[int, int], dict] = {}
        for d in sorted({p[0] for p in self.pending}):
            want = sorted(p[1] for p in self.pending if p[0] == d)
            for off, key, files in _raw_samples(self.urls[self.plan.draw(self.worker, d)[1]], want[0],
                                               lazy=self.cfg.lazy_frames):
                if off in want and (sample := self._decode_one((d, off), key, files)) is not None:
                    if (ex := self._prepare_one((d, off), sample)) is not None:
                        out[(d, off)] = ex
                if off >= want[-1]:
                    break
        return [(p, out[p]) for p in self.pending if p in out]


def _passthrough(x: Any) -> Any:
    return x


class _Streams(IterableDataset):
    """The logical streams, one per DataLoader worker, rotated so that logical worker `first` runs in
    DataLoader worker 0 (the DataLoader's round-robin always starts at worker 0)."""

    def __init__(self, mix: MixPlan, plan: ShardPlan, cfg: LoaderConfig, states: list[dict], first: int) -> None:
        self.mix, self.plan, self.cfg, self.states, self.first = mix, plan, cfg, states, first

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        w = (physical + self.first) % len(self.states)
        return iter(_Stream(self.mix, self.plan, self.cfg, w, self.states[w]))


# --------------------------------------------------------------------------------------------- loader


class ShardLoader:
    """Iterable of batch dicts for one rank; see the module doc. `skipped` counts bad samples."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world: int = 1) -> None:
        if cfg.mode not in ("train", "eval"):
            raise ValueError(f"LoaderConfig.mode must be 'train' or 'eval', got {cfg.mode!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.mix = plan_mix(cfg.shards, cfg.split, cfg.select, cfg.mix, cfg.mix_by, cfg.temperature)
        self.urls = self.mix.urls
        self.n_streams = max(1, cfg.workers)
        self.plan = ShardPlan(len(self.urls), rank, world, self.n_streams, cfg.seed, endless=cfg.mode == "train")
        if cfg.mode == "train" and len(self.urls) < world * self.n_streams:
            what = f"{cfg.split} shards hold samples selected by {dict(cfg.select)}" if cfg.select else f"{cfg.split} shards"
            raise ValueError(f"{cfg.shards}: {len(self.urls)} {what}, for {world} ranks x {self.n_streams} "
                             f"workers = {world * self.n_streams} streams: every worker needs at least one shard. "
                             f"Use at most {len(self.urls)} ranks x workers (e.g. data.workers="
                             f"{max(len(self.urls) // world, 0)}), or convert with a smaller shard_samples so that "
                             f"the selected data spread over more shards")
        if len(self.urls) < world * self.n_streams:
            log.warning("%d shards for %d ranks x %d workers: some workers have nothing to read",
                        len(self.urls), world, self.n_streams)
        self._reset()

    def _reset(self) -> None:
        self._states = [{"next": [0, 0], "pending": [], "skipped": 0, "done": False} for _ in range(self.n_streams)]
        self._next_worker = 0
        self._mixed: dict[str, int] = {}

    @property
    def mixed(self) -> dict[str, dict[str, float]]:
        """Per mix group: its configured share, and the share and count of the samples handed out so far."""
        total = max(sum(self._mixed.values()), 1)
        return {g.name: {"configured": g.weight, "realised": self._mixed.get(g.name, 0) / total,
                         "samples": self._mixed.get(g.name, 0)} for g in self.mix.groups}

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (as of the last batch handed out / the end of an eval pass)."""
        return sum(s["skipped"] for s in self._states)

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.mode == "eval" and all(s["done"] for s in self._states):
            self._reset()                                       # a finished eval pass: start a new one
        dataset = _Streams(self.mix, self.plan, self.cfg, copy.deepcopy(self._states), self._next_worker)
        if self.cfg.workers == 0:
            items: Any = iter(dataset)
        else:
            items = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers, collate_fn=_passthrough,
                               prefetch_factor=self.cfg.prefetch, multiprocessing_context="fork")
        for it in items:
            self._states[it["worker"]] = it["state"]
            self._next_worker = (it["worker"] + 1) % self.n_streams
            if it["batch"] is not None:
                for meta in it["batch"]["meta"]:
                    name = str(meta.get("mix_group"))
                    self._mixed[name] = self._mixed.get(name, 0) + 1
                yield it["batch"]

    def state_dict(self) -> dict:
        """JSON-able position of this loader (as of the last batch handed out)."""
        return {"version": STATE_VERSION, "mode": self.cfg.mode, "seed": self.cfg.seed, "rank": self.rank,
                "world": self.world, "workers": self.n_streams, "shards": len(self.urls), "select": dict(self.cfg.select),
                "mix": self.mix.signature(), "mixed": dict(self._mixed),
                "next_worker": self._next_worker, "streams": copy.deepcopy(self._states)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same config, rank, world and worker count)."""
        mine = self.state_dict()
        absent = {"select": {}, "mix": [["all", 1.0]]}           # states written before selection and mixing
        for k in ("version", "mode", "seed", "rank", "world", "workers", "shards", "select", "mix"):
            if state.get(k, absent.get(k)) != mine[k]:
                raise ValueError(f"loader state does not fit: {k} is {state.get(k)!r} in the state, {mine[k]!r} here")
        self._states = copy.deepcopy(state["streams"])
        self._mixed = dict(state.get("mixed", {}))
        self._next_worker = int(state["next_worker"])


def make_loader(cfg: LoaderConfig, rank: int = 0, world: int = 1, state: dict | None = None) -> ShardLoader:
    """The loader of one rank; `state` (from `state_dict()`) resumes a previous position exactly."""
    loader = ShardLoader(cfg, rank, world)
    if state is not None:
        loader.load_state_dict(state)
    return loader
