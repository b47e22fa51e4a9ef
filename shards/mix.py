"""Mixing corpora, and groups within them, with configured weights.

Pretraining reads several converted corpora (CMRxRecon 2023, 2024, 2025, fastMRI multi-coil), each
a `MixSource` (a shard directory, an optional selection, an optional weight). `mix_by` splits every
source into groups, one per combination of those stratum fields present in its manifest (e.g.
modality x center). Each group g gets a target share w_g:

    raw_g = n_g ** (1 / temperature)          n_g: its samples, from the manifest strata
    w_g   = raw_g / sum raw                   no source weights given (temperature 1: as stored;
                                              large temperature: every group alike)
    w_g   = weight_s * raw_g / sum_{h in s} raw_h, normalised     when every source has a weight

The streams read the shards of all sources as one list (split over ranks and workers as usual)
and keep each sample with probability

    accept_g = (w_g / f_g) / max_h (w_h / f_h)      f_g = n_g / N, the share in the stream

(rejection sampling): the kept samples of group g are then a share w_g of the kept stream. The
decision is taken from meta.json, before the k-space is read, with a generator seeded by the
sample's position (seed, epoch, shard, offset), so it repeats exactly after a resume. Evaluation
streams keep everything. The loader counts the groups of the samples it hands out
(`ShardLoader.mixed`) so the realised mix can be logged next to the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shards.select import Selection, matches, shard_entries

#: a fixed extra word in the acceptance generator's seed: independent of the sample's own draws.
_ACCEPT_STREAM = 7919


@dataclass
class MixSource:
    """One corpus of a mix: `[[data.mix]]` tables."""

    shards: str = ""
    """a converted shard directory (its manifest's strata give the group sizes)"""
    select: dict[str, list[str]] = field(default_factory=dict)
    """selection inside this corpus (added to data.select; this one wins on a shared field)"""
    weight: float = 0.0
    """its share of the mix; 0 on every source: shares follow the group sizes and data.temperature"""


@dataclass(frozen=True)
class MixGroup:
    name: str                   # "<source>/<field>=<value>,..." or "<source>"
    source: int
    samples: int                # n_g
    weight: float               # w_g: target share of the kept stream (all groups sum to 1)
    accept: float               # probability a sample of this group is kept


@dataclass
class MixPlan:
    """The shards to read (all sources) and, per group, its share and acceptance probability."""

    urls: list[str]
    url_source: list[int]
    selects: list[dict[str, list[str]]]
    by: tuple[str, ...]
    groups: list[MixGroup]
    index: dict[tuple[int, tuple[str, ...]], int]

    @property
    def trivial(self) -> bool:
        """One group kept whole: nothing to decide per sample."""
        return all(g.accept >= 1.0 for g in self.groups)

    def group_of(self, source: int, meta: dict[str, Any]) -> int | None:
        return self.index.get((source, tuple(str(meta.get(f)) for f in self.by)))

    def accept(self, url_index: int, meta: dict[str, Any], key: list[int]) -> bool:
        """Keep this sample? `key` (seed, epoch, shard, offset) seeds the decision."""
        g = self.group_of(self.url_source[url_index], meta)
        if g is None or self.groups[g].accept >= 1.0:
            return True
        return np.random.default_rng([*key, _ACCEPT_STREAM]).random() < self.groups[g].accept

    def signature(self) -> list[list[Any]]:
        """What a resumed loader must agree on (group names and shares)."""
        return [[g.name, round(g.weight, 12)] for g in self.groups]


def plan_mix(shards: str, split: str, select: Selection, sources: list[MixSource], by: list[str],
             temperature: float) -> MixPlan:
    """The MixPlan of a loader config: `sources` (or, when empty, the single corpus `shards`)."""
    if temperature <= 0:
        raise ValueError(f"data.temperature must be > 0, got {temperature}")
    sources = sources or [MixSource(shards=shards)]
    weighted = [s.weight > 0 for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("data.mix: give every source a weight > 0, or none (shares then follow the data)")
    by_t = tuple(by)
    urls, url_source, selects, groups_raw = [], [], [], []
    for i, src in enumerate(sources):
        sel = {**dict(select), **src.select}
        entries = shard_entries(src.shards, split, sel)
        counts: dict[tuple[str, ...], int] = {}
        for _, entry in entries:
            if entry is None or not entry.strata:
                if by_t or len(sources) > 1:
                    raise ValueError(f"{src.shards}: mixing needs the per-shard strata of a converted directory's "
                                     f"manifest (reconvert it, or give a directory rather than a pattern)")
                counts[()] = counts.get((), 0) + (entry.samples if entry is not None else 1)
                continue
            for s in entry.strata:
                if matches(s, sel):
                    k = tuple(str(s.get(f)) for f in by_t)
                    counts[k] = counts.get(k, 0) + int(s["samples"])
        urls += [u for u, _ in entries]
        url_source += [i] * len(entries)
        selects.append(sel)
        label = src.shards.rstrip("/").rsplit("/", 1)[-1] if len(sources) > 1 else ""
        for k, n in sorted(counts.items()):
            if n > 0:
                name = ",".join(f"{f}={v}" for f, v in zip(by_t, k))
                groups_raw.append((i, k, "/".join(p for p in (label, name) if p) or "all", n))
    if len(set(urls)) != len(urls):
        raise ValueError("data.mix: two sources list the same shard; give each corpus once (use select to split one)")
    raw = np.array([n ** (1.0 / temperature) for *_, n in groups_raw], dtype=np.float64)
    if all(weighted):
        src_of = np.array([i for i, *_ in groups_raw])
        w = np.array([sources[i].weight for i in src_of]) * raw / np.array([raw[src_of == i].sum() for i in src_of])
    else:
        w = raw
    w = w / w.sum()
    n = np.array([n for *_, n in groups_raw], dtype=np.float64)
    ratio = w / (n / n.sum())
    accept = ratio / ratio.max()
    groups = [MixGroup(name, i, int(c), float(wg), float(a))
              for (i, _, name, c), wg, a in zip(groups_raw, w, accept)]
    index = {(i, k): j for j, (i, k, _, _) in enumerate(groups_raw)}
    return MixPlan(urls, url_source, selects, by_t, groups, index)
