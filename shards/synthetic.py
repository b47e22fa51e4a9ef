"""A synthetic corpus in the exact CMRxRecon file formats: `python -m shards.synthetic --set out=DIR`.

The real data cannot be reached here, so this writes its own, faithful to the real release in every
property a reader or a model can trip on (docs/cmrxrecon.md §2-§5, traps in §8):

    DIR/ChallengeData/MultiCoil/<Modality>/TrainingSet/
        FullSample/<CenterNNN>/<Vendor_FieldT_Model>/P###/<file>.mat  (+ <file>_info.csv)
        Mask_TaskAll/<CenterNNN>/<Vendor_FieldT_Model>/P###/<file>_mask_<Pattern><R>.mat  (3 x 3)
    DIR/ChallengeData_ValSet/TaskR1/MultiCoil/<Modality>/ValidationSet/
        UnderSample_TaskR1/.../<file>_kus_<Pattern><R>.mat (+ <file>_info.csv)   one pattern per file
        Mask_TaskR1/.../<file>_mask_<Pattern><R>.mat
        FullSample_TaskR1/.../<file>.mat                                            hidden reference
    DIR/CMRxRecon2024/ChallengeData/MultiCoil/<Cine|Aorta|Mapping|Tagging>/TrainingSet/
        FullSample/P###/<file>.mat (kspace_full, float32), Mask_Task1/, Mask_Task2/, ImgSnapshot/
    DIR/fastMRI/multicoil_train/*.h5                                                 fastMRI layout
    DIR/synthetic_config.toml   the resolved config;   DIR/synthetic_index.json   one entry per file

* k-space: MATLAB v7.3, one key, compound real/imag float64, MATLAB axis order (h5py reads
  (nt, nz, nc, ny, nx)); every `v5_every`-th k-space file is MATLAB v5 instead; masks are v7.3 doubles.
* content: chest phantom with a beating heart (shards/phantom.py), smooth phase, 10 smooth coils,
  complex noise; vendor intensity scales from ~1e-3 (Siemens) to ~1e7 (UIH); readout oversampling
  per vendor; odd ny in about half the files; nx even, never a multiple of 16; some files with the
  k-space centre a few rows off ny//2 (partial Fourier, trap 18).
* deterministic for a seed: every file draws from its own seed, so the worker count does not matter
  and the files are byte-identical between runs (fixed header date, no HDF5 timestamps).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from launch.cli import config_differences, config_to_dict, dump_config, load_config, parse_args
from launch.outputs import FolderLock, write_atomic
from shards.fft import fft2c, ifft2c
from challenge.masks import ACCELERATIONS_2025, ACS_2024, PATTERNS_2025, effective_acceleration, make_mask, mask_name
from shards.matfile import write_fastmri, write_mat5, write_mat73
from shards.phantom import coil_maps, frames_for, is_four_d, random_anatomy, render_images

__all__ = ["SyntheticConfig", "write_corpus", "STEMS_2025", "STEMS_2024", "MODALITY_OF", "main"]

STEMS_2025 = (
    "cine_sax", "cine_lax", "cine_lax_2ch", "cine_lax_3ch", "cine_lax_4ch", "cine_lax_r2ch", "cine_lvot",
    "cine_rvot", "cine_ot", "lge_sax", "lge_lax", "lge_lax_2ch", "lge_lax_3ch", "lge_lax_4ch",
    "T1map", "T1mappost", "T2map", "T2smap", "T1rho", "T1w", "T2w", "blackblood", "flow2d", "perfusion",
)
# cine_sax for every patient, then the other types in an order that visits every modality folder
# (and every mapping type) within the first 18 picks, so even the tiny corpus has all of them.
_ROUND_ROBIN_2025 = (
    "cine_sax", "cine_lax", "lge_sax", "T1map", "T1rho", "T1w", "T2w", "blackblood", "flow2d", "perfusion",
    "cine_lax_4ch", "lge_lax", "T2map", "cine_lax_2ch", "lge_lax_4ch", "T1mappost", "cine_lax_3ch",
    "lge_lax_2ch", "T2smap", "cine_lvot", "lge_lax_3ch", "cine_rvot", "cine_ot", "cine_lax_r2ch",
)
STEMS_2024 = ("cine_sax", "cine_lax", "cine_lvot", "aorta_sag", "aorta_tra", "T1map", "T2map", "tagging")

MODALITY_OF = {
    **{s: "Cine" for s in STEMS_2025 if s.startswith("cine")},
    **{s: "LGE" for s in STEMS_2025 if s.startswith("lge")},
    "T1map": "Mapping", "T1mappost": "Mapping", "T2map": "Mapping", "T2smap": "Mapping",
    "T1rho": "T1rho", "T1w": "T1w", "T2w": "T2w", "blackblood": "BlackBlood", "flow2d": "Flow2d",
    "perfusion": "Perfusion", "aorta_sag": "Aorta", "aorta_tra": "Aorta", "tagging": "Tagging",
}

# Readout oversampling actually present in the stored k-space, and the typical max |k| (trap 13,
# §3.3-3.4). GE and Philips scales are not documented: placeholders between the two measured ones.
_VENDOR_OVERSAMPLE = {"Siemens": 2.0, "UIH": 1.33, "GE": 1.2, "Philips": 1.19, "fastMRI": 2.0}
_UIH_NO_OVERSAMPLE = ("umr670", "umr680")  # nx/rx ~ 0.99 on these models
_VENDOR_KMAX = {"Siemens": 5e-3, "UIH": 1e7, "GE": 3e2, "Philips": 2e1}
_FIXED_DATE = 1744584003.0  # header "Created on" date: fixed so reruns are byte-identical

PROFILES = ("", "real")
# The "real" profile: (ny, nx) ranges per file type as measured on the 2025 training release
# (docs/cmrxrecon.md §3.1; nx is the stored readout, oversampling included). Types not listed use
# the cine ranges. The official 20-line ACS then leaves the effective accelerations real masks have.
REAL_SIZES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "cine_sax": ((112, 328), (288, 456)), "cine_lax": ((130, 202), (412, 450)),
    "cine_lax_2ch": ((120, 322), (320, 460)), "cine_lax_3ch": ((120, 322), (320, 460)),
    "cine_lax_4ch": ((120, 322), (320, 460)), "cine_lax_r2ch": ((120, 322), (320, 460)),
    "cine_lvot": ((120, 322), (320, 460)), "cine_rvot": ((120, 322), (320, 460)), "cine_ot": ((120, 322), (320, 460)),
    "lge_sax": ((108, 260), (378, 518)), "lge_lax": ((108, 260), (378, 518)), "lge_lax_2ch": ((108, 260), (378, 518)),
    "lge_lax_3ch": ((108, 260), (378, 518)), "lge_lax_4ch": ((108, 260), (378, 518)),
    "T1map": ((72, 187), (378, 806)), "T1mappost": ((149, 185), (380, 520)), "T2map": ((55, 247), (372, 396)),
    "T2smap": ((98, 163), (418, 510)), "T1rho": ((137, 177), (378, 390)), "perfusion": ((87, 159), (220, 384)),
    "flow2d": ((119, 151), (380, 390)), "T1w": ((98, 324), (512, 518)), "T2w": ((98, 324), (512, 518)),
    "blackblood": ((98, 324), (512, 518)),
}


@dataclass
class SyntheticConfig:
    """Synthetic CMRxRecon-format corpus (defaults: the small CPU corpus, about a minute on 2 cores)."""

    out: str = "data/synthetic"
    profile: str = ""
    """"" (the small CPU corpora, smooth anatomy) or "real": per-file-type matrix sizes of the real 2025
    release (REAL_SIZES; ny_min..nx_max and scale are then ignored) and the phantom's fine anatomy,
    texture and 1.5-pixel edges (shards/phantom.py `detail`). configs/synthetic_real.toml is the
    benchmark corpus."""
    seed: int = 0
    workers: int = 2
    # "Center/Vendor_FieldT_Model" entries; validation must hold >= 1 center and scanner training lacks
    train_scanners: list[str] = field(default_factory=lambda: [
        "Center001/UIH_30T_umr780", "Center002/Siemens_30T_CIMA.X", "Center003/UIH_50T_umrjupiter",
        "Center005/UIH_15T_umr670", "Center006/GE_15T_SIGNAArtist", "Center007/Siemens_15T_Sola",
    ])
    val_scanners: list[str] = field(default_factory=lambda: [
        "Center001/UIH_30T_umr780", "Center004/Siemens_15T_Aera", "Center012/Philips_30T_IngeniaCX",
    ])
    patients_per_scanner: int = 2
    val_patients_per_scanner: int = 1
    files_per_patient: int = 4  # cine_sax + the next file types round-robin; 0 = all 24 types
    val_files_per_patient: int = 4
    real_sizes: list[int] = field(default_factory=list)
    """[ny_min, ny_max, nx_min, nx_max] for every file type of the "real" profile instead of REAL_SIZES
    ([] = REAL_SIZES): a scanner whose matrix is unlike the release's (bench/label_efficiency.py)."""
    ny_min: int = 36  # phase-encode lines (before `scale`); > 20 so the ACS 20 leaves lines to skip
    ny_max: int = 56
    nx_min: int = 60  # readout points incl. oversampling (before `scale`)
    nx_max: int = 110
    scale: float = 1.0  # multiplies matrix sizes; ~4 gives real-like 112-180 x 240-440 for benchmarks
    nz_max: int = 2
    perfusion_frames: int = 50
    coils: int = 10
    noise: float = 0.01  # complex noise std relative to the unit-scale image
    v5_every: int = 10  # every n-th k-space file is written as MATLAB v5 (0: never)
    partial_fourier_every: int = 7  # every n-th file has its DC 2-4 rows off ny//2 (0: never)
    compression: int = 3  # gzip level of the v7.3 files (MATLAB writes level 3)
    patients_2024: int = 2
    files_per_patient_2024: int = 3
    accelerations_2024: list[int] = field(default_factory=lambda: [4, 8, 12, 16, 20, 24])
    fastmri_files: int = 2
    fastmri_slices: int = 3
    fastmri_coils: int = 8

    @classmethod
    def tiny(cls, out: str, seed: int = 0, workers: int = 1) -> "SyntheticConfig":
        """A corpus for a pytest session fixture (a few seconds): one patient per scanner, small
        matrices, still every modality folder, file type, vendor, field strength, v5 file, odd ny,
        off-centre DC file and the TaskR1 held-out center/scanner."""
        return cls(out=str(out), seed=seed, workers=workers, patients_per_scanner=1, val_patients_per_scanner=1,
                   files_per_patient=4, val_files_per_patient=2, ny_min=25, ny_max=32, nx_min=42, nx_max=58,
                   nz_max=1, perfusion_frames=50, v5_every=8, partial_fourier_every=6, compression=1,
                   patients_2024=1, files_per_patient_2024=2, accelerations_2024=[4, 8],
                   fastmri_files=1, fastmri_slices=2)


@dataclass(frozen=True)
class _Job:
    """One k-space file to synthesise (and its masks / undersampled copies)."""

    tree: str  # "train2025" | "val2025" | "train2024" | "fastmri"
    stem: str
    center: str
    scanner: str
    patient: str
    nt: int
    nz: int
    ny: int
    nx: int
    fmt: str  # "v7.3" | "v5"
    dc_shift: int
    seed: int
    anat_seed: int
    val_pattern: str = ""
    val_R: int = 0


def _split_scanner(entry: str) -> tuple[str, str, str, float, str]:
    """'Center001/UIH_30T_umr780' -> (center, scanner, vendor, field_T, model)."""
    center, _, scanner = entry.partition("/")
    vendor, fieldstr, model = scanner.split("_", 2)
    return center, scanner, vendor, int(fieldstr.rstrip("T")) / 10.0, model


def _stable_int(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def _pick_nx(rng: np.random.Generator, lo: int, hi: int) -> int:
    nx = int(rng.integers(lo, hi + 1))
    nx += nx % 2  # real nx is always even
    if nx % 16 == 0:  # ... but rarely a multiple of 16
        nx += 2
    return nx


def _plan(cfg: SyntheticConfig) -> list[_Job]:
    """Every file of the corpus, in a fixed order, with its sizes and seed (main process only)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    s = cfg.scale
    ny_lo, ny_hi = max(14, round(cfg.ny_min * s)), max(14, round(cfg.ny_max * s))
    nx_lo, nx_hi = max(22, round(cfg.nx_min * s)), max(22, round(cfg.nx_max * s))
    jobs: list[_Job] = []

    def make(tree: str, stem: str, center: str, scanner: str, patient: str, nz_max: int) -> None:
        i = len(jobs)
        (y_lo, y_hi), (x_lo, x_hi) = ((ny_lo, ny_hi), (nx_lo, nx_hi)) if cfg.profile != "real" else \
            (tuple(cfg.real_sizes[:2]), tuple(cfg.real_sizes[2:])) if cfg.real_sizes else \
            REAL_SIZES.get(stem, REAL_SIZES["cine_sax"])
        ny = int(rng.integers(y_lo, y_hi + 1))
        if (ny % 2 == 1) != (i % 2 == 0):  # alternate parity: about half the files have an odd ny
            ny = ny + 1 if ny < y_hi else ny - 1
        nx = _pick_nx(rng, x_lo, x_hi)
        if stem in ("cine_lax", "lge_lax"):
            nz = 3  # three views packed in the slice axis
        elif "lax" in stem or stem in ("cine_lvot", "cine_rvot", "cine_ot", "perfusion"):
            nz = 1  # single-view long-axis; perfusion kept to one slice (it has 50 frames)
        else:
            nz = int(rng.integers(1, max(1, nz_max) + 1))
        t1 = 9 if rng.random() < 0.3 else 8
        nt = frames_for(stem, cfg.perfusion_frames, t1 if tree != "train2024" else 9)
        fmt = "v5" if tree in ("train2025", "val2025") and cfg.v5_every and i % cfg.v5_every == cfg.v5_every // 2 else "v7.3"
        dc = 0
        if tree in ("train2025", "val2025") and cfg.partial_fourier_every and i % cfg.partial_fourier_every == 1:
            dc = int(rng.choice([-4, -3, -2, 2, 3, 4]))
        pattern, R = "", 0
        if tree == "val2025":
            pattern = str(rng.choice(PATTERNS_2025))
            R = int(rng.choice(ACCELERATIONS_2025))
        jobs.append(_Job(tree, stem, center, scanner, patient, nt, nz, ny, nx, fmt, dc,
                         _stable_int(cfg.seed, tree, center, scanner, patient, stem),
                         _stable_int(cfg.seed, "anatomy", tree, center, scanner, patient), pattern, R))

    def stems_for(pointer: list[int], count: int, pool: tuple[str, ...]) -> list[str]:
        if count <= 0 or count >= len(pool):
            return list(pool)
        rest = list(pool[1:])
        out = [pool[0]]
        for _ in range(count - 1):
            out.append(rest[pointer[0] % len(rest)])
            pointer[0] += 1
        return out

    ptr = [0]
    for entry in cfg.train_scanners:
        center, scanner, *_ = _split_scanner(entry)
        for p in range(cfg.patients_per_scanner):
            for stem in stems_for(ptr, cfg.files_per_patient, _ROUND_ROBIN_2025):
                make("train2025", stem, center, scanner, f"P{p + 1:03d}", cfg.nz_max)
    ptr = [7]  # start elsewhere in the list so validation does not mirror training
    for entry in cfg.val_scanners:
        center, scanner, *_ = _split_scanner(entry)
        for p in range(cfg.val_patients_per_scanner):
            for stem in stems_for(ptr, cfg.val_files_per_patient, _ROUND_ROBIN_2025):
                make("val2025", stem, center, scanner, f"P{p + 1:03d}", cfg.nz_max)
    ptr = [0]
    for p in range(cfg.patients_2024):
        for stem in stems_for(ptr, cfg.files_per_patient_2024, STEMS_2024):
            make("train2024", stem, "", "Siemens_30T_Vida", f"P{p + 1:03d}", cfg.nz_max)
    for f in range(cfg.fastmri_files):
        jobs.append(_Job("fastmri", "T2w", "", "", f"{f:03d}", 1, cfg.fastmri_slices, 0, 0, "hdf5", 0,
                         _stable_int(cfg.seed, "fastmri", f), _stable_int(cfg.seed, "fastmri-anat", f)))
    return jobs


def _synth_kspace(job: _Job, cfg: SyntheticConfig, vendor: str, model: str, ny: int, nx: int,
                  ncoils: int) -> tuple[np.ndarray, float, int]:
    """Fully sampled complex128 k-space (nt, nz, nc, ny, nx), the oversampling, and the grid ny."""
    rng = np.random.default_rng(job.seed)
    anat = random_anatomy(np.random.default_rng(job.anat_seed))
    os_ = 1.0 if (vendor == "UIH" and model in _UIH_NO_OVERSAMPLE) else _VENDOR_OVERSAMPLE.get(vendor, 1.0)
    ny_grid = ny + 2 * abs(job.dc_shift) + 2 if job.dc_shift else ny
    img = render_images(job.stem, job.nt, job.nz, ny_grid, nx, os_, anat, rng, detail=cfg.profile == "real")
    sens = coil_maps(ncoils, ny_grid, nx, os_, rng)
    k = fft2c(img[:, :, None] * sens[None, None])
    if job.dc_shift:  # keep ny rows with DC at ny//2 + dc_shift (asymmetric ky coverage, not zero-filled)
        start = ny_grid // 2 - (ny // 2 + job.dc_shift)
        k = k[..., start:start + ny, :]
    k += cfg.noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / math.sqrt(2)
    kmax = _VENDOR_KMAX.get(vendor, 1.0) * 10 ** rng.uniform(-0.3, 0.3)
    k *= kmax / np.abs(k).max()
    # Values carry single precision (stored as double, like data converted from single-precision
    # scanner output): realistic, and gzip then finds the zero low mantissa bytes.
    k = k.astype(np.complex64).astype(np.complex128)
    return k, os_, ny_grid


def _info_csv(path: Path, job: _Job, field_t: float, os_: float, ny_grid: int, nx: int) -> None:
    rx = int(round(nx / os_))
    fovx = 360.0
    rows = [("FOVx(mm)", f"{fovx:.1f}"), ("FOVy(mm)", f"{fovx * ny_grid / rx:.1f}"), ("ReconMatrix_X", rx),
            ("ReconMatrix_Y", ny_grid), ("ReadOutOversample", 2), ("SliceThickness", 8), ("SliceNum", job.nz),
            ("FieldStrength", field_t)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("Parameter", "Value"))
    w.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _mask(pattern: str, R: int, nt: int, ny: int, nx: int, seed: int, acs: int | None = None) -> np.ndarray:
    """make_mask, with the seed-independent patterns (Uniform, ktRadial, ktUniform) cached per worker."""
    if pattern == "ktGaussian":
        return make_mask(pattern, R, nt, ny, nx, seed=seed, acs=acs)
    return _deterministic_mask(pattern, R, nt, ny, nx, acs)


@functools.lru_cache(maxsize=256)
def _deterministic_mask(pattern: str, R: int, nt: int, ny: int, nx: int, acs: int | None) -> np.ndarray:
    m = make_mask(pattern, R, nt, ny, nx, acs=acs)
    m.setflags(write=False)
    return m


def _write_kspace(path: Path, key: str, arr: np.ndarray, fmt: str, cfg: SyntheticConfig, precision: str = "float64") -> None:
    if fmt == "v5":
        # uncompressed (a MATLAB `save -v6` file): scipy's zlib runs at level 6, ~10x slower than ours
        write_mat5(path, key, arr, compress=False)
    else:
        write_mat73(path, key, arr, precision=precision, compression=cfg.compression, created=_FIXED_DATE)


def _write_mask(path: Path, mask: np.ndarray, four_d: bool, cfg: SyntheticConfig) -> None:
    # 4-D files (no time axis) have 2-D masks (ny, nx), as in the release
    write_mat73(path, "mask", mask[0] if four_d else mask, compression=cfg.compression, created=_FIXED_DATE)


def _entry(root: Path, path: Path, job: _Job, kind: str, shape: tuple[int, ...], **extra: object) -> dict:
    center = job.center
    vendor = field_t = model = None
    if job.scanner:
        _, _, vendor, field_t, model = _split_scanner(f"{center}/{job.scanner}")
    return {"path": path.relative_to(root).as_posix(), "kind": kind, "tree": job.tree, "stem": job.stem,
            "modality": MODALITY_OF.get(job.stem, ""), "center": center, "scanner": job.scanner, "vendor": vendor,
            "field_T": field_t, "model": model, "patient": job.patient, "shape": list(shape), **extra}


def _run_job(args: tuple[_Job, SyntheticConfig]) -> tuple[list[dict], int]:
    """Synthesise and write one k-space file with its side files; returns index entries and bytes."""
    job, cfg = args
    root = Path(cfg.out)
    entries: list[dict] = []
    if job.tree == "fastmri":
        return _run_fastmri(job, cfg, root)
    center, scanner, vendor, field_t, model = _split_scanner(f"{job.center or 'Center000'}/{job.scanner}")
    four_d = is_four_d(job.stem)
    ncoils = cfg.coils
    k, os_, ny_grid = _synth_kspace(job, cfg, vendor, model, job.ny, job.nx, ncoils)
    if four_d:
        k = k[0]
    tail = Path(job.center, job.scanner, job.patient) if job.center else Path(job.patient)
    mod = MODALITY_OF[job.stem]
    common = dict(format=job.fmt, dc_row=job.ny // 2 + job.dc_shift, oversample=os_, ndim=k.ndim)
    written = []
    mrng = np.random.default_rng(np.random.SeedSequence([job.seed, 2]))
    if job.tree == "train2025":
        base = root / "ChallengeData" / "MultiCoil" / mod / "TrainingSet"
        kpath = base / "FullSample" / tail / f"{job.stem}.mat"
        _write_kspace(kpath, "kspace", k, job.fmt, cfg)
        _info_csv(kpath.with_name(f"{job.stem}_info.csv"), job, field_t, os_, ny_grid, job.nx)
        entries.append(_entry(root, kpath, job, "kspace", k.shape, year=2025, split="train", task="TaskAll", **common))
        written.append(kpath)
        for pattern in PATTERNS_2025:
            for R in ACCELERATIONS_2025:
                m = _mask(pattern, R, job.nt, job.ny, job.nx, int(mrng.integers(2**31)))
                mpath = base / "Mask_TaskAll" / tail / mask_name(job.stem, pattern, R)
                _write_mask(mpath, m, four_d, cfg)
                entries.append(_entry(root, mpath, job, "mask", m.shape[1:] if four_d else m.shape, year=2025,
                                      split="train", task="TaskAll", pattern=pattern, R=R))
                written.append(mpath)
    elif job.tree == "val2025":
        base = root / "ChallengeData_ValSet" / "TaskR1" / "MultiCoil" / mod / "ValidationSet"
        suffix = f"{job.val_pattern}{job.val_R}"
        m = _mask(job.val_pattern, job.val_R, job.nt, job.ny, job.nx, int(mrng.integers(2**31)))
        kus = k * (m[0] if four_d else m[:, None, None])
        upath = base / "UnderSample_TaskR1" / tail / f"{job.stem}_kus_{suffix}.mat"
        mpath = base / "Mask_TaskR1" / tail / f"{job.stem}_mask_{suffix}.mat"
        fpath = base / "FullSample_TaskR1" / tail / f"{job.stem}.mat"
        _write_kspace(upath, "kus", kus, job.fmt, cfg)
        _info_csv(upath.with_name(f"{job.stem}_info.csv"), job, field_t, os_, ny_grid, job.nx)
        _write_mask(mpath, m, four_d, cfg)
        _write_kspace(fpath, "kspace", k, job.fmt, cfg)
        kw = dict(year=2025, split="val", task="TaskR1", pattern=job.val_pattern, R=job.val_R)
        entries += [_entry(root, upath, job, "kus", kus.shape, **kw, **common),
                    _entry(root, mpath, job, "mask", m.shape[1:] if four_d else m.shape, **kw),
                    _entry(root, fpath, job, "reference", k.shape, **kw, **common)]
        written += [upath, mpath, fpath]
    elif job.tree == "train2024":
        base = root / "CMRxRecon2024" / "ChallengeData" / "MultiCoil" / mod / "TrainingSet"
        kpath = base / "FullSample" / tail / f"{job.stem}.mat"
        _write_kspace(kpath, "kspace_full", k, "v7.3", cfg, precision="float32")
        _info_csv(base / "ImgSnapshot" / tail / f"{job.stem}_info.csv", job, field_t, os_, ny_grid, job.nx)
        entries.append(_entry(root, kpath, job, "kspace", k.shape, year=2024, split="train", task="Task2",
                              **common | {"format": "v7.3"}))
        written.append(kpath)
        for R in (4, 8, 10):  # Task 1: 2-D Uniform masks shared by all frames, ACS 16
            m = _mask("Uniform", R, 1, job.ny, job.nx, 0, acs=ACS_2024)
            mpath = base / "Mask_Task1" / tail / mask_name(job.stem, "Uniform", R)
            _write_mask(mpath, m, True, cfg)
            entries.append(_entry(root, mpath, job, "mask", m.shape[1:], year=2024, split="train", task="Task1",
                                  pattern="Uniform", R=R))
            written.append(mpath)
        for pattern in ("ktUniform", "ktGaussian", "ktRadial"):
            for R in cfg.accelerations_2024:
                m = _mask(pattern, R, job.nt, job.ny, job.nx, int(mrng.integers(2**31)), acs=ACS_2024)
                mpath = base / "Mask_Task2" / tail / mask_name(job.stem, pattern, R)
                _write_mask(mpath, m, False, cfg)
                entries.append(_entry(root, mpath, job, "mask", m.shape, year=2024, split="train", task="Task2",
                                      pattern=pattern, R=R))
                written.append(mpath)
    return entries, sum(p.stat().st_size for p in written)


def _run_fastmri(job: _Job, cfg: SyntheticConfig, root: Path) -> tuple[list[dict], int]:
    """A fastMRI-style multi-coil file: kspace complex64 (slices, coils, readout, phase)."""
    rng = np.random.default_rng(job.seed)
    ny = int(round(rng.integers(cfg.ny_min, cfg.ny_max + 1) * cfg.scale))
    nx = 2 * ny + 2 * int(rng.integers(0, 3))  # fastMRI keeps a 2x oversampled readout
    sub = replace(job, nt=1, ny=ny, nx=nx)
    k, _, _ = _synth_kspace(sub, cfg, "fastMRI", "", ny, nx, cfg.fastmri_coils)
    k = (k[0] / np.abs(k).max() * 3e-4).astype(np.complex64)  # fastMRI k-space is ~1e-4..1e-3
    ks = np.ascontiguousarray(k.transpose(0, 1, 3, 2))  # internal (nz, nc, ny, nx) -> fastMRI (slices, coils, readout, phase)
    img = ifft2c(ks)
    rss = np.sqrt((np.abs(img) ** 2).sum(1))
    crop = min(ny, nx)
    r0, c0 = nx // 2 - crop // 2, ny // 2 - crop // 2
    rss = rss[:, r0:r0 + crop, c0:c0 + crop].astype(np.float32)
    header = (f'<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
              f"<encoding><encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize></encodedSpace>"
              f"<reconSpace><matrixSize><x>{crop}</x><y>{crop}</y><z>1</z></matrixSize></reconSpace>"
              f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ny - 1}</maximum>"
              f"<center>{ny // 2}</center></kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>")
    path = root / "fastMRI" / "multicoil_train" / f"file_brain_AXT2_200_{6000000 + int(job.patient):07d}.h5"
    attrs = {"acquisition": "AXT2", "max": float(rss.max()), "norm": float(np.linalg.norm(rss)),
             "patient_id": f"{job.seed:08x}" * 8}
    write_fastmri(path, ks, attrs=attrs, rss=rss, header_xml=header)
    entry = _entry(root, path, job, "fastmri", (1, *k.shape), year=0, split="train", task="", format="hdf5")
    return [entry], path.stat().st_size


def _validate(cfg: SyntheticConfig) -> None:
    if cfg.profile not in PROFILES:
        raise ValueError(f"{cfg.out}: profile must be one of {PROFILES}, got {cfg.profile!r}")
    if round(cfg.ny_min * cfg.scale) < 14 or round(cfg.nx_min * cfg.scale) < 22:
        # the challenge crop keeps round(nx/3) x round(ny/2); SSIM needs >= 7 x 7
        raise ValueError(f"{cfg.out}: ny_min*scale >= 14 and nx_min*scale >= 22 are needed (ranking crop >= 7x7)")
    if cfg.ny_min > cfg.ny_max or cfg.nx_min > cfg.nx_max:
        raise ValueError(f"{cfg.out}: ny_min/nx_min must not exceed ny_max/nx_max")
    if cfg.real_sizes and (len(cfg.real_sizes) != 4 or cfg.real_sizes[0] > cfg.real_sizes[1]
                           or cfg.real_sizes[2] > cfg.real_sizes[3] or cfg.real_sizes[0] < 22 or cfg.real_sizes[2] < 22):
        raise ValueError(f"{cfg.out}: real_sizes must be [ny_min, ny_max, nx_min, nx_max] with min <= max and every "
                         f"size >= 22 (ACS 20 + lines to skip), got {cfg.real_sizes}")
    for entry in cfg.train_scanners + cfg.val_scanners:
        try:
            _split_scanner(entry)
        except ValueError:
            raise ValueError(f"scanner entry {entry!r} is not 'CenterNNN/Vendor_FieldT_Model'") from None


#: config fields that do not change a single byte of the corpus (files are seeded per file)
_NOT_CONTENT = ("out", "workers")


def existing_corpus(cfg: SyntheticConfig) -> bool:
    """Whether `cfg.out` already holds exactly this corpus (same config, every indexed file present).

    An empty or missing folder: False (write it). A folder another config wrote, or that is not a
    corpus of this writer, raises ValueError naming the differences: writing into it would mix two
    corpora (an index listing 10 files with 33 on disk), and anything that reuses a corpus by its
    config would then measure a different corpus than it claims.
    """
    root = Path(cfg.out)
    if not root.exists() or not any(root.iterdir()):
        return False
    recorded = root / "synthetic_config.toml"
    if not recorded.is_file():
        raise ValueError(f"{root}: not empty and not a synthetic corpus (no synthetic_config.toml); "
                         f"choose an empty or new out folder")
    diffs = config_differences(config_to_dict(load_config(SyntheticConfig, recorded)), config_to_dict(cfg),
                               ignore=_NOT_CONTENT)
    if diffs:
        raise ValueError(f"{root}: holds a synthetic corpus written with another config ({'; '.join(diffs[:5])}); "
                         f"choose another out folder or remove this one")
    index = root / "synthetic_index.json"
    if not index.is_file():
        return False   # the same corpus, interrupted: rewriting gives the same bytes
    entries = json.loads(index.read_text())["files"]
    return all((root / e["path"]).is_file() for e in entries)


def write_corpus(cfg: SyntheticConfig) -> Path:
    """Write the whole corpus under cfg.out and return that path (see the module docstring).

    An out folder that already holds this corpus is reused as it is; one holding anything else is
    refused (`existing_corpus`). One writer per folder (launch.outputs.FolderLock).
    """
    _validate(cfg)
    root = Path(cfg.out)
    if not existing_corpus(cfg):   # complete with the same config: reused read-only, no lock (runs share it)
        with FolderLock(root):
            if not existing_corpus(cfg):   # another writer may have finished it meanwhile
                return _write_corpus(cfg, root)
    print(f"{root}: already holds this corpus (same config); reusing it", file=sys.stderr)
    return root


def _write_corpus(cfg: SyntheticConfig, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "synthetic_config.toml")
    jobs = _plan(cfg)
    args = [(j, cfg) for j in jobs]
    entries: list[dict] = []
    nbytes = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="synthetic", unit="file", disable=None)
    # Big files first keeps both workers busy to the end.
    order = sorted(range(len(args)), key=lambda i: -jobs[i].nt * jobs[i].nz * jobs[i].ny * jobs[i].nx)
    args = [args[i] for i in order]

    def consume(res: tuple[list[dict], int]) -> None:
        nonlocal nbytes
        entries.extend(res[0])
        nbytes += res[1]
        bar.update(1)
        bar.set_postfix(MBps=f"{nbytes / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f}")

    if cfg.workers > 1:
        with mp.get_context("fork").Pool(cfg.workers) as pool:
            for res in pool.imap_unordered(_run_job, args, chunksize=1):
                consume(res)
    else:
        for a in args:
            consume(_run_job(a))
    bar.close()
    entries.sort(key=lambda e: e["path"])
    index = {"seed": cfg.seed, "files": entries, "bytes": nbytes}
    write_atomic(root / "synthetic_index.json", json.dumps(index, indent=1))
    return root


def acceleration_table(index: dict) -> list[tuple[str, int, int, float, float, float]]:
    """Effective acceleration (samples / acquired, ACS included) of the corpus's 2025 masks, per
    (pattern, R): rows (pattern, R, masks, mean, min, max), recomputed from each k-space file's size."""
    sizes = [(tuple(e["shape"]), e["stem"]) for e in index["files"]
             if e["kind"] in ("kspace", "reference") and e.get("year") == 2025]
    rows = []
    for pattern in PATTERNS_2025:
        for R in ACCELERATIONS_2025:
            acc = []
            for shape, stem in sizes:
                nt = 1 if len(shape) == 4 else shape[0]
                acc.append(effective_acceleration(_mask(pattern, R, nt, shape[-2], shape[-1], 0)))
            if acc:
                rows.append((pattern, R, len(acc), float(np.mean(acc)), float(np.min(acc)), float(np.max(acc))))
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(SyntheticConfig, argv)
    t0 = time.perf_counter()
    root = write_corpus(cfg)
    index = json.loads((root / "synthetic_index.json").read_text())
    print(f"wrote {len(index['files'])} files, {index['bytes'] / 1e6:.1f} MB to {root} "
          f"in {time.perf_counter() - t0:.1f} s")
    print("effective acceleration (samples / acquired, ACS 20 included) over the 2025 k-space files:")
    print("| pattern | R | files | mean | min | max |\n|---|---|---|---|---|---|")
    for pattern, R, n, mean, lo, hi in acceleration_table(index):
        print(f"| {pattern} | {R} | {n} | {mean:.2f} | {lo:.2f} | {hi:.2f} |")


if __name__ == "__main__":
    main()
