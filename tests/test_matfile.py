"""shards.matfile: the synthetic files read exactly as the official tutorial reads them, v5 == v7.3,
fastMRI axis order, and every kind of bad file gives a MatFileError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from shards.matfile import (MatFileError, mat_format, read_fastmri, read_kspace, read_mask, write_fastmri,
                            write_mat5, write_mat73)


def _index(root: Path) -> list[dict]:
    return json.loads((root / "synthetic_index.json").read_text())["files"]


def _rand(shape, seed=0, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def test_synthetic_v73_reads_like_the_official_tutorial(synthetic_root: Path) -> None:
    entries = [e for e in _index(synthetic_root) if e["kind"] == "kspace" and e["year"] == 2025
               and e["format"] == "v7.3" and e["stem"] == "cine_sax"]
    assert entries
    e = entries[0]
    path = synthetic_root / e["path"]
    raw = path.read_bytes()[:128]
    assert raw.startswith(b"MATLAB 7.3 MAT-file, Platform: ")
    assert b"HDF5 schema 1.00 ." in raw[:116]
    assert raw[124:128] == b"\x00\x02IM"  # version 0x0200 + endian indicator, as MATLAB writes
    with h5py.File(path, "r") as fh:  # ShowCase.ipynb: one key, compound real/imag, h5py order
        assert list(fh.keys()) == ["kspace"]
        ds = fh["kspace"]
        assert ds.dtype.names == ("real", "imag")
        assert ds.dtype["real"] == np.float64 and ds.dtype["imag"] == np.float64
        assert ds.attrs["MATLAB_class"] == b"double"
        assert ds.compression == "gzip"
        assert ds.chunks[:-1] == ds.shape[:-1] and ds.chunks[-1] < ds.shape[-1]  # trap 15 layout
        data = ds[()]
        kspace = data["real"] + 1j * data["imag"]
    nt, nz, nc, ny, nx = kspace.shape
    assert (nt, nc) == (12, 10) and ny < nx  # (nt, nz, nc, ny, nx): readout (oversampled) last
    np.testing.assert_array_equal(read_kspace(path), kspace.astype(np.complex64))


def test_synthetic_v5_reads_with_scipy_in_matlab_order(synthetic_root: Path) -> None:
    entries = [e for e in _index(synthetic_root) if e["kind"] == "kspace" and e["format"] == "v5"]
    assert entries
    path = synthetic_root / entries[0]["path"]
    assert path.read_bytes()[:10] == b"MATLAB 5.0" and mat_format(path) == "v5"
    data = scipy.io.loadmat(str(path))
    keys = [k for k in data if not k.startswith("__")]
    assert keys == ["kspace"]
    arr = data["kspace"]
    assert np.iscomplexobj(arr)
    assert arr.shape == tuple(entries[0]["shape"])[::-1]  # MATLAB order (nx, ny, nc, nz[, nt])
    np.testing.assert_array_equal(read_kspace(path)[0 if arr.ndim == 4 else slice(None)],
                                  arr.transpose(tuple(range(arr.ndim))[::-1]).astype(np.complex64))


@pytest.mark.parametrize("shape", [(3, 2, 4, 7, 10), (2, 4, 9, 12)])
def test_v5_and_v73_copies_read_the_same(tmp_path: Path, shape) -> None:
    arr = _rand(shape)
    a = write_mat73(tmp_path / "a.mat", "kspace", arr)
    b = write_mat5(tmp_path / "b.mat", "kspace", arr)
    ka, kb = read_kspace(a), read_kspace(b)
    assert ka.dtype == np.complex64 and ka.ndim == 5
    expect = arr if arr.ndim == 5 else arr[None]  # 4-D (nz, nc, ny, nx) gets nt = 1
    np.testing.assert_array_equal(ka, expect)
    np.testing.assert_array_equal(kb, expect)
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_2024_single_precision_and_masks(tmp_path: Path) -> None:
    arr = _rand((2, 1, 3, 5, 8))
    p = write_mat73(tmp_path / "k.mat", "kspace_full", arr, precision="float32")
    with h5py.File(p, "r") as fh:
        assert fh["kspace_full"].dtype["real"] == np.float32
        assert fh["kspace_full"].attrs["MATLAB_class"] == b"single"
    np.testing.assert_array_equal(read_kspace(p), arr)
    m2 = (np.random.default_rng(1).random((5, 8)) > 0.5).astype(np.float64)
    m3 = np.stack([m2, 1 - m2])
    np.testing.assert_array_equal(read_mask(write_mat73(tmp_path / "m2.mat", "mask", m2)), m2[None])
    np.testing.assert_array_equal(read_mask(write_mat5(tmp_path / "m3.mat", "mask", m3)), m3)
    assert read_mask(tmp_path / "m3.mat").dtype == np.float32


def test_fastmri_axes_put_phase_encode_second_to_last(tmp_path: Path, synthetic_root: Path) -> None:
    # fastMRI: (slices, coils, readout=height, phase=width); internal (1, slices, coils, phase, readout)
    ks = _rand((3, 4, 16, 9))
    p = write_fastmri(tmp_path / "f.h5", ks, attrs={"acquisition": "AXT2"})
    out = read_fastmri(p)
    assert out.shape == (1, 3, 4, 9, 16)
    np.testing.assert_array_equal(out[0], ks.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(read_kspace(p), out)  # read_kspace dispatches plain-HDF5 fastMRI
    fm = [e for e in _index(synthetic_root) if e["kind"] == "fastmri"]
    assert fm
    path = synthetic_root / fm[0]["path"]
    with h5py.File(path, "r") as fh:
        assert fh["kspace"].dtype == np.complex64
        assert {"acquisition", "max", "norm", "patient_id"} <= set(fh.attrs)
        assert "reconstruction_rss" in fh and "ismrmrd_header" in fh
    k = read_kspace(path)
    assert k.shape[0] == 1 and k.shape[2] == 8 and k.shape[-1] > k.shape[-2]  # readout oversampled, last


def test_several_keys_need_key_argument(tmp_path: Path) -> None:
    p = tmp_path / "cine_sax.mat"  # 2023 layout: full and undersampled k-space in one file
    with h5py.File(p, "w") as fh:
        fh["kspace_full"] = np.ones((2, 1, 2, 4, 6))
        fh["kspace_sub04"] = np.zeros((2, 1, 2, 4, 6))
    with pytest.raises(MatFileError) as err:
        read_kspace(p)
    assert str(p) in str(err.value) and "2 variables" in str(err.value)
    assert read_kspace(p, key="kspace_sub04").shape == (2, 1, 2, 4, 6)
    assert read_kspace(p, key="kspace_full").real.sum() == 2 * 2 * 4 * 6


def assert_mat_error(path: Path, match: str, fn=read_kspace, **kw) -> None:
    with pytest.raises(MatFileError) as err:
        fn(path, **kw)
    assert str(path) in str(err.value), err.value
    assert match in str(err.value), err.value
    assert err.value.path == path


@pytest.mark.parametrize("v5", [False, True])
def test_truncated_file(tmp_path: Path, v5: bool) -> None:
    good = (write_mat5 if v5 else write_mat73)(tmp_path / "good.mat", "kspace", _rand((2, 1, 3, 6, 8)))
    bad = tmp_path / "bad.mat"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_mat_error(bad, "truncated")


def test_hdf5_with_two_keys_or_none(tmp_path: Path) -> None:
    two = tmp_path / "two.mat"
    with h5py.File(two, "w") as fh:
        fh["kspace"] = np.zeros((1, 1, 1, 4, 4))
        fh["other"] = np.zeros(3)
    assert_mat_error(two, "2 variables")
    none = tmp_path / "none.mat"
    h5py.File(none, "w").close()
    assert_mat_error(none, "no variable")


def test_wrong_rank(tmp_path: Path) -> None:
    p = write_mat73(tmp_path / "k.mat", "kspace", _rand((3, 4, 5)))
    assert_mat_error(p, "rank 3")
    m = write_mat73(tmp_path / "m.mat", "mask", np.ones((2, 2, 3, 4)))
    assert_mat_error(m, "rank 4", fn=read_mask)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_in_kspace(tmp_path: Path, bad_value: float) -> None:
    arr = _rand((2, 1, 2, 4, 6))
    arr[1, 0, 1, 2, 3] = bad_value
    p = write_mat73(tmp_path / "k.mat", "kspace", arr)
    assert_mat_error(p, "non-finite")
    assert read_kspace(p, check_finite=False).shape == arr.shape


def test_v5_with_unexpected_key(tmp_path: Path) -> None:
    p = write_mat5(tmp_path / "k.mat", "img4ranking", _rand((2, 1, 2, 4, 6)))
    assert_mat_error(p, "unexpected variable 'img4ranking'")
    k = write_mat5(tmp_path / "m.mat", "kspace", np.ones((4, 6)))
    assert_mat_error(k, "unexpected variable 'kspace'", fn=read_mask)


def test_not_a_mat_file_or_empty(tmp_path: Path) -> None:
    txt = tmp_path / "notes.mat"
    txt.write_text("Parameter,Value\nFOVx(mm),360\n" * 20)
    assert_mat_error(txt, "not a MAT file")
    empty = tmp_path / "empty.mat"
    empty.write_bytes(b"")
    assert_mat_error(empty, "empty file")
    assert_mat_error(tmp_path / "missing.mat", "not found")


def test_mask_with_values_other_than_zero_and_one(tmp_path: Path) -> None:
    p = write_mat73(tmp_path / "m.mat", "mask", np.full((2, 4, 6), 0.5))
    assert_mat_error(p, "other than 0 and 1", fn=read_mask)


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    arr = _rand((1, 1, 2, 4, 6))
    p = write_mat73(tmp_path / "k.mat", "kspace", arr)
    before = p.read_bytes()
    with pytest.raises(Exception):
        write_mat73(p, "kspace", np.array([object()] * 4))
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["k.mat"]
