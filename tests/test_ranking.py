"""img4ranking: MATLAB rounding, crop.m start, slice / frame selection and output rank (docs/cmrxrecon.md §6.1, §6.5)."""

from __future__ import annotations

import numpy as np
import pytest

from challenge.ranking import (
    crop_selected, crop_size, crop_start, img4ranking, img4ranking_from_kspace, matlab_round, matlab_round_div,
    modality_flags, ranking_shape, run4ranking, select_frames, select_slices,
)


@pytest.mark.parametrize("m, s, start", [(448, 149, 150), (512, 171, 171), (198, 99, 50)])
def test_crop_worked_examples(m: int, s: int, start: int) -> None:
    # §6.1 table: crop.m start m//2 - s//2, which differs from (m - s)//2 by one for odd m - s.
    assert crop_start(m, s) == start
    assert crop_start(m, s) == (m - s) // 2 + 1
    assert crop_size(m, m)[0] == matlab_round_div(m, 3)


def test_crop_sizes_follow_matlab_round() -> None:
    assert crop_size(448, 198) == (149, 99)
    assert crop_size(512, 246) == (171, 123)  # 2024 ShowCase: cine_sax 512 x 246 -> (171, 123, 2, 3)
    assert crop_size(442, 161) == (147, 81)  # round(80.5) = 81 in MATLAB ...
    assert round(161 / 2) == 80  # ... and 80 with Python's round: the trap
    assert matlab_round(2.5) == 3 and matlab_round(-2.5) == -3 and matlab_round(80.5) == 81
    assert [matlab_round_div(n, 2) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]


@pytest.mark.parametrize("nz, slices", [(1, [0]), (2, [0, 1]), (3, [0, 1]), (4, [0, 1]), (5, [1, 2]),
                                        (6, [1, 2]), (7, [2, 3]), (14, [5, 6])])
def test_slice_selection(nz: int, slices: list[int]) -> None:
    assert select_slices(nz) == slices


def test_frame_selection_and_flags() -> None:
    assert select_frames(12, "cine_sax") == [0, 1, 2]
    assert select_frames(2, "lge_sax") == [0, 1]
    assert select_frames(1, "cine_lax") == [0]
    for name in ("T1map", "T2map", "T2smap", "T1mappost", "T1rho", "T1mappost_kus_Uniform8.mat"):
        assert select_frames(9, name) == list(range(9)), name
    for name in ("blackblood", "T1w", "T2w"):
        assert select_frames(3, name) == [0]
        assert modality_flags(name).single_frame
    # Case-sensitive, as MATLAB's strfind: a lower-case "t1w" is not the single-frame type.
    assert not modality_flags("t1w").single_frame and not modality_flags("Blackblood").single_frame
    assert modality_flags("T2smap").mapping and not modality_flags("T2smap").t1rho
    # Only the base name counts: a folder called T1w does not make a cine single-frame.
    assert select_frames(12, "/data/T1w/cine_sax_kus_Uniform8.mat") == [0, 1, 2]


@pytest.mark.parametrize("shape, name, expected", [
    ((12, 14, 4, 162, 448), "cine_sax", (149, 81, 2, 3)),
    ((12, 1, 4, 162, 448), "cine_lax_4ch", (149, 81, 1, 3)),  # middle singleton kept
    ((9, 5, 4, 161, 442), "T1map", (147, 81, 2, 9)),
    ((1, 1, 4, 100, 300), "T1w", (100, 50)),  # single slice, single frame: 2-D
    ((1, 3, 4, 100, 300), "blackblood", (100, 50, 2)),
    ((2, 3, 4, 100, 300), "lge_sax", (100, 50, 2, 2)),
    ((1, 1, 4, 100, 300), "cine_sax", (100, 50)),  # the case the .m does not handle: frame 1, 2-D
    ((1, 4, 4, 100, 300), "cine_sax", (100, 50, 2)),
])
def test_output_rank(shape: tuple[int, ...], name: str, expected: tuple[int, ...]) -> None:
    nt, nz, nc, ny, nx = shape
    assert ranking_shape(nx, ny, nz, nt, name) == expected
    k = np.zeros(shape, dtype=np.complex64)
    out = img4ranking_from_kspace(k, name)
    assert out.shape == expected and out.dtype == np.float32


def test_crop_picks_the_matlab_pixels() -> None:
    # Each pixel encodes its own (frame, slice, y, x): the output must hold exactly the crop.m pixels.
    nt, nz, ny, nx = 4, 5, 161, 448
    t, z, y, x = np.meshgrid(*(np.arange(n) for n in (nt, nz, ny, nx)), indexing="ij")
    img = (x + 1000 * y + 10**6 * z + 10**7 * t).astype(np.float64)
    out = img4ranking(img, "cine_sax")  # (149, 81, 2, 3)
    assert out.shape == (149, 81, 2, 3)
    x0, y0 = 448 // 2 - 149 // 2, 161 // 2 - 81 // 2  # 150, 40
    for i, j, s, f in [(0, 0, 0, 0), (148, 80, 1, 2), (10, 20, 1, 0)]:
        zz = [1, 2][s]  # sz = 5: 0-based slices 1 and 2
        assert out[i, j, s, f] == np.float32((x0 + i) + 1000 * (y0 + j) + 10**6 * zz + 10**7 * f)


def test_run4ranking_matches_kspace_path_and_sos() -> None:
    rng = np.random.default_rng(0)
    coil = (rng.standard_normal((3, 5, 4, 33, 51)) + 1j * rng.standard_normal((3, 5, 4, 33, 51))).astype(np.complex64)
    ax = (-2, -1)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil, axes=ax), norm="ortho"), axes=ax)
    from_k = img4ranking_from_kspace(k, "cine_sax")
    from_m = run4ranking(coil.transpose(4, 3, 2, 1, 0), "cine_sax")  # MATLAB (sx, sy, sc, sz, t)
    assert from_m.shape == from_k.shape == (17, 17, 2, 3)
    np.testing.assert_allclose(from_k, from_m, rtol=1e-4, atol=1e-5)
    rss = np.sqrt((np.abs(coil) ** 2).sum(axis=2))
    np.testing.assert_allclose(img4ranking(rss, "cine_sax"), from_m, rtol=1e-5)
    np.testing.assert_allclose(crop_selected(rss[:3, 1:3]), from_m, rtol=1e-5)
    # 4-D MATLAB input (no time axis): blackblood-like, 2 central slices -> 3-D output.
    bb = run4ranking(coil[0].transpose(3, 2, 1, 0), "blackblood")
    assert bb.shape == (17, 17, 2)
