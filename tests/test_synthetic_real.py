"""The "real" profile of shards.synthetic: real matrix sizes per file type, the same file formats as the
CI corpus, the effective accelerations real masks have, and fine anatomy a model cannot win on by
smoothing (docs/cmrxrecon.md §3.1, §4.4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from challenge.masks import make_mask
from shards.matfile import read_kspace, read_mask
from shards.phantom import random_anatomy, render_images
from shards.synthetic import REAL_SIZES, SyntheticConfig, acceleration_table, write_corpus

# Effective acceleration (samples / acquired, ACS 20 included) must land where real masks do at
# real sizes: ny 112-328 with a 20-line ACS. Bounds from the formula ny / (ceil(ny / R) + 20) for
# the line patterns; for ktRadial from floor(180 / 0.6R) spokes across max(ny, nx) (most of them
# overlapping near the centre), i.e. about ny / spokes to twice that, and one real ktRadial16 mask
# (14.75x at 198 x 442, docs/cmrxrecon.md §4.4) reproduced to 0.3.
RANGES = {("Uniform", 8): (3.4, 6.5), ("Uniform", 16): (4.2, 9.0), ("Uniform", 24): (4.6, 10.5),
          ("ktGaussian", 8): (3.4, 6.5), ("ktGaussian", 16): (4.2, 9.0), ("ktGaussian", 24): (4.6, 10.5),
          ("ktRadial", 8): (4.0, 10.0), ("ktRadial", 16): (8.0, 20.0), ("ktRadial", 24): (11.0, 28.0)}


@pytest.fixture(scope="module")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "corpus"
    cfg = SyntheticConfig(out=str(out), profile="real", workers=2, train_scanners=["Center002/Siemens_30T_CIMA.X"],
                          val_scanners=["Center012/Philips_30T_IngeniaCX"], patients_per_scanner=1,
                          val_patients_per_scanner=1, files_per_patient=2, val_files_per_patient=1, nz_max=1,
                          v5_every=2, compression=1, patients_2024=0, fastmri_files=0)
    return Path(write_corpus(cfg))


def _index(root: Path) -> list[dict]:
    return json.loads((root / "synthetic_index.json").read_text())["files"]


def test_sizes_follow_the_real_release_per_file_type(real_root: Path) -> None:
    kspace = [e for e in _index(real_root) if e["kind"] in ("kspace", "kus", "reference")]
    assert {e["stem"] for e in kspace} >= {"cine_sax", "cine_lax"}
    for e in kspace:
        (y_lo, y_hi), (x_lo, x_hi) = REAL_SIZES[e["stem"]]
        ny, nx = e["shape"][-2:]
        assert y_lo <= ny <= y_hi + 1 and x_lo <= nx <= x_hi + 2, (e["path"], e["shape"])
        assert e["shape"][2] == 10  # ten coils, as every real file


def test_files_pass_the_format_checks_of_the_default_corpus(real_root: Path) -> None:
    formats = set()
    for e in _index(real_root):
        path = real_root / e["path"]
        if e["kind"] == "mask":
            m = read_mask(path)
            assert set(np.unique(m)) <= {0.0, 1.0} and m.shape[-2:] == tuple(e["shape"][-2:])
            continue
        k = read_kspace(path)
        formats.add(e["format"])
        assert k.shape == tuple(e["shape"]) and np.iscomplexobj(k) and np.isfinite(k).all()
        if e["kind"] == "kus":  # undersampled copy: zero exactly off its mask
            mask = read_mask(real_root / next(f["path"] for f in _index(real_root)
                                              if f["kind"] == "mask" and f["tree"] == "val2025"))
            assert np.all(k[:, :, :, mask[0] == 0] == 0)
    assert formats == {"v5", "v7.3"}


def test_effective_acceleration_lands_where_real_masks_do(real_root: Path) -> None:
    seen = {}
    for e in _index(real_root):
        if e["kind"] == "mask" and e["tree"] == "train2025":
            m = read_mask(real_root / e["path"])
            seen.setdefault((e["pattern"], e["R"]), []).append(m.size / m.sum())  # numel / acquired
    assert set(seen) == set(RANGES)
    for key, values in seen.items():
        lo, hi = RANGES[key]
        assert all(lo <= v <= hi for v in values), (key, values)
    # the printed table (masks recomputed from every 2025 k-space size, held-out files too) lands there too
    table = acceleration_table(json.loads((real_root / "synthetic_index.json").read_text()))
    assert {(p, R) for p, R, *_ in table} == set(RANGES)
    for pattern, R, n, mean, lo, hi in table:
        assert RANGES[(pattern, R)][0] <= lo <= mean <= hi <= RANGES[(pattern, R)][1] and n == 3
    # and the official generator at a real mask's size reproduces its acceleration (14.75x)
    radial = make_mask("ktRadial", 16, 12, 198, 442)
    assert radial.size / radial.sum() == pytest.approx(14.75, abs=0.3)


def test_fine_anatomy_puts_energy_where_smoothing_loses_it() -> None:
    anat = random_anatomy(np.random.default_rng(1))
    detail = render_images("cine_sax", 2, 1, 200, 400, 2.0, anat, np.random.default_rng(0), detail=True)[0, 0]
    smooth = render_images("cine_sax", 2, 1, 200, 400, 2.0, anat, np.random.default_rng(0), detail=False)[0, 0]

    def high_fraction(img: np.ndarray) -> float:  # energy beyond a quarter of the k-space radius
        k = np.fft.fftshift(np.fft.fft2(np.abs(img)))
        y, x = np.meshgrid(np.linspace(-1, 1, k.shape[0]), np.linspace(-1, 1, k.shape[1]), indexing="ij")
        return float((np.abs(k[np.hypot(y, x) > 0.25]) ** 2).sum() / (np.abs(k) ** 2).sum())

    assert high_fraction(detail) > 3 * high_fraction(smooth)
    # still a chest: same body outline, signal inside, nothing outside
    assert np.abs(detail[:, :40]).max() < 1e-3 and np.abs(detail[100, 200]) > 0.05


def test_real_sizes_override_gives_a_matrix_unlike_the_release() -> None:
    """`real_sizes` (bench/label_efficiency.py's second held-out vendor): every file's ny, nx in the
    given ranges, none of them inside cine's release ranges; a malformed range is refused by name."""
    from shards.synthetic import _plan

    cfg = SyntheticConfig(out="unused", profile="real", train_scanners=[], val_scanners=["Center014/GE_15T_SIGNAArtist"],
                          val_patients_per_scanner=3, val_files_per_patient=2, patients_2024=0, fastmri_files=0,
                          real_sizes=[72, 96, 500, 540])
    jobs = _plan(cfg)
    assert len(jobs) == 6
    (cine_y, cine_x) = REAL_SIZES["cine_sax"]
    for j in jobs:
        assert 72 <= j.ny <= 96 and 500 <= j.nx <= 540, (j.stem, j.ny, j.nx)
        assert j.ny < cine_y[0] and j.nx > cine_x[1]
    for bad in ([72, 96, 500], [96, 72, 500, 540], [10, 20, 500, 540]):
        with pytest.raises(ValueError, match="real_sizes"):
            write_corpus(SyntheticConfig(out="unused", profile="real", real_sizes=bad))
