"""The CMRxRecon2025 "img4ranking" reduction (`run4Ranking_2025.m`), re-implemented exactly.

What is scored is not the whole volume: a centre crop of 1/3 readout x 1/2 phase encode, on the two
central slices (all when fewer than 3) and on the first frames (all for mapping / T1rho, 1 for
single-frame types, else the first min(3, t)). Every index follows MATLAB rounding and `crop.m`
(docs/cmrxrecon.md §6.1, §6.5, §8 traps 9-10):

- `round()` is half away from zero (`round(80.5) = 81`; Python's `round` gives 80);
- the crop starts at 0-based `m//2 - s//2`, not `(m - s)//2` (they differ when m - s is odd);
- the result is float32 in MATLAB axis order `(cx, cy, [nslices], [nframes])`, where MATLAB drops
  *trailing* singleton dimensions only: `(cx, cy, 1, T)` keeps its middle singleton, and a single
  slice of a single frame is 2-D `(cx, cy)`.

Decision for the case the `.m` does not handle (nz = 1 and t = 1 for a type that is not single-frame,
where `run4Ranking_2025.m` fails): cmrfm takes frame 1 and returns the 2-D `(cx, cy)` image, exactly
what MATLAB's trailing-singleton rule gives for a single slice of a single frame.

Entry points:
- `run4ranking(img, name)`: the `.m` signature: complex coil images in MATLAB order
  `(sx, sy, sc, sz[, t])`; does the sum of squares itself.
- `img4ranking(image, name)`: cmrfm's own order: a coil-combined image (magnitude or complex) in
  h5py order `(nt, nz, ny, nx)`.
- `img4ranking_from_kspace(kspace, name)`: multi-coil k-space `(nt, nz, nc, ny, nx)` (the order
  `shards.matfile.read_kspace` returns); only the selected slices and frames are transformed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from shards.fft import ifft2c

# Substrings `run4Ranking_2025.m` looks for in the file name (case-sensitive, as in MATLAB). `T2smap`
# is listed on its own because "T2map" is not a substring of "T2smap"; `T1mappost` is implied by
# "T1map" but listed as the `.m` lists it.
SINGLE_FRAME_KEYS = ("blackblood", "T1w", "T2w")
MAPPING_KEYS = ("T1map", "T2map", "T2smap", "T1mappost")
T1RHO_KEYS = ("T1rho",)


@dataclass(frozen=True)
class RankingFlags:
    """Modality flags `run4Ranking_2025.m` derives from the file name."""

    single_frame: bool  # blackblood / T1w / T2w: frame 1 only
    mapping: bool  # T1map / T2map / T2smap / T1mappost: all frames
    t1rho: bool  # T1rho: all frames


def modality_flags(name: str) -> RankingFlags:
    """Flags from a file name or stem (`cine_sax`, `T1mappost_kus_Uniform8.mat`, a path...).

    Only the base name is looked at, so a folder such as `.../T1w/...` cannot flip the flags.
    """
    base = os.path.basename(str(name))
    return RankingFlags(
        single_frame=any(k in base for k in SINGLE_FRAME_KEYS),
        mapping=any(k in base for k in MAPPING_KEYS),
        t1rho=any(k in base for k in T1RHO_KEYS),
    )


def matlab_round_div(n: int, d: int) -> int:
    """MATLAB `round(n / d)` for integers n >= 0, d > 0: halves rounded up, in exact integer arithmetic."""
    if n < 0 or d <= 0:
        raise ValueError(f"matlab_round_div expects n >= 0 and d > 0, got n={n}, d={d}")
    return (2 * n + d) // (2 * d)


def matlab_round(x: float) -> int:
    """MATLAB `round(x)`: halves away from zero (Python's `round` rounds halves to even)."""
    return int(np.sign(x) * np.floor(abs(x) + 0.5))


def crop_size(sx: int, sy: int) -> tuple[int, int]:
    """`[round(sx/3), round(sy/2)]`: sx = readout (nx), sy = phase encode (ny)."""
    return matlab_round_div(sx, 3), matlab_round_div(sy, 2)


def crop_start(m: int, s: int) -> int:
    """0-based start of `crop.m` on an axis of size m cropped to s: `floor(m/2)+1+ceil(-s/2)` 1-based."""
    return m // 2 - s // 2


def select_slices(nz: int) -> list[int]:
    """0-based slices scored: all if nz < 3, else the two around `c = round(nz/2)`: `[c-2, c-1]`."""
    if nz < 1:
        raise ValueError(f"no slices (nz={nz})")
    if nz < 3:
        return list(range(nz))
    c = matlab_round_div(nz, 2)
    return [c - 2, c - 1]


def select_frames(nt: int, name: str) -> list[int]:
    """0-based frames scored for a file named `name` with nt frames (see module docstring)."""
    if nt < 1:
        raise ValueError(f"no frames (nt={nt}) in {name}")
    flags = modality_flags(name)
    if flags.single_frame or nt == 1:
        return [0]
    if flags.mapping or flags.t1rho:
        return list(range(nt))
    return list(range(min(3, nt)))


def matlab_squeeze_trailing(arr: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes beyond the second, as MATLAB stores arrays (never a middle one)."""
    shape = list(arr.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return arr.reshape(shape)


def ranking_shape(nx: int, ny: int, nz: int, nt: int, name: str) -> tuple[int, ...]:
    """Shape of the img4ranking of a file with these sizes (MATLAB order, trailing singletons dropped)."""
    cx, cy = crop_size(nx, ny)
    full = (cx, cy, len(select_slices(nz)), len(select_frames(nt, name)))
    shape = list(full)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _crop_matlab_order(mag: np.ndarray) -> np.ndarray:
    """Centre-crop axes 0 (sx) and 1 (sy) of a MATLAB-order magnitude array the way `crop.m` does."""
    sx, sy = mag.shape[0], mag.shape[1]
    cx, cy = crop_size(sx, sy)
    x0, y0 = crop_start(sx, cx), crop_start(sy, cy)
    return mag[x0 : x0 + cx, y0 : y0 + cy]


def crop_selected(image: np.ndarray) -> np.ndarray:
    """Crop + MATLAB order of an image whose frames and slices are already the scored ones.

    image: (T', Z', ny, nx) h5py order, magnitude or complex (abs is taken), T'/Z' from
    `select_frames` / `select_slices`. Returns float32 (cx, cy[, Z'][, T']) with trailing singletons
    dropped. For reconstructions that only compute the scored slices and frames.
    """
    arr = np.asarray(image)
    if arr.ndim != 4:
        raise ValueError(f"crop_selected expects (T', Z', ny, nx), got shape {arr.shape}")
    mag = np.abs(arr).transpose(3, 2, 1, 0)  # MATLAB order (nx, ny, Z', T')
    return matlab_squeeze_trailing(np.ascontiguousarray(_crop_matlab_order(mag), dtype=np.float32))


def img4ranking(image: np.ndarray, name: str) -> np.ndarray:
    """img4ranking of a coil-combined image.

    image: (nt, nz, ny, nx) in h5py order, magnitude or complex (abs is taken); a 3-D (nz, ny, nx)
           array is read as a 4-D file without time axis (nt = 1).
    name:  file name or stem, for the modality flags.
    Returns float32 in MATLAB order (cx, cy[, nslices][, nframes]) with trailing singletons dropped.
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{name}: img4ranking expects (nt, nz, ny, nx), got shape {arr.shape}")
    nt, nz = arr.shape[:2]
    return crop_selected(arr[np.ix_(select_frames(nt, name), select_slices(nz))])


def img4ranking_from_kspace(kspace: np.ndarray, name: str) -> np.ndarray:
    """img4ranking of multi-coil k-space (nt, nz, nc, ny, nx) (or 4-D (nz, nc, ny, nx)): RSS, crop.

    Only the scored slices and frames are transformed, so a large file costs a few 2-D FFTs.
    """
    k = np.asarray(kspace)
    if k.ndim == 4:
        k = k[None]
    if k.ndim != 5:
        raise ValueError(f"{name}: expected k-space (nt, nz, nc, ny, nx), got shape {k.shape}")
    nt, nz = k.shape[:2]
    frames, slices = select_frames(nt, name), select_slices(nz)
    # complex128 like MATLAB's double ifft2c/sos; float32 only at the end, as the `.m` does.
    sel = k[np.ix_(frames, slices)].astype(np.complex128)  # (T', Z', nc, ny, nx)
    return crop_selected(np.sqrt(np.sum(np.abs(ifft2c(sel)) ** 2, axis=2)))  # RSS (T', Z', ny, nx)


def run4ranking(img: np.ndarray, name: str) -> np.ndarray:
    """`run4Ranking_2025(img, filetype)`: complex coil images in MATLAB order -> img4ranking.

    img:  (sx, sy, sc, sz) for blackblood/T1w/T2w-like 4-D files or (sx, sy, sc, sz, t), complex or real.
    name: the file name / type string the flags are read from.
    Returns float32 (cx, cy[, nslices][, nframes]), MATLAB order, trailing singletons dropped.
    """
    arr = np.asarray(img)
    if arr.ndim == 4:
        arr = arr[..., None]
    if arr.ndim != 5:
        raise ValueError(f"{name}: run4ranking expects (sx, sy, sc, sz[, t]), got shape {arr.shape}")
    sz, nt = arr.shape[3], arr.shape[4]
    sel = arr[:, :, :, select_slices(sz)][:, :, :, :, select_frames(nt, name)]
    sos = np.sqrt(np.sum(np.abs(sel) ** 2, axis=2))  # (sx, sy, Z', T')
    return matlab_squeeze_trailing(np.ascontiguousarray(_crop_matlab_order(sos), dtype=np.float32))
