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


#: what to run when the shards a config names are not there (the README's fresh-clone path)
MAKE_SHARDS = ("python -m shards.synthetic --set out=data/synthetic && "
               "python -m shards.convert --set input=data/synthetic --set out=out/shards")


class ShardError(ValueError):
    """Shards that are missing, unreadable or yield no usable sample; the message names them."""


def shard_entries(spec: str, split: str, select: Selection | None = None) -> list[tuple[str, ShardEntry | None]]:
    """(path, manifest entry) of the shards to read: the manifest's list for `split` (a directory),
    or a brace pattern / glob (entries None: no manifest).

    A path that does not exist, a pattern that matches nothing, and a manifest whose shards are all
    gone are errors that say so (and how shards are made); some shards gone is a warning naming them.
    With a selection, a directory's shards whose strata hold no selected sample are left out (a
    pattern has no manifest: every shard stays, and the samples are filtered as they stream)."""
    path = Path(spec)
    if select:
        check_selection(select)
    if not path.is_dir():
        if not any(c in spec for c in "*?[{"):
            raise ShardError(f"{spec}: does not exist. Shards are made by: {MAKE_SHARDS} "
                             f"(or set data.shards to a converted folder)")
        urls = sorted({u for pat in braceexpand.braceexpand(spec) for u in glob.glob(pat)})
        if not urls:
            raise ShardError(f"{spec}: the pattern matches no file")
        return [(u, None) for u in urls]
    manifest = Manifest.read(path)
    if manifest.schema_version != SCHEMA_VERSION:
        raise ValueError(f"{path / MANIFEST_NAME}: schema {manifest.schema_version}, reader is {SCHEMA_VERSION}")
    entries = [e for e in manifest.shards if e.split == split]
    gone = [e for e in entries if not (path / e.name).is_file()]
    if gone and len(gone) == len(entries):
        raise ShardError(f"{path / MANIFEST_NAME} lists {len(entries)} {split} shards and none is on disk "
                         f"(e.g. {path / gone[0].name}); convert again: python -m shards.convert --set out={spec} ...")
    if gone:
        log.warning("%s: %d of %d listed %s shards are missing and will not be read: %s", path / MANIFEST_NAME,
                    len(gone), len(entries), split, ", ".join(str(path / e.name) for e in gone[:5]))
        entries = [e for e in entries if e not in gone]
    if not entries:
        raise ShardError(f"{spec}: no shards (split {split!r})")
    if select:
        if any(not e.strata for e in entries):
            log.warning("%s: manifest has no per-shard strata (converted before they existed): the selection "
                        "cannot skip whole shards, only samples", path / MANIFEST_NAME)
        entries = [e for e in entries if selected_samples(e, select) != 0]
        if not entries:
            raise ValueError(f"{spec}: no {split} shard holds a sample selected by {dict(select)}")
    return [(str(path / e.name), e) for e in entries]
