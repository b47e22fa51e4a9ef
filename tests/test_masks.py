"""challenge.masks against the official generators' rules (CMRxRecon2025 TaskAll/*.m, docs/cmrxrecon.md §5) and
against a real 2025 validation mask (NV-Raw2insights-MRI example, cine_lax_4ch_mask_ktRadial16.mat)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from challenge.masks import (ACCELERATIONS_2025, PATTERNS_2025, effective_acceleration, make_mask, radial_spokes,
                          zpad_slice)


def _rows(frame: np.ndarray) -> set[int]:
    """PE lines sampled across the full readout in one (ny, nx) frame."""
    return set(np.flatnonzero(frame.all(axis=1)).tolist())


def _acs_rows(ny: int, m: int) -> set[int]:
    # zpad.m: 1-based floor(ny/2)+1+ceil(-m/2) ... -> 0-based ny//2 - m//2 .. + m - 1
    return set(range(ny // 2 - m // 2, ny // 2 - m // 2 + m))


@pytest.mark.parametrize("ny", [161, 198, 31])
@pytest.mark.parametrize("R", ACCELERATIONS_2025)
def test_uniform_lines(ny: int, R: int) -> None:
    m = make_mask("Uniform", R, 3, ny, 50)
    assert m.dtype == np.float32 and m.shape == (3, ny, 50)
    expect = set(range(0, ny, R)) | _acs_rows(ny, 20)  # every R-th line from index 0, + ACS 20
    assert _rows(m[0]) == expect
    assert m.sum() == 3 * 50 * len(expect)  # whole lines only
    assert (m == m[0]).all()  # identical across frames


def test_uniform_effective_acceleration_matches_measured() -> None:
    # docs/cmrxrecon.md §5.1, measured by reproducing UniformSampling.m: ny=198 -> 4.6/6.2/7.1, ny=162 -> 4.3/5.4/6.2
    got = [round(effective_acceleration(make_mask("Uniform", R, 1, ny, 8)), 1)
           for ny in (198, 162) for R in ACCELERATIONS_2025]
    assert got == [4.6, 6.2, 7.1, 4.3, 5.4, 6.2]


@pytest.mark.parametrize("ny,R", [(36, 8), (161, 8), (162, 16), (75, 24)])
def test_kt_gaussian_line_counts(ny: int, R: int) -> None:
    nt, nx = 12, 40
    bare = make_mask("ktGaussian", R, nt, ny, nx, seed=5, acs=0)
    n = int(np.floor(ny / R + 0.5))  # MATLAB round(ny/R): 36/8 = 4.5 -> 5
    for t in range(nt):
        assert len(_rows(bare[t])) == n  # no duplicates within a frame (ktdup)
        assert bare[t].sum() == n * nx  # whole readout lines only
    assert not all((bare[t] == bare[0]).all() for t in range(nt))  # changes frame to frame
    full = make_mask("ktGaussian", R, nt, ny, nx, seed=5)
    for t in range(nt):
        assert _rows(full[t]) == _rows(bare[t]) | _acs_rows(ny, 20)


def test_kt_gaussian_density_and_seed() -> None:
    a = make_mask("ktGaussian", 8, 12, 161, 16, seed=1, acs=0)
    np.testing.assert_array_equal(a, make_mask("ktGaussian", 8, 12, 161, 16, seed=1, acs=0))
    assert not np.array_equal(a, make_mask("ktGaussian", 8, 12, 161, 16, seed=2, acs=0))
    # Gaussian density (sigma = ny/5) over a floor of 0.1: the centre is sampled far more than the edges
    hits = sum(make_mask("ktGaussian", 8, 12, 161, 1, seed=s, acs=0)[:, :, 0].sum(0) for s in range(20))
    centre, edge = hits[80 - 10:80 + 10].mean(), np.r_[hits[:20], hits[-20:]].mean()
    assert centre > 2.5 * edge > 0


def test_kt_radial_spokes_and_acs_block() -> None:
    assert [radial_spokes(R) for R in ACCELERATIONS_2025] == [37, 18, 12]  # floor(180/(0.6 R))
    ny, nx = 41, 90
    m = make_mask("ktRadial", 16, 4, ny, nx)
    assert m[:, zpad_slice(ny, 20), zpad_slice(nx, 20)].all()  # 20x20 block centred at (ny//2, nx//2)
    assert zpad_slice(ny, 20) == slice(10, 30) and zpad_slice(nx, 20) == slice(35, 55)
    bare = make_mask("ktRadial", 16, 4, ny, nx, acs=0)
    per_row = bare[1].sum(axis=1)
    assert ((per_row > 0) & (per_row < nx)).sum() > ny // 2  # a 2-D pattern: rows partially sampled
    assert not (bare[1] == bare[0]).all()  # golden-angle rotation between frames
    fractions = [make_mask("ktRadial", R, 1, 120, 200, acs=0).mean() for R in ACCELERATIONS_2025]
    assert fractions[0] > fractions[1] > fractions[2] > 0


def test_kt_radial_matches_a_real_2025_mask() -> None:
    # Real TaskR1 mask cine_lax_4ch_mask_ktRadial16.mat (h5py (12, 198, 442)): per-frame pixel counts
    # and sha256 of np.packbits(frame) measured on the file. Frames 2, 6, 10 carry 45-degree spokes
    # whose pixels are exact rounding ties in MATLAB's imrotate; only their counts are close.
    real_sums = [5784, 5860, 6142, 5917, 5789, 5828, 6049, 6024, 5796, 5810, 6141, 6040]
    real_sha = {0: "3d43052e3bfe718e", 1: "518460f1d4a58245", 3: "1b560fe101cf1be3", 4: "3cfecbc80921a4d4",
                5: "175223f3315a9b1c", 7: "162a718d561b71fb", 8: "26cfab84a5a7dbfd", 9: "937494901ce6533d",
                11: "5258e3203993c48d"}
    m = make_mask("ktRadial", 16, 12, 198, 442)
    for t in range(12):
        frame = m[t].astype(bool)
        if t in real_sha:
            assert hashlib.sha256(np.packbits(frame).tobytes()).hexdigest()[:16] == real_sha[t], t
        else:
            assert abs(int(frame.sum()) - real_sums[t]) < 0.04 * real_sums[t], t


def test_kt_uniform_2024_lattice_and_acs16() -> None:
    R, nt, ny = 4, 12, 40
    m = make_mask("ktUniform", R, nt, ny, 10)
    acs = _acs_rows(ny, 16)
    for t in range(nt):
        assert _rows(m[t]) - acs == {r for r in range(ny) if (r - t) % R == 0} - acs  # sheared lattice
        assert acs <= _rows(m[t])


@pytest.mark.parametrize("pattern", PATTERNS_2025 + ("ktUniform",))
def test_mask_values_shapes_and_determinism(pattern: str) -> None:
    m = make_mask(pattern, 8, 5, 33, 70, seed=3)
    assert m.shape == (5, 33, 70) and m.dtype == np.float32
    assert set(np.unique(m).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(m, make_mask(pattern, 8, 5, 33, 70, seed=3))
    single = make_mask(pattern, 8, 1, 33, 70, seed=3)  # 4-D files: one frame
    assert single.shape == (1, 33, 70)


def test_unknown_pattern_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown mask pattern 'Radial'"):
        make_mask("Radial", 8, 1, 20, 20)


def _kt_uniform_expected(nt: int, ny: int, R: int) -> set[tuple[int, int]]:
    """(frame, line) samples of ktUniformSampling.m, worked out by hand from its index arithmetic.

    The Toeplitz lattice L = frame * ny + line (column-major, 0-based). Even nt: unchanged. Odd nt: the
    .m centres with nt/2 and un-centres with floor(nt/2), moving L to L - ny//2; for odd ny the line
    ny//2 itself comes out at L - ny//2 + ny (ktdup's ind2xy on a half index); below 0 -> index 0;
    past the last frame MATLAB errors (left out).
    """
    lines = {r for r in range(0, ny, R)}
    frames = {f for f in range(0, nt, R)}
    lattice = set()
    for f in range(nt):
        for r in range(ny):
            if (r >= f and (r - f) in lines) or (r < f and (f - r) in frames):
                lattice.add(f * ny + r)
    out = set()
    for L in lattice:
        if nt % 2 == 0:
            L2 = L
        elif ny % 2 == 1 and L % ny == ny // 2:
            L2 = L - ny // 2 + ny
        else:
            L2 = L - ny // 2
        L2 = max(L2, 0)
        if L2 < ny * nt:
            out.add((L2 // ny, L2 % ny))
    return out


@pytest.mark.parametrize("nt", [3, 5, 9, 12, 10])
@pytest.mark.parametrize("ny", [40, 41, 162])
@pytest.mark.parametrize("R", [4, 8])
def test_kt_uniform_follows_the_m_for_odd_nt(nt: int, ny: int, R: int) -> None:
    m = make_mask("ktUniform", R, nt, ny, 6, acs=0)
    got = {(int(t), int(r)) for t, r in zip(*np.nonzero(m[:, :, 0]))}
    assert got == _kt_uniform_expected(nt, ny, R)
    assert (m == m[:, :, :1]).all()  # every readout sample of a line
    if nt % 2:  # the shifted lattice is not the plain one (what cmrfm built before)
        plain = {(t, r) for t in range(nt) for r in range(ny) if (r - t) % R == 0 and r >= t}
        assert len(got ^ plain) > 0.05 * len(plain)
