"""Read a frame window of a .npy tar member without reading the rest of it.

A sample's k-space is stored as one C-ordered .npy member of shape (T, C, Y, X) (shards.sample), so
frame t is one contiguous run of bytes: `data_offset + t * frame_bytes`, `frame_bytes` long. The
loader uses a window of `frames` adjacent frames (3 of a 12-frame cine, 3 of a 50-frame perfusion),
so it reads the .npy header and then only that run: no shard format change, old shards stay readable.

    ref = MemberRef(path, offset, size, head)      # where the member's bytes are in the tar
    arr = LazyNpy(ref)                             # header parsed (dtype, shape); no data read yet
    arr.shape, arr.dtype, arr.ndim                 # from the header
    arr[np.array([4, 5, 6])]                       # reads frames 4..6 only -> ndarray (3, C, Y, X)
    np.asarray(arr)                                # the whole array (one read)

No pickle: an object dtype in the header is refused, as np.load(..., allow_pickle=False) does.
A Fortran-ordered array (never written by shards.convert) is read whole and then indexed.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: bytes read with the tar member's header: numpy pads .npy headers to a multiple of 64, 128 in practice
HEAD_BYTES = 4096


@dataclass(frozen=True)
class MemberRef:
    """Where one tar member's data are: the tar's path, the byte offset of the data in it, its size,
    and its first min(size, HEAD_BYTES) bytes (read while the tar was open)."""

    path: str
    offset: int
    size: int
    head: bytes


def _header(ref: MemberRef) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data start within the member) from the .npy header."""
    head = ref.head
    if len(head) >= 12 and head[:6] == b"\x93NUMPY":
        major = head[6]
        need = 10 + struct.unpack("<H", head[8:10])[0] if major == 1 else 12 + struct.unpack("<I", head[8:12])[0]
        if need > len(head):                                     # a header longer than HEAD_BYTES (never ours)
            head = _read(ref, 0, min(need, ref.size))
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)                        # ValueError on a non-.npy member
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        raise ValueError(f".npy version {version} is not read lazily")
    shape, fortran, dtype = reader(f)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded when allow_pickle=False")
    return tuple(int(s) for s in shape), bool(fortran), dtype, f.tell()


def _read(ref: MemberRef, start: int, length: int) -> bytes:
    """`length` bytes of the member from `start` (one seek + one read of the tar file)."""
    with open(ref.path, "rb", buffering=0) as fh:
        fh.seek(ref.offset + start)
        data = fh.read(length)
    if len(data) != length:
        raise ValueError(f"{ref.path}: truncated .npy member at byte {ref.offset + start}: "
                         f"{len(data)} of {length} bytes")
    return data


class LazyNpy:
    """A read-only array-like over one .npy tar member: shape/dtype/ndim from the header, data read
    only for the leading-axis indices asked for (`arr[index]`, index an int, slice or 1-D int array).

    `bytes_read` counts the data bytes read so far (the header excluded), so a caller or a test can
    check what a window cost."""

    def __init__(self, ref: MemberRef) -> None:
        self.ref = ref
        self.shape, self.fortran, self.dtype, self._data = _header(ref)
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if ref.size - self._data < self.nbytes:
            raise ValueError(f"truncated .npy: {ref.size - self._data} bytes for {self.shape} {self.dtype}")
        self.bytes_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyNpy({self.ref.path}@{self.ref.offset}, shape={self.shape}, dtype={self.dtype})"

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 of the leading axis (C order: one contiguous byte run)."""
        row = self.nbytes // max(self.shape[0], 1) if self.shape else self.nbytes
        data = _read(self.ref, self._data + lo * row, (hi - lo) * row)
        self.bytes_read += len(data)
        return np.frombuffer(data, dtype=self.dtype).reshape((hi - lo, *self.shape[1:]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.fortran or not self.shape:
            data = _read(self.ref, self._data, self.nbytes)
            self.bytes_read += len(data)
            arr = np.frombuffer(data, dtype=self.dtype).reshape(self.shape, order="F" if self.fortran else "C")
        else:
            arr = self._rows(0, self.shape[0])
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        if self.fortran or not self.shape:
            return np.asarray(self)[index]
        n = self.shape[0]
        if isinstance(index, slice):
            idx = np.arange(n)[index]
        else:
            idx = np.asarray(index)
            if idx.dtype.kind not in "iu" or idx.ndim > 1:
                return np.asarray(self)[index]                   # not a frame selection: read it all
        flat = np.atleast_1d(idx).astype(np.int64)
        if flat.size == 0:
            return np.empty((0, *self.shape[1:]), self.dtype)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.min() < 0 or flat.max() >= n:
            raise IndexError(f"index {index} out of range for a leading axis of {n}")
        lo, hi = int(flat.min()), int(flat.max()) + 1
        rows = self._rows(lo, hi)[flat - lo]                     # a window: lo..hi is what is used
        return rows[0] if idx.ndim == 0 else rows
