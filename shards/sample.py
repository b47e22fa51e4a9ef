"""The shard sample schema, shared by the writer (shards.convert) and the reader (shards.loader).

One sample is one slice of one k-space file. In a tar shard it is a group of members that share a
key (webdataset convention: ``<key>.<member>``)::

    <key>.kspace.npy   complex64 (T, C, Y, X)  fully sampled k-space (FullSample trees) or the acquired
                                               undersampled kus (UnderSample trees); Y = phase encode
    <key>.mask.npy     float32   (T, Y, X)     optional: the acquired mask (T = 1 for a 2-D mask)
    <key>.ref.npy      complex64 (T, C, Y, X)  optional: hidden fully sampled reference (evaluation shards)
    <key>.meta.json    dict                    META_KEYS below (+ "info", "task_masks")

Nothing else is ever written, and the reader refuses any other member (no pickle: .npy is read with
allow_pickle=False). The schema version is recorded in the manifest; a reader refuses a different one.

A reader may pass an array member as bytes (decoded at once) or as a `shards.frames.MemberRef` (its
place in the tar): the array is then a `LazyNpy` whose frames are read when indexed, so the loader
reads the 3 frames of its window and not the other 9 of a cine slice. The bytes on disk are the same.

Keys (trap 16 of docs/cmrxrecon.md: centers and P### are reused across splits and tasks) are built
from (year, split, task, set, center, scanner, patient, file stem, slice). A key is tar-safe: no dots
(webdataset splits the member name at the first dot) and no slashes.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shards.frames import LazyNpy, MemberRef

SCHEMA_VERSION = 1

#: member name -> (dtype, rank) of the array it holds; "meta.json" holds a dict.
ARRAY_MEMBERS: dict[str, tuple[np.dtype, int]] = {
    "kspace.npy": (np.dtype(np.complex64), 4),
    "mask.npy": (np.dtype(np.float32), 3),
    "ref.npy": (np.dtype(np.complex64), 4),
}
META_MEMBER = "meta.json"
MEMBERS = (*ARRAY_MEMBERS, META_MEMBER)

#: keys every meta.json carries (docs/design.md §2, "Data conventions").
META_KEYS = (
    "key", "year", "split", "task", "set", "center", "scanner", "vendor", "field_T", "model", "patient",
    "modality", "file", "view", "slice", "nz", "shape", "pattern", "R", "source", "scale",
    "fully_sampled", "has_mask", "has_reference",
)


class SampleError(ValueError):
    """A sample whose members do not match the schema (wrong member, dtype, rank or shape)."""


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(year: int | None, split: str, task: str, set_: str, center: str, scanner: str,
               patient: str, stem: str, slice_: int) -> str:
    """Globally unique, tar-safe key of one slice: no dots, no slashes (dots become '-').

    `stem` is the k-space file's stem (for undersampled files it includes `_kus_<Pattern><R>`, so two
    undersampled versions of one file never collide).
    """
    parts = ["fastmri" if year is None else str(year), split, task, set_, center or "none", scanner or "none",
             patient or "none", stem]
    return "__".join(_UNSAFE.sub("-", p) for p in parts) + f"__s{slice_:03d}"


def member_key(name: str) -> tuple[str, str] | None:
    """(key, member) of a tar member name `<key>.<member>`, or None for a name no converter writes:
    a path (`/`, `..`), an empty key, or a key with characters `sample_key` never produces."""
    key, dot, member = name.partition(".")
    if not dot or not key or "/" in name or "\\" in name or _UNSAFE.search(key):
        return None
    return key, member


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Decode one .npy member without copying (a read-only view of `data`).

    Object (pickled) arrays are refused, exactly as np.load(..., allow_pickle=False) would.
    """
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, fortran, dtype = reader(f)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded when allow_pickle=False")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - f.tell() < count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data) - f.tell()} bytes for {shape} {dtype}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _array(member: bytes | MemberRef) -> np.ndarray | LazyNpy:
    return LazyNpy(member) if isinstance(member, MemberRef) else load_npy(member)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


@dataclass
class Sample:
    """One slice: `kspace` complex64 (T, C, Y, X), optional `mask` float32 (T|1, Y, X), optional `ref`
    complex64 (T, C, Y, X), and `meta` (META_KEYS). A reader's arrays may be `LazyNpy` (read when
    indexed; `np.asarray` reads all of one); a writer's are ndarrays."""

    key: str
    kspace: np.ndarray | LazyNpy
    meta: dict[str, Any]
    mask: np.ndarray | LazyNpy | None = None
    ref: np.ndarray | LazyNpy | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # reader-side only (e.g. __url__); never written

    def validate(self) -> "Sample":
        """Check dtypes, ranks and the shapes against each other; raise SampleError naming the key."""
        arrays = {"kspace.npy": self.kspace, "mask.npy": self.mask, "ref.npy": self.ref}
        for name, arr in arrays.items():
            if arr is None:
                continue
            dtype, rank = ARRAY_MEMBERS[name]
            if arr.dtype != dtype or arr.ndim != rank:
                raise SampleError(f"{self.key}: {name} is {arr.dtype} rank {arr.ndim}, expected {dtype} rank {rank}")
        t, _, y, x = self.kspace.shape
        if self.mask is not None and (self.mask.shape[1:] != (y, x) or self.mask.shape[0] not in (1, t)):
            raise SampleError(f"{self.key}: mask shape {self.mask.shape} does not match k-space {self.kspace.shape}")
        if self.ref is not None and self.ref.shape != self.kspace.shape:
            raise SampleError(f"{self.key}: ref shape {self.ref.shape} != k-space {self.kspace.shape}")
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise SampleError(f"{self.key}: meta.json lacks {missing}")
        return self

    def to_files(self) -> dict[str, bytes]:
        """Member name (without the key) -> bytes, ready for a tar shard."""
        self.validate()
        files = {"kspace.npy": _npy_bytes(self.kspace)}
        if self.mask is not None:
            files["mask.npy"] = _npy_bytes(self.mask)
        if self.ref is not None:
            files["ref.npy"] = _npy_bytes(self.ref)
        files[META_MEMBER] = json.dumps(_jsonable(self.meta), sort_keys=True).encode()
        return files

    @classmethod
    def from_files(cls, key: str, files: dict[str, bytes | MemberRef]) -> "Sample":
        """Decode members explicitly (.npy without pickle, .json); any other member is refused. An
        array member given as a MemberRef becomes a LazyNpy: its header is checked now, its frames
        are read when indexed."""
        unknown = sorted(set(files) - set(MEMBERS))
        if unknown:
            raise SampleError(f"{key}: refused member(s) {unknown}: only {list(MEMBERS)} are decoded")
        if "kspace.npy" not in files or META_MEMBER not in files:
            raise SampleError(f"{key}: incomplete sample, members {sorted(files)}")
        try:
            arrays = {name: _array(files[name]) if name in files else None for name in ARRAY_MEMBERS}
            meta = json.loads(files[META_MEMBER])
        except (ValueError, OSError, EOFError) as exc:  # bad .npy header/pickle refused, bad JSON
            raise SampleError(f"{key}: cannot decode: {exc}") from None
        if not isinstance(meta, dict):
            raise SampleError(f"{key}: meta.json is not an object")
        return cls(key=key, kspace=arrays["kspace.npy"], mask=arrays["mask.npy"], ref=arrays["ref.npy"],
                   meta=meta).validate()
