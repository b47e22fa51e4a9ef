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

from typing import Any, Mapping

from shards.manifest import STRATUM_FIELDS, ShardEntry

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
