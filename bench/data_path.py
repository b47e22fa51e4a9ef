"""Benchmark of the data path, measured side by side in one run: ``python bench/data_path.py``.

    P1  loader samples/s  /  the official tutorial's way of getting the same slices: for every
        slice, h5py-open the .mat, read the whole key, build complex, pick [:, slice]   (goal >= 20x)
    P2  loader samples/s  /  plain iteration over the same tar files, no decoding        (goal >= 0.5x)
    P3  conversion wall time  /  a plain h5py read (one call per dataset) of the same .mat (goal <= 1.5x)
    P6  one fine-tuning pass over one contrast (`select_modality`): the loader with `data.select`
        (other samples skipped from meta.json, never decoded) vs decoding every sample and dropping
        the others afterwards (what fine-tuning did before selection), selected samples/s

Real sample sizes (10 coils x 162-328 x 288-518): `--set scale=4.5` (the default matrices x 4.5), or
`--set profile=real` (shards.synthetic's per-file-type sizes of the 2025 release).

The corpus is shards.synthetic at a benchmark `scale` (real-like matrix sizes, MATLAB-like gzip
chunks spanning all leading axes, trap 15), restricted to its 2025 training tree and written as
v7.3 only (v5_every = 0) so that "plain h5py" can read every file. Every timed pass reads files that
are already in the page cache (each input is read once before timing), so the ratios compare CPU
work, not the disk. The loader runs as training would: train mode, `workers` DataLoader processes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.cli import load_config, parse_args  # noqa: E402
from shards.convert import ConvertConfig, convert  # noqa: E402
from shards.layout import find_cases  # noqa: E402
from shards.loader import LoaderConfig, make_loader  # noqa: E402
from shards.manifest import Manifest  # noqa: E402
from shards.synthetic import SyntheticConfig, write_corpus  # noqa: E402


@dataclass
class BenchConfig:
    """Data-path benchmark (P1-P3)."""

    work: str = ""
    """folder for the corpus and shards ('' = a fresh temporary folder, removed afterwards)"""
    scale: float = 2.0
    """SyntheticConfig.scale: 2 gives ~56-90 x 120-220 matrices (real: 112-328 x 288-456)"""
    files_per_patient: int = 3
    patients_per_scanner: int = 1
    nz_max: int = 8
    """slices per file (real cine_sax: up to 17); the tutorial re-reads the whole file per slice"""
    workers: int = 2
    """conversion processes and loader DataLoader workers (the machine has 2 cores)"""
    micro_batch: int = 2
    frames: int = 3
    shard_samples: int = 16
    repeats: int = 2
    """each timing is the best of this many runs"""
    loader_samples: int = 400
    """samples drawn per timed loader run (several epochs: worker start-up is included, amortised)"""
    profile: str = ""
    """SyntheticConfig.profile ("real": the release's matrix sizes per file type; scale is then ignored)"""
    select_modality: str = "Cine"
    """P6: the contrast a selective fine-tuning pass reads"""


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def tutorial_reads(files: list[tuple[Path, int]]) -> int:
    """The official tutorial per slice: open, read the whole single key, complex, pick [:, slice]."""
    n = 0
    for path, nz in files:
        for z in range(nz):
            with h5py.File(path, "r") as fh:
                (key,) = list(fh.keys())
                raw = fh[key][()]
            kspace = raw["real"] + 1j * raw["imag"]
            _ = np.ascontiguousarray(kspace[z] if kspace.ndim == 4 else kspace[:, z])
            n += 1
    return n


def plain_h5py_read(paths: list[Path]) -> int:
    """Floor for conversion: every dataset read once, in one call, nothing else."""
    total = 0
    for p in paths:
        with h5py.File(p, "r") as fh:
            for k in fh.keys():
                total += fh[k][()].nbytes
    return total


def plain_tar_iteration(shards: list[Path]) -> int:
    """Floor for the loader: read every member's bytes, group by key, no decoding."""
    n, last = 0, None
    for s in shards:
        with tarfile.open(s, "r|") as tf:
            for m in tf:
                _ = tf.extractfile(m).read()
                key = m.name.split(".", 1)[0]
                if key != last:
                    n, last = n + 1, key
    return n


def loader_samples(cfg: LoaderConfig, n: int) -> int:
    got = 0
    for batch in make_loader(cfg):
        got += batch["kspace"].shape[0]
        if got >= n:
            break
    return got


def one_pass(cfg: LoaderConfig, keep) -> int:
    """Samples of one eval pass that `keep(meta)` accepts (all of them are decoded and prepared)."""
    return sum(1 for batch in make_loader(cfg) for m in batch["meta"] if keep(m))


def run(cfg: BenchConfig, work: Path) -> None:
    syn = SyntheticConfig(out=str(work / "corpus"), scale=cfg.scale, profile=cfg.profile, workers=cfg.workers, v5_every=0,
                          files_per_patient=cfg.files_per_patient, patients_per_scanner=cfg.patients_per_scanner,
                          nz_max=cfg.nz_max, val_patients_per_scanner=0, patients_2024=0, fastmri_files=0)
    t0 = time.perf_counter()
    corpus = Path(syn.out)
    same = (corpus / "synthetic_index.json").exists() and \
        load_config(SyntheticConfig, corpus / "synthetic_config.toml") == syn
    root = (corpus if same else Path(write_corpus(syn))) / "ChallengeData"   # a kept --set work= corpus is reused
    print(f"corpus: {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    cases = find_cases(root)
    with_nz = []
    for c in cases:
        with h5py.File(c.kspace_path, "r") as fh:
            (key,) = list(fh.keys())
            shape = fh[key].shape
        with_nz.append((c.kspace_path, shape[0] if len(shape) == 4 else shape[1]))   # 4-D: (nz, nc, ny, nx)
    n_samples = sum(nz for _, nz in with_nz)
    mat_paths = [p for p, _ in with_nz]
    mb = sum(p.stat().st_size for p in mat_paths) / 2**20
    print(f"{len(cases)} k-space files ({mb:.0f} MB on disk), {n_samples} slices", flush=True)
    plain_h5py_read(mat_paths)                                   # page cache warm

    # P3: conversion vs a plain read of the same files
    t_read, _ = _best(lambda: plain_h5py_read(mat_paths), cfg.repeats)
    outs = iter(range(100))

    def convert_once(workers: int) -> Manifest:
        out = work / f"shards{next(outs)}"
        shutil.rmtree(out, ignore_errors=True)                  # a fresh conversion, not a rerun
        return convert(ConvertConfig(input=str(root), out=str(out), workers=workers,
                                     shard_samples=cfg.shard_samples, progress=False))

    t_conv, manifest = _best(lambda: convert_once(cfg.workers), cfg.repeats)
    t_conv1, _ = _best(lambda: convert_once(1), cfg.repeats)
    shard_dir = work / "shards0"
    shards = Manifest.read(shard_dir).shard_paths(shard_dir, "train")
    assert manifest.errors == [] and manifest.samples() == n_samples, manifest.errors

    # P1 / P2: loader vs tutorial reads and vs plain tar iteration (loader with and without workers:
    # on a busy 2-core machine the worker processes compete with everything else)
    n_load = max(cfg.loader_samples, n_samples)
    rates = {}
    for workers in sorted({0, cfg.workers}):
        lcfg = LoaderConfig(shards=str(shard_dir), split="train", mode="train", workers=workers,
                            micro_batch=cfg.micro_batch, frames=cfg.frames)
        loader_samples(lcfg, n_samples)                          # page cache warm
        t_load, got = _best(lambda: loader_samples(lcfg, n_load), cfg.repeats)
        rates[workers] = got / t_load
    # P6: one pass over one contrast, selected before decoding vs decoded and dropped
    want = cfg.select_modality.lower()
    base = dict(shards=str(shard_dir), split="train", mode="eval", workers=cfg.workers,
                micro_batch=cfg.micro_batch, frames=cfg.frames)
    t_drop, n_drop = _best(lambda: one_pass(LoaderConfig(**base), lambda m: m["modality"].lower() == want),
                           cfg.repeats)
    t_sel, n_sel = _best(lambda: one_pass(LoaderConfig(**base, select={"modality": [want]}), lambda m: True),
                         cfg.repeats)
    assert n_sel == n_drop > 0, (n_sel, n_drop)
    t_tar, n_tar = _best(lambda: plain_tar_iteration(shards), cfg.repeats)
    t_tut, n_tut = _best(lambda: tutorial_reads(with_nz), 1)
    tar_rate, tut_rate = n_tar / t_tar, n_tut / t_tut

    print()
    print(f"{'':4} {'measure':58} {'value':>12} {'baseline':>12} {'ratio':>8}  goal")
    for workers, rate in rates.items():
        print(f"{'P1':4} {f'loader ({workers} workers) samples/s vs tutorial per-slice h5py reads':58} {rate:12.1f} "
              f"{tut_rate:12.2f} {rate / tut_rate:7.1f}x  >= 20x")
    for workers, rate in rates.items():
        print(f"{'P2':4} {f'loader ({workers} workers) samples/s vs plain tar iteration':58} {rate:12.1f} "
              f"{tar_rate:12.1f} {rate / tar_rate:7.2f}x  >= 0.5x")
    print(f"{'P3':4} {f'conversion s ({cfg.workers} workers) vs plain h5py read s (1 process)':58} {t_conv:12.2f} "
          f"{t_read:12.2f} {t_conv / t_read:7.2f}x  <= 1.5x")
    print(f"{'P3':4} {'conversion s (1 worker) vs plain h5py read s (1 process)':58} {t_conv1:12.2f} {t_read:12.2f} "
          f"{t_conv1 / t_read:7.2f}x  <= 1.5x")
    print(f"{'P6':4} {f'{cfg.select_modality} pass, selected samples/s: data.select vs decode-and-drop':58} "
          f"{n_sel / t_sel:12.1f} {n_drop / t_drop:12.1f} {t_drop / t_sel:7.2f}x  "
          f"({n_sel} of {n_samples} samples; {t_sel:.2f} s vs {t_drop:.2f} s)")
    print(f"\n{n_samples} samples of ({cfg.frames} frames x 10 coils x Y x X) per epoch, {n_load} per loader run; "
          f"micro_batch {cfg.micro_batch}; {len(shards)} shards; load average {os.getloadavg()[0]:.1f} "
          f"(other processes share the {os.cpu_count()} cores)")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(BenchConfig, argv, description=__doc__.splitlines()[0])
    if cfg.work:
        Path(cfg.work).mkdir(parents=True, exist_ok=True)
        run(cfg, Path(cfg.work))
    else:
        with tempfile.TemporaryDirectory(prefix="cmrfm-bench-") as tmp:
            run(cfg, Path(tmp))


if __name__ == "__main__":
    main()
