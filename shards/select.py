"""Sample selection: which shards, and which samples in them, a job reads.

A selection maps stratum fields (shards.manifest.STRATUM_FIELDS) to the values allowed, e.g.
`{"modality": ["cine"], "center": ["Center001", "Center002"]}`; a sample is selected when every
named field has one of its values (fields not named are free). Values compare case-insensitively as
strings, and as numbers when both sides are numbers ("3" selects field_T 3.0; "none" selects a
missing pattern). The loader uses it twice: on the manifest's strata, to drop whole shards before
splitting them over ranks and workers, and on each sample's meta.json, read before its k-space, to
skip the others of a mixed shard without decoding them.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any, Mapping

import braceexpand

from shards.manifest import MANIFEST_NAME, STRATUM_FIELDS, Manifest, ShardEntry
from shards.sample import SCHEMA_VERSION

log = logging.getLogger("cmrfm.shards.select")

Selection = Mapping[str, list[str]]


def check_selection(select: Selection) -> None:
    """Refuse unknown fields and empty value lists (a typo must not silently select everything)."""
    for name, values in select.items():
        if name not in STRATUM_FIELDS:
            raise ValueError(f"data.select: unknown field {name!r}; known: {', '.join(STRATUM_FIELDS)}")
        if not values:
            raise ValueError(f"data.select: {name} lists no values (leave the field out to allow any)")


def _same(value: Any, wanted: str) -> bool:
    if value is None:
        return str(wanted).lower() in ("none", "null", "")
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value).lower() == str(wanted).lower()


def matches(record: Mapping[str, Any], select: Selection) -> bool:
    """Whether a stratum or a sample's meta is selected."""
    return all(any(_same(record.get(name), w) for w in values) for name, values in select.items())


def selected_samples(entry: ShardEntry, select: Selection) -> int | None:
    """Samples of the shard that the selection keeps; None when the shard records no strata."""
    if not entry.strata:
        return None
    return sum(int(s["samples"]) for s in entry.strata if matches(s, select))


def shard_entries(spec: str, split: str, select: Selection | None = None) -> list[tuple[str, ShardEntry | None]]:
    """(path, manifest entry) of the shards to read: the manifest's list for `split` (a directory),
    or a brace pattern / glob (entries None: no manifest).

    With a selection, a directory's shards whose strata hold no selected sample are left out (a
    pattern has no manifest: every shard stays, and the samples are filtered as they stream)."""
    path = Path(spec)
    if select:
        check_selection(select)
    if not path.is_dir():
        urls = sorted({u for pat in braceexpand.braceexpand(spec) for u in (glob.glob(pat) or [pat])})
        if not urls:
            raise ValueError(f"{spec}: no shards (split {split!r})")
        return [(u, None) for u in urls]
    manifest = Manifest.read(path)
    if manifest.schema_version != SCHEMA_VERSION:
        raise ValueError(f"{path / MANIFEST_NAME}: schema {manifest.schema_version}, reader is {SCHEMA_VERSION}")
    entries = [e for e in manifest.shards if e.split == split]
    if not entries:
        raise ValueError(f"{spec}: no shards (split {split!r})")
    if select:
        if any(not e.strata for e in entries):
            log.warning("%s: manifest has no per-shard strata (converted before they existed): the selection "
                        "cannot skip whole shards, only samples", path / MANIFEST_NAME)
        entries = [e for e in entries if selected_samples(e, select) != 0]
        if not entries:
            raise ValueError(f"{spec}: no {split} shard holds a sample selected by {dict(select)}")
    return [(str(path / e.name), e) for e in entries]
