"""`manifest.json`: the record of a shard directory, written last and atomically.

A shard directory is valid exactly as far as its manifest says: the loader reads only the shards the
manifest lists (a stray `*.tar` from an interrupted run is ignored), and a rerun of the converter
skips the source files the manifest lists as done. The manifest is written under a temporary name and
`os.replace`d, so a crash leaves either the old manifest or the new one, never half of one.

    {
      "schema_version": 1,                  # shards.sample.SCHEMA_VERSION of every sample
      "input": "/abs/path/of/the/tree",
      "shards": [{"name": "train-000000.tar", "split": "train", "samples": 12,
                  "bytes": 123456, "sha256": "...",
                  "strata": [{"year": 2025, "split": "train", "set": "FullSample", "modality": "Cine",
                              "view": "sax", "center": "Center001", "vendor": "Siemens",
                              "scanner": "Siemens_30T_Vida", "field_T": 3.0, "pattern": null,
                              "R": null, "samples": 9}, ...]}],
      "sources": {"ChallengeData/.../cine_sax.mat": {"samples": 3, "split": "train"}},
      "errors": [{"source": "ChallengeData/.../bad.mat", "problem": "..."}],
      "config": {...}                       # the ConvertConfig that wrote it
    }

Strata. Each shard lists how many of its samples fall in each combination of STRATUM_FIELDS (one
entry per combination present; the counts sum to `samples`). The loader selects shards with them
before it opens any tar (`data.select`), and mixing weights come from them; per-field counts
(`ShardEntry.counts`) are sums over strata. A manifest written before strata existed has none: such
a shard cannot be excluded by a selection (the loader still filters its samples one by one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.outputs import write_atomic

MANIFEST_NAME = "manifest.json"
#: what a shard's per-sample counts are broken down by: every field a selection or a mix may use.
STRATUM_FIELDS = ("year", "split", "set", "modality", "view", "center", "vendor", "scanner", "field_T",
                  "pattern", "R")


class ManifestError(ValueError):
    """An unreadable or incompatible manifest."""


@dataclass
class ShardEntry:
    name: str          # file name relative to the shard directory
    split: str         # "train" | "val" | "test"
    samples: int
    bytes: int
    sha256: str
    strata: list[dict[str, Any]] = field(default_factory=list)   # STRATUM_FIELDS values + "samples"

    def counts(self, name: str) -> dict[str, int]:
        """Samples per value of one stratum field, e.g. counts("modality") -> {"Cine": 9, "LGE": 3}."""
        out: dict[str, int] = {}
        for s in self.strata:
            out[str(s.get(name))] = out.get(str(s.get(name)), 0) + int(s["samples"])
        return out


@dataclass
class Manifest:
    schema_version: int
    input: str = ""
    shards: list[ShardEntry] = field(default_factory=list)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)   # source path -> {"samples", "split"}
    errors: list[dict[str, str]] = field(default_factory=list)          # {"source", "problem"}
    config: dict[str, Any] = field(default_factory=dict)

    def shard_paths(self, directory: str | os.PathLike, split: str | None = None) -> list[Path]:
        """Absolute paths of the listed shards (of one split, or all), in manifest order."""
        return [Path(directory) / s.name for s in self.shards if split is None or s.split == split]

    def samples(self, split: str | None = None) -> int:
        return sum(s.samples for s in self.shards if split is None or s.split == split)

    def write(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/manifest.json` atomically (temporary file, fsync, rename, fsync of the folder)."""
        text = json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)
        return write_atomic(Path(directory) / MANIFEST_NAME, text)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [ShardEntry(**s) for s in raw.get("shards", [])]
            return cls(**raw)
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest (not a converted shard directory?)") from None
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc})") from None

    @classmethod
    def read_if_exists(cls, directory: str | os.PathLike) -> "Manifest | None":
        return cls.read(directory) if (Path(directory) / MANIFEST_NAME).exists() else None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
