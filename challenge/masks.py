"""Sampling masks of the CMRxRecon challenges, re-implemented in numpy from the official generators.

Source logic: CmrxRecon/CMRxRecon2025 `CMRxReconMaskGeneration/TaskAll/Toolbox_Mask_Generator/*.m`
(ktMaskGenerator, UniformSampling, ktGaussianSampling + randp + ktdup, ktRadialSampling + crop,
ktUniformSampling, zpad); docs/cmrxrecon.md §5. All masks here are float32 (nt, ny, nx) in h5py
order (the .m files build MATLAB (nx, ny, nt)); ny is the phase encode, nx the readout.

* Uniform      ACS band + every R-th PE line from index 0; identical across frames.
* ktGaussian   per frame round(ny/R) PE lines drawn from 0.1 + a/(1-a) exp(-k^2/sigma^2) (a = 0.2,
               sigma = ny/5), duplicates moved to the nearest free line of the same frame; + ACS band.
* ktRadial     called with R*0.6: floor(180/(0.6R)) spokes (37/18/12 for R 8/16/24), golden-angle
               offset 137.5 deg per frame, spokes drawn on a max(nx, ny) square (nearest-neighbour
               rotation of one row, as MATLAB imrotate 'crop') and centre-cropped; + ACS square.
* ktUniform    (2024) sheared lattice toeplitz(every R-th PE line, every R-th frame); + ACS band;
               for odd nt the .m's index arithmetic shifts the lattice by ny/2 in linear index, and
               that is followed (see kt_uniform_mask).

ACS: 20 lines / 20x20 (2025) or 16 (2024), placed by zpad: 0-based start n//2 - m//2, i.e.
centred at (ny//2, nx//2) where the centred FFT puts DC.

Randomness: only ktGaussian is random. A numpy Generator seeded with `seed` draws the MATLAB seed
(`randi([1 1000])`), and the per-frame streams then follow the .m exactly with MT19937
(`np.random.RandomState(s).random_sample` gives the same doubles as MATLAB `rng(s); rand` for s > 0).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PATTERNS_2025",
    "ACCELERATIONS_2025",
    "PATTERNS_2024",
    "ACCELERATIONS_2024",
    "ACS_2025",
    "ACS_2024",
    "make_mask",
    "zpad_slice",
    "uniform_mask",
    "kt_gaussian_mask",
    "kt_radial_mask",
    "kt_uniform_mask",
    "radial_spokes",
    "mask_name",
    "effective_acceleration",
]

PATTERNS_2025 = ("Uniform", "ktGaussian", "ktRadial")
ACCELERATIONS_2025 = (8, 16, 24)
PATTERNS_2024 = ("ktUniform", "ktGaussian", "ktRadial")
ACCELERATIONS_2024 = (4, 8, 12, 16, 20, 24)
ACS_2025 = 20
ACS_2024 = 16

_GAUSS_ALPHA = 0.2
_GOLDEN_ANGLE = 137.5
_RADIAL_FACTOR = 0.6


def _round_half_away(x: np.ndarray | float) -> np.ndarray:
    """MATLAB round(): halves away from zero (numpy rounds halves to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def zpad_slice(n: int, m: int) -> slice:
    """Where zpad.m puts a block of size m on an axis of size n (0-based start n//2 - m//2)."""
    m = min(m, n)
    start = n // 2 + math.ceil(-m / 2)
    return slice(start, start + m)


def _add_acs_band(mask: np.ndarray, acs: int) -> None:
    """ACS band: `acs` full-readout PE lines centred at ny//2 (in place, (nt, ny, nx))."""
    if acs > 0:
        mask[:, zpad_slice(mask.shape[1], acs), :] = 1


def uniform_mask(nt: int, ny: int, nx: int, R: int, acs: int = ACS_2025) -> np.ndarray:
    """UniformSampling.m: ACS band + PE lines 0, R, 2R, ...; the same in every frame."""
    mask = np.zeros((nt, ny, nx), dtype=np.float32)
    mask[:, :: int(R), :] = 1
    _add_acs_band(mask, acs)
    return mask


def _randp(prob: np.ndarray, sd: int, n: int) -> np.ndarray:
    """randp.m: n 1-based indices drawn with relative probability `prob` from the stream rng(sd)."""
    x = _matlab_rand(sd, n)
    edges = np.concatenate([[0.0], np.cumsum(prob)]) / prob.sum()
    # histc bin k holds edges[k-1] <= x < edges[k] (1-based); x < 1 always.
    # (clipped: a draw at/above a last edge rounded below 1 would otherwise leave the frame)
    return np.clip(np.searchsorted(edges, x, side="right"), 1, prob.size)


def _matlab_rand(sd: int, n: int) -> np.ndarray:
    """MATLAB `rng(sd); rand(n, 1)` (Mersenne twister; MATLAB's seed 0 is MT seed 5489)."""
    return np.random.RandomState(5489 if sd == 0 else int(sd)).random_sample(n)


def _ktdup(pt: np.ndarray, ny: int, nt: int) -> np.ndarray:
    """ktdup.m on 1-based linear k-t indices (column-major (ny, nt)): duplicates, in order, move to
    the nearest vacant PE line of the same frame (ties: the lower index, as MATLAB min does)."""
    pt = pt.copy()
    vacant = np.ones(ny * nt + 1, dtype=bool)
    vacant[0] = False  # index 0 unused (1-based)
    seen: set[int] = set()
    dupidx = []
    for i, p in enumerate(pt.tolist()):
        if p in seen:
            dupidx.append(i)
        seen.add(p)
    vacant[list(seen)] = False
    # MATLAB gathers all duplicates of the first repeated value, then the next (sorted by value).
    dupidx.sort(key=lambda i: (pt[i], i))
    for i in dupidx:
        p = int(pt[i])
        frame0 = (p - 1) // ny * ny  # 0-based offset of the frame in 1-based index space
        col = np.flatnonzero(vacant[frame0 + 1: frame0 + ny + 1]) + frame0 + 1
        if col.size == 0:
            continue
        best = col[np.argmin(np.abs(col - p))]
        pt[i] = best
        vacant[best] = False
    return pt


def kt_gaussian_mask(nt: int, ny: int, nx: int, R: float, seed: int, acs: int = ACS_2025,
                     alpha: float = _GAUSS_ALPHA) -> np.ndarray:
    """ktGaussianSampling.m: per frame round(ny/R) Gaussian-density PE lines, no duplicates, + ACS.

    seed: the numpy seed; it draws the MATLAB seed in 1..1000 as `randi([1 1000])` would.
    """
    matlab_seed = int(np.random.default_rng(seed).integers(1, 1001))
    return _kt_gaussian_matlab(nt, ny, nx, R, matlab_seed, acs, alpha)


def _kt_gaussian_matlab(nt: int, ny: int, nx: int, R: float, matlab_seed: int, acs: int, alpha: float) -> np.ndarray:
    p1 = np.arange(-(ny // 2), -(-ny // 2), dtype=np.float64)  # -floor(ny/2) : ceil(ny/2)-1
    tr = int(_round_half_away(ny / R))
    sig = ny / 5
    prob = 0.1 + alpha / (1 - alpha + 1e-10) * np.exp(-(p1 ** 2) / (sig ** 2))
    tmp_sd = _round_half_away(1e6 * _matlab_rand(matlab_seed, nt)).astype(np.int64)
    # Frame f (0-based) draws tr lines k (1-based) from its own stream; linear index (f*ny + k).
    pts = np.concatenate([f * ny + _randp(prob, int(tmp_sd[f]), tr) for f in range(nt)]).astype(np.int64)
    pts = _ktdup(pts, ny, nt)
    mask = np.zeros((nt, ny, nx), dtype=np.float32)
    f, k = np.divmod(pts - 1, ny)
    mask[f, k, :] = 1
    _add_acs_band(mask, acs)
    return mask


def radial_spokes(R: float) -> int:
    """Number of distinct spokes ktRadialSampling.m draws for a nominal R: floor(180/(0.6 R))."""
    return int(math.floor(1.0 / (R * _RADIAL_FACTOR) * 180))


def _imrotate_row(a: int, row: int, ang: float, nx: int, ny: int) -> np.ndarray:
    """crop(imrotate(aux, ang, 'crop'), nx, ny) for aux = a x a zeros with ones on (1-based) `row`.

    Returns the cropped (nx, ny) boolean image (MATLAB order). Multiples of 90 degrees are exact
    rot90 (as imrotate special-cases them); other angles use nearest-neighbour inverse mapping about
    the image centre ((a+1)/2, (a+1)/2), counter-clockwise for positive angles.

    Ties at 45 and 135 degrees (modulo 90): there the inverse-mapped source coordinate of almost every
    pixel along the spoke's edge is a half integer (k + 0.5, give or take one rounding error of the
    float64 sin/cos), so nearest-neighbour rounding decides on which side of the ideal line the whole
    spoke is drawn: a one-pixel diagonal shift (measured: 246 of 246 spoke pixels are such ties for
    512 x 246, 204 of 204 for 448 x 204; none at the golden-angle offsets that are not multiples of
    45 degrees). MATLAB `imrotate` decides these ties inside its own (closed) resampling code, which
    cmrfm cannot run or read; cmrfm rounds the computed coordinate half away from zero (MATLAB's
    `round`), so where the float error lands a tie at exactly k + 0.5 the spoke goes to k + 1. With
    the challenge's golden-angle schedule (137.5 degrees per frame) such a spoke occurs for R = 8 in
    frame 18, R = 16 in frames 2, 6, 10, ... and R = 24 in frames 0, 6, 12, ...; a one-pixel shift of
    that spoke is the size of the possible difference, and it leaves the sampling density the adapters
    are trained for unchanged.
    """
    r0 = a // 2 + math.ceil(-nx / 2)  # crop.m, 0-based start of the rows kept
    c0 = a // 2 + math.ceil(-ny / 2)
    rows = np.arange(r0, r0 + nx) + 1.0  # 1-based coordinates in the a x a image
    cols = np.arange(c0, c0 + ny) + 1.0
    q, rem = divmod(ang, 90.0)
    if abs(rem) < 1e-9 or abs(rem - 90.0) < 1e-9:
        k = int(round(ang / 90.0)) % 4
        out = np.zeros((nx, ny), dtype=bool)
        if k == 0:  # the row itself
            rr = rows == row
            out[rr, :] = True
        elif k == 2:  # rot90 twice: row -> a+1-row
            out[rows == a + 1 - row, :] = True
        elif k == 1:  # rot90 (counter-clockwise): B(i,j) = A(j, a+1-i): the row becomes column `row`
            out[:, cols == row] = True
        else:  # rot90(A, 3): B(i,j) = A(a+1-j, i): column a+1-row
            out[:, cols == a + 1 - row] = True
        return out
    c = (a + 1) / 2.0
    y = rows[:, None] - c  # display coordinates: y down, x right
    x = cols[None, :] - c
    th = math.radians(ang)
    # inverse of a counter-clockwise (on screen) rotation
    xs = x * math.cos(th) - y * math.sin(th) + c
    ys = x * math.sin(th) + y * math.cos(th) + c
    src_r = _round_half_away(ys)
    src_c = _round_half_away(xs)
    return (src_r == row) & (src_c >= 1) & (src_c <= a)


def kt_radial_mask(nt: int, ny: int, nx: int, R: float, acs: int = ACS_2025,
                   angle4next: float = _GOLDEN_ANGLE, nominal: bool = True) -> np.ndarray:
    """ktRadialSampling.m with cropcorner = true (deterministic: no seed).

    nominal: R is the challenge's nominal acceleration and is multiplied by 0.6 first, as
    ktMaskGenerator.m does.
    """
    r_eff = R * _RADIAL_FACTOR if nominal else R
    beams = int(math.floor(1.0 / r_eff * 180))
    a = max(nx, ny)
    row = int(_round_half_away(a / 2))
    step = 180.0 / beams
    # MATLAB colon 0:step:180 holds beams + 1 values (both ends)
    n_ang = int(math.floor(180.0 / step + 1e-10)) + 1
    out = np.zeros((nt, ny, nx), dtype=np.float32)
    for i in range(nt):
        img = np.zeros((nx, ny), dtype=bool)
        for j in range(n_ang):
            img |= _imrotate_row(a, row, angle4next * i + j * step, nx, ny)
        out[i] = img.T
    if acs > 0:
        out[:, zpad_slice(ny, acs), zpad_slice(nx, acs)] = 1
    return out


def kt_uniform_mask(nt: int, ny: int, nx: int, R: int, acs: int = ACS_2024) -> np.ndarray:
    """ktUniformSampling.m (2024), index arithmetic and all: lattice toeplitz(PE lines 1:R:ny, frames
    1:R:nt), sent through the .m's round trip to centred (ph, ti) coordinates and ktdup, + ACS band.

    For even nt the round trip maps every sample to itself: frame t samples the PE lines r with
    (r - t) % R == 0 (and the frame-lattice wrap above the Toeplitz diagonal). For odd nt the .m
    centres frames with `floor(nt)/2` (a half) but un-centres them with `floor(nt/2)`, so every sample
    moves back by ny/2 in the column-major (ny, nt) linear index: lines r >= ny/2 move to line r - ny/2
    of the same frame, lines r < ny/2 to line r + ny/2 of the previous frame, and the ones that fall
    before the first frame all land on index 1 (line 0 of frame 0). That is what the organisers'
    masks hold, so it is what is built here. For odd nt *and* odd ny the half-index positions are
    rounded half away from zero as MATLAB's `round` does; where that points past the last frame the
    .m stops with an index error, and cmrfm leaves those samples out.
    """
    ptmp = np.zeros(ny)
    ptmp[(_round_half_away(np.arange(1, ny + 1, R)) - 1).astype(int)] = 1
    ttmp = np.zeros(nt)
    ttmp[(_round_half_away(np.arange(1, nt + 1, R)) - 1).astype(int)] = 1
    i = np.arange(ny)[:, None]
    j = np.arange(nt)[None, :]
    top = np.where(i >= j, ptmp[np.clip(i - j, 0, ny - 1)], ttmp[np.clip(j - i, 0, nt - 1)])  # toeplitz
    ind = np.flatnonzero(top.T.ravel()).astype(np.float64) + 1  # MATLAB find: column-major, 1-based
    # ktUniformSampling.m: centred coordinates (note floor(nt)/2, not floor(nt/2))
    ph = np.mod(ind - 1, ny) - math.floor(ny / 2)
    ti = np.floor((ind - 1) / ny) - nt / 2
    # ktdup.m: to a linear index and back (pt is one-to-one in ind, so no duplicate is ever moved)
    ph = ph + math.ceil((ny + 1) / 2)
    ti = ti + math.ceil((nt + 1) / 2)
    pt = (ti - 1) * ny + ph
    x = pt - np.floor((pt - 1) / ny) * ny
    y = np.ceil(pt / ny)
    ph = x - math.ceil((ny + 1) / 2)
    ti = y - math.ceil((nt + 1) / 2)
    # back in ktUniformSampling.m
    ind = _round_half_away(ny * (ti + math.floor(nt / 2)) + (ph + math.floor(ny / 2) + 1))
    ind[ind <= 0] = 1
    ind = ind[ind <= ny * nt].astype(np.int64)  # past the end: MATLAB errors (odd nt and odd ny only)
    samp = np.zeros(ny * nt, dtype=np.float32)
    samp[ind - 1] = 1
    mask = np.repeat(samp.reshape(nt, ny)[:, :, None], nx, axis=2)  # column-major (ny, nt) -> (nt, ny, nx)
    _add_acs_band(mask, acs)
    return mask


def make_mask(pattern: str, R: int, nt: int, ny: int, nx: int, seed: int = 0, acs: int | None = None) -> np.ndarray:
    """A challenge sampling mask, float32 (nt, ny, nx) with values {0, 1}.

    pattern: "Uniform", "ktGaussian", "ktRadial" (2025, ACS 20) or "ktUniform" (2024, ACS 16).
    R: nominal acceleration (ACS lines are not counted, as in the challenge).
    seed: only ktGaussian is random; the others are deterministic.
    acs: ACS size override (e.g. 16 for 2024 masks of the 2025 patterns; 0 for none).
    """
    if min(nt, ny, nx) < 1:
        raise ValueError(f"mask size must be positive, got nt={nt} ny={ny} nx={nx}")
    if R <= 0:
        raise ValueError(f"acceleration must be positive, got {R}")
    if pattern == "Uniform":
        return uniform_mask(nt, ny, nx, R, ACS_2025 if acs is None else acs)
    if pattern == "ktGaussian":
        return kt_gaussian_mask(nt, ny, nx, R, seed, ACS_2025 if acs is None else acs)
    if pattern == "ktRadial":
        return kt_radial_mask(nt, ny, nx, R, ACS_2025 if acs is None else acs)
    if pattern == "ktUniform":
        return kt_uniform_mask(nt, ny, nx, R, ACS_2024 if acs is None else acs)
    raise ValueError(f"unknown mask pattern {pattern!r}; expected one of {PATTERNS_2025 + ('ktUniform',)}")


def mask_name(stem: str, pattern: str, R: int) -> str:
    """File name of a challenge mask, e.g. cine_sax_mask_ktGaussian8.mat."""
    return f"{stem}_mask_{pattern}{R}.mat"


def effective_acceleration(mask: np.ndarray) -> float:
    """numel / sum of a mask: the acceleration actually achieved, ACS included (trap 7)."""
    return float(mask.size / max(float(mask.sum()), 1.0))
