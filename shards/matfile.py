"""Read and write CMRxRecon `.mat` files (MATLAB v7.3 and v5) and fastMRI multi-coil `.h5` files.

One internal convention for every year and container (docs/cmrxrecon.md §4, traps 1-4, 15):

    k-space  complex64 (nt, nz, nc, ny, nx)   ny = phase encode (undersampled), nx = readout
    mask     float32   (nt, ny, nx)           values {0, 1}

* MATLAB v7.3 is HDF5 behind a 512-byte text header; plain h5py already gives h5py order, which is
  the reverse of MATLAB order `(nx, ny, nc, nz, nt)`. Complex data is a compound `('real', 'imag')`.
* MATLAB v5 (about one 2025 file in ten) is read with `scipy.io.loadmat`, which returns MATLAB order:
  the axes are reversed here.
* 4-D files (T1w, T2w, BlackBlood: no time axis) are left-padded to nt = 1, 2-D masks to nt = 1.
* fastMRI stores `kspace` as native complex64 `(slices, coils, readout, phase)` (the fastMRI mask
  functions undersample the last axis): it is returned as `(1, slices, coils, phase, readout)`.

Each dataset is read in ONE call: the real v7.3 files are gzip-chunked with chunks that span all
leading axes, so slice-wise reads decompress nearly the whole file every time (trap 15).
Writers emulate MATLAB closely enough that a benchmark of the read path is honest, and always write
under a temporary name that is `os.replace`d into place.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

__all__ = [
    "MatFileError",
    "KSPACE_KEY_PATTERN",
    "MASK_KEY_PATTERN",
    "mat_format",
    "read_variable",
    "read_kspace",
    "read_mask",
    "read_fastmri",
    "fastmri_attrs",
    "is_fastmri",
    "write_mat73",
    "write_mat5",
    "write_fastmri",
    "matlab_header",
]

# Variable names a k-space / mask file may hold (2025: kspace, kus, mask; 2024: kspace_full;
# 2023: kspace_full + kspace_subNN in one file, maskNN; single-coil 2023: kspace_single_*).
KSPACE_KEY_PATTERN = re.compile(r"^(kspace|kus|kspace_full|kspace_sub\d+|kspace_single_full|kspace_single_sub\d+)$")
MASK_KEY_PATTERN = re.compile(r"^mask\d*$")

_MATLAB_TEXT_BYTES = 116  # header text; then 8 bytes subsystem offset, 2 bytes version, 2 bytes endian
_USERBLOCK = 512
_CHUNK_TARGET_BYTES = 1 << 16  # MATLAB-like: a chunk of ~64 KiB spanning all leading axes


class MatFileError(ValueError):
    """A k-space or mask file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keeps the exception picklable across multiprocessing (no pickle *files*)
        return (type(self), (str(self.path), self.problem))


# --------------------------------------------------------------------------------------------- format


def mat_format(path: str | os.PathLike) -> str:
    """Return "v7.3" (HDF5 with a MATLAB header), "v5" (MATLAB 5.0 binary) or "hdf5" (plain HDF5).

    Raises MatFileError for a missing, empty, truncated or unrecognised file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(128)
    except FileNotFoundError:
        raise MatFileError(path, "file not found") from None
    except OSError as exc:
        raise MatFileError(path, f"cannot be opened ({exc})") from None
    if len(head) == 0:
        raise MatFileError(path, "empty file (0 bytes)")
    if head.startswith(b"MATLAB 7.3"):
        if len(head) < 128 or not h5py.is_hdf5(str(path)):
            raise MatFileError(path, "truncated or corrupt MATLAB v7.3 file (header present, no readable HDF5 body)")
        return "v7.3"
    if head.startswith(b"MATLAB 5.0"):
        if len(head) < 128:
            raise MatFileError(path, "truncated MATLAB v5 file (shorter than its 128-byte header)")
        return "v5"
    if h5py.is_hdf5(str(path)):
        return "hdf5"
    if head.startswith(b"\x89HDF"):
        raise MatFileError(path, "truncated or corrupt HDF5 file")
    raise MatFileError(path, "not a MAT file (no 'MATLAB 5.0'/'MATLAB 7.3' header and not HDF5)")


# --------------------------------------------------------------------------------------------- reading


def _choose_key(path: Path, keys: list[str], key: str | None, expected: re.Pattern | None) -> str:
    if key is not None:
        if key not in keys:
            raise MatFileError(path, f"no variable {key!r} (variables: {keys})")
        return key
    if not keys:
        raise MatFileError(path, "no variable in the file")
    if len(keys) > 1:
        raise MatFileError(path, f"{len(keys)} variables {keys}; expected one (pass key= to choose)")
    if expected is not None and not expected.match(keys[0]):
        raise MatFileError(path, f"unexpected variable {keys[0]!r} (expected a name matching {expected.pattern})")
    return keys[0]


def _h5_to_numpy(path: Path, ds: Any) -> np.ndarray:
    """Read a whole HDF5 dataset in one call; compound real/imag becomes complex."""
    try:
        raw = ds[()]
    except (OSError, RuntimeError) as exc:
        raise MatFileError(path, f"dataset {ds.name!r} cannot be read, truncated or corrupt ({exc})") from None
    names = raw.dtype.names
    if names is not None:
        if set(names) != {"real", "imag"}:
            raise MatFileError(path, f"dataset {ds.name!r} has compound fields {names}, expected ('real', 'imag')")
        out = np.empty(raw.shape, dtype=np.complex64)
        out.real = raw["real"]
        out.imag = raw["imag"]
        return out
    return np.asarray(raw)


def _read_hdf5_variable(path: Path, key: str | None, expected: re.Pattern | None) -> tuple[str, np.ndarray]:
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise MatFileError(path, f"truncated or corrupt HDF5 file ({exc})") from None
    with fh:
        # '#refs#' / '#subsystem#' hold MATLAB cell/object internals, not user variables.
        keys = [k for k in fh.keys() if not k.startswith("#")]
        name = _choose_key(path, keys, key, expected)
        obj = fh[name]
        if not isinstance(obj, h5py.Dataset):
            raise MatFileError(path, f"variable {name!r} is a struct/cell, not a numeric array")
        return name, _h5_to_numpy(path, obj)


def _read_v5_variable(path: Path, key: str | None, expected: re.Pattern | None) -> tuple[str, np.ndarray]:
    try:
        data = scipy.io.loadmat(str(path), squeeze_me=False, chars_as_strings=True)
    except Exception as exc:  # scipy raises ValueError/TypeError/MatReadError/... on damaged files
        raise MatFileError(path, f"truncated or corrupt MATLAB v5 file ({type(exc).__name__}: {exc})") from None
    keys = [k for k in data if not k.startswith("__")]
    name = _choose_key(path, keys, key, expected)
    arr = data[name]
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biufc":
        raise MatFileError(path, f"variable {name!r} is not a numeric array")
    # MATLAB order (nx, ny, nc, nz, nt) -> h5py order (nt, nz, nc, ny, nx)
    return name, np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1]))


def read_variable(path: str | os.PathLike, key: str | None = None,
                  expected: re.Pattern | None = None) -> tuple[str, np.ndarray]:
    """Read one variable of a MAT file (v7.3 or v5) or plain HDF5 file, in h5py axis order.

    key: the variable to read; None means "the only variable" (several or none is an error).
    expected: if given and key is None, the single variable name must match it.
    Returns (name, array); complex data stays complex (complex64 for v7.3 compound data).
    """
    path = Path(path)
    fmt = mat_format(path)
    if fmt == "v5":
        return _read_v5_variable(path, key, expected)
    return _read_hdf5_variable(path, key, expected)


def _check_numeric(path: Path, name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind not in "biufc":
        raise MatFileError(path, f"variable {name!r} has non-numeric dtype {arr.dtype}")
    if arr.size == 0:
        raise MatFileError(path, f"variable {name!r} is empty, shape {arr.shape}")


def read_kspace(path: str | os.PathLike, key: str | None = None, check_finite: bool = True) -> np.ndarray:
    """Read CMRxRecon k-space (2023/2024/2025, v7.3 or v5) or fastMRI k-space.

    Returns complex64 (nt, nz, nc, ny, nx); 4-D data gets nt = 1. fastMRI files (plain HDF5 with a
    native complex `kspace`) are delegated to `read_fastmri`.
    Raises MatFileError (naming the file) for a damaged file, several/no/unexpected variables, a rank
    other than 4 or 5, or (check_finite) NaN/Inf values.
    """
    path = Path(path)
    if mat_format(path) == "hdf5" and is_fastmri(path):
        return read_fastmri(path, check_finite=check_finite)
    name, arr = read_variable(path, key, KSPACE_KEY_PATTERN)
    _check_numeric(path, name, arr)
    if arr.ndim == 4:
        arr = arr[None]
    elif arr.ndim != 5:
        raise MatFileError(path, f"variable {name!r} has rank {arr.ndim}, shape {arr.shape}; "
                                 "expected 5-D (nt, nz, nc, ny, nx) or 4-D (nz, nc, ny, nx)")
    arr = np.ascontiguousarray(arr, dtype=np.complex64)
    if check_finite:
        _check_finite(path, name, arr)
    return arr


def _check_finite(path: Path, name: str, arr: np.ndarray) -> None:
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise MatFileError(path, f"variable {name!r} holds {bad} non-finite values (NaN/Inf)")


def read_mask(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Read a sampling mask: float32 (nt, ny, nx) with values {0, 1}; 2-D masks get nt = 1."""
    path = Path(path)
    name, arr = read_variable(path, key, MASK_KEY_PATTERN)
    _check_numeric(path, name, arr)
    if arr.dtype.kind == "c":
        raise MatFileError(path, f"mask {name!r} is complex")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise MatFileError(path, f"mask {name!r} has rank {arr.ndim}, shape {arr.shape}; expected (nt, ny, nx) or (ny, nx)")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise MatFileError(path, f"mask {name!r} holds values other than 0 and 1")
    return arr


# --------------------------------------------------------------------------------------------- fastMRI


def is_fastmri(path: str | os.PathLike) -> bool:
    """True for a plain HDF5 file with a native complex `kspace` dataset (fastMRI layout)."""
    try:
        with h5py.File(path, "r") as fh:
            ds = fh.get("kspace")
            return isinstance(ds, h5py.Dataset) and ds.dtype.kind == "c"
    except OSError:
        return False


def read_fastmri(path: str | os.PathLike, check_finite: bool = True) -> np.ndarray:
    """Read fastMRI multi-coil k-space into complex64 (1, nslices, ncoils, ny, nx).

    fastMRI stores (slices, coils, height, width) where height is the (oversampled) readout and
    width the phase encode (fastMRI's MaskFunc undersamples `shape[-2]` of the real-view tensor,
    i.e. the last complex axis). The last two axes are therefore swapped to put the phase encode
    at -2 like CMRxRecon. Single-coil files (3-D) get nc = 1.
    """
    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise MatFileError(path, f"truncated or corrupt HDF5 file ({exc})") from None
    with fh:
        ds = fh.get("kspace")
        if not isinstance(ds, h5py.Dataset):
            raise MatFileError(path, f"no 'kspace' dataset (datasets: {list(fh.keys())})")
        arr = _h5_to_numpy(path, ds)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise MatFileError(path, f"fastMRI kspace has rank {arr.ndim}, shape {arr.shape}; expected (slices, coils, readout, phase)")
    arr = np.ascontiguousarray(arr.transpose(0, 1, 3, 2)[None], dtype=np.complex64)
    if check_finite:
        _check_finite(path, "kspace", arr)
    return arr


def fastmri_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a fastMRI file (acquisition, max, norm, patient_id, ...) as Python values."""
    with h5py.File(path, "r") as fh:
        out = {}
        for k, v in fh.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out


# --------------------------------------------------------------------------------------------- writing


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def matlab_header(created: float | None = None, platform: str = "GLNXA64") -> bytes:
    """The 128-byte MATLAB 7.3 header: 116 bytes of text, 8-byte subsystem offset, version, 'IM'."""
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(time.time() if created is None else created))
    text = f"MATLAB 7.3 MAT-file, Platform: {platform}, Created on: {stamp} HDF5 schema 1.00 .".encode("ascii")
    text = text[:_MATLAB_TEXT_BYTES].ljust(_MATLAB_TEXT_BYTES, b" ")
    # Bytes 124-125 hold version 0x0200 and 126-127 the endian indicator, exactly as MATLAB writes
    # them (b'\x00\x02IM' on little-endian machines; checked on a real 2025 mask file).
    return text + b"\x00" * 8 + b"\x00\x02" + b"IM"


def _matlab_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks spanning all leading axes and a few points of the last (readout) axis.

    A real 2025 mask (12, 198, 442) float64 has chunks (12, 198, 3): ~57 KiB, i.e. as many readout
    points as fit in ~64 KiB. The same rule is applied to k-space (trap 15).
    """
    lead = int(np.prod(shape[:-1], dtype=np.int64)) * itemsize
    last = max(1, min(shape[-1], _CHUNK_TARGET_BYTES // max(lead, 1)))
    return tuple(int(s) for s in shape[:-1]) + (int(last),)


def write_mat73(path: str | os.PathLike, key: str, arr: np.ndarray, precision: str = "float64",
                compression: int = 3, created: float | None = None) -> Path:
    """Write one variable as MATLAB v7.3 (HDF5 with the 512-byte MATLAB userblock).

    arr: in h5py order, e.g. complex (nt, nz, nc, ny, nx) or a real mask (nt, ny, nx).
    precision: "float64" (MATLAB double: 2025 k-space and every mask) or "float32" (single: 2024
    k-space). Complex data becomes a compound ('real', 'imag') of that precision.
    created: POSIX time for the header text (fixed values make byte-identical files).
    """
    path = Path(path)
    arr = np.asarray(arr)
    if arr.ndim == 0:
        raise ValueError(f"{path}: cannot write a 0-d array")
    real_t = {"float64": np.float64, "float32": np.float32}[precision]
    mclass = b"double" if precision == "float64" else b"single"
    if arr.dtype.kind == "c":
        dt = np.dtype([("real", real_t), ("imag", real_t)])
        data = np.empty(arr.shape, dtype=dt)
        data["real"] = arr.real
        data["imag"] = arr.imag
    else:
        data = np.ascontiguousarray(arr, dtype=real_t)
    tmp = _tmp_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK, libver="earliest") as fh:
            ds = fh.create_dataset(
                key, data=data, chunks=_matlab_chunks(data.shape, data.dtype.itemsize),
                maxshape=(None,) * data.ndim, compression="gzip", compression_opts=compression,
                track_times=False,
            )
            # MATLAB writes a fixed-length, null-terminated string attribute.
            ds.attrs.create("MATLAB_class", np.bytes_(mclass), dtype=h5py.string_dtype("ascii", len(mclass)))
        with open(tmp, "r+b") as fh:
            fh.write(matlab_header(created).ljust(_USERBLOCK, b"\x00"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_mat5(path: str | os.PathLike, key: str, arr_h5order: np.ndarray, compress: bool = True) -> Path:
    """Write one variable as MATLAB v5 (`scipy.io.savemat`) in MATLAB axis order.

    arr_h5order: h5py order (e.g. (nt, nz, nc, ny, nx)); it is stored reversed (nx, ny, nc, nz, nt),
    as MATLAB `save -v7` would. Complex data is stored as complex128 (MATLAB double).
    """
    path = Path(path)
    arr = np.asarray(arr_h5order)
    matlab = arr.transpose(tuple(range(arr.ndim))[::-1])
    if arr.dtype.kind == "c":
        matlab = matlab.astype(np.complex128)
    elif arr.dtype.kind == "f":
        matlab = matlab.astype(np.float64)
    tmp = _tmp_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as fh:
            scipy.io.savemat(fh, {key: matlab}, format="5", do_compression=compress, oned_as="column")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_fastmri(path: str | os.PathLike, kspace: np.ndarray, attrs: dict[str, Any] | None = None,
                  rss: np.ndarray | None = None, header_xml: str = "") -> Path:
    """Write a fastMRI-style multi-coil file.

    kspace: complex (slices, coils, readout, phase), i.e. fastMRI's own order (NOT the internal one).
    attrs: root attributes (acquisition, max, norm, patient_id); rss: float32 (slices, h, w) target.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("kspace", data=np.asarray(kspace, dtype=np.complex64), track_times=False)
            if rss is not None:
                fh.create_dataset("reconstruction_rss", data=np.asarray(rss, dtype=np.float32), track_times=False)
            fh.create_dataset("ismrmrd_header", data=np.bytes_(header_xml.encode()))
            for k, v in (attrs or {}).items():
                fh.attrs[k] = v
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
