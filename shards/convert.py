"""Convert a CMRxRecon / fastMRI tree into WebDataset tar shards: ``python -m shards.convert
--set input=DIR --set out=SHARDS``.

One sample per (file, slice) (schema: shards.sample). Output, per split::

    SHARDS/train-000000.tar, train-000001.tar, ...   samples of TrainingSet files (and fastMRI train)
    SHARDS/val-000000.tar, ...                         ValidationSet files (kus + acquired mask + hidden ref)
    SHARDS/test-000000.tar, ...                        TestSet files
    SHARDS/manifest.json                               written last, atomically (shards.manifest)
    SHARDS/convert_config.toml                         the resolved ConvertConfig

Safety: each shard is written as ``*.tar.tmp`` (fsynced) and renamed when complete; the manifest is
replaced only at the very end. A run that fails half-way therefore leaves the previous manifest and
every shard it lists untouched; new shards never reuse an existing file name. A rerun skips the
source files the manifest lists (files that failed are tried again). One converter owns `out` at a
time (launch.outputs.FolderLock: a second one fails at once instead of picking the same shard
names); holding the lock, it removes the `*.tar.tmp` a killed converter left (provably incomplete).
`out` may not be, contain or lie inside `input`.

Exit status (`python -m shards.convert`): 0 every file converted; 3 (EXIT_SKIPPED) done, but files
failed (each named in the output and the manifest's `errors`); 2 a config, path or layout error.

Mixing: the files of each split are put in a seeded random order before planning (`interleave`), so
a shard holds several modalities, centers and patients rather than a run of one (the input order
groups by modality); a file's slices stay together in one shard. Each manifest entry records its
samples per stratum (modality, view, center, vendor, scanner, field, pattern, R ...) so that the
loader can select shards without opening them.

Speed: the files are first planned into shards (whole files, sizes from the file headers), then a process pool (`workers`, default 2 = both cores) writes one shard per task: read
each dataset in one call (trap 15), cut slices, write and hash the tar, rename. No sample data
crosses a process boundary, and the shard contents depend only on the tree.

Bad input: a damaged file, several/no variables, a wrong rank, NaN/Inf, a mask or reference whose
shape does not match the k-space, a layout file that fits no rule: one `errors` entry in the
manifest naming the file (relative to the input root) and the problem; the rest converts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
from tqdm import tqdm

from launch.cli import config_to_dict, dump_config, parse_args
from launch.outputs import EXIT_SKIPPED, EXIT_USAGE, FolderLock, OutputError, check_separate, fsync_dir
from shards.layout import Case, LayoutError, scan
from shards.manifest import STRATUM_FIELDS, Manifest, ManifestError, ShardEntry
from shards.matfile import MatFileError, mat_format, read_kspace, read_mask
from shards.normalise import kspace_scale
from shards.sample import SCHEMA_VERSION, Sample, sample_key

log = logging.getLogger("cmrfm.shards.convert")


@dataclass
class ConvertConfig:
    """Convert a CMRxRecon / fastMRI tree to tar shards."""

    input: str = "data/synthetic"
    """root of the tree (any CMRxRecon 2023/2024/2025 layout, or a folder of fastMRI .h5)"""
    out: str = "out/shards"
    """shard directory (created); manifest.json and convert_config.toml go here"""
    year: int = 0
    """0: infer from the layout; otherwise force (a 2023 FullSample-only tree looks like 2024)"""
    shard_samples: int = 64
    """a shard (whole files only) is closed once it holds this many samples ..."""
    shard_mb: float = 512.0
    """... or once it holds this many MB, whichever comes first"""
    workers: int = 2
    """reader processes (0 or 1: read in this process)"""
    progress: bool = True
    """tqdm bar with files and MB/s"""
    interleave: bool = True
    """shuffle the files (seeded, whole files) before cutting them into shards, so that every shard
    mixes modalities, centers and patients and a small shuffle buffer gives mixed batches; false:
    input (path) order, one modality after another"""
    seed: int = 0
    """seed of the interleaving permutation"""


class ConvertError(RuntimeError):
    """A conversion that cannot start (existing output from another tree or schema)."""


# ------------------------------------------------------------------------------------ reading (workers)


@dataclass
class CaseResult:
    source: str
    samples: list[tuple[str, str, dict[str, bytes]]] = field(default_factory=list)  # (split, key, files)
    error: str | None = None
    read_bytes: int = 0


def _peek_mask_shape(path: Path) -> tuple[int, ...]:
    """Shape (nt, ny, nx) of a mask file from its header only (no decompression)."""
    if mat_format(path) == "v5":
        found = [(n, s) for n, s, _ in scipy.io.whosmat(str(path)) if not n.startswith("__")]
        if len(found) != 1:
            raise MatFileError(path, f"{len(found)} variables; expected one mask")
        shape = tuple(reversed(found[0][1]))
    else:
        with h5py.File(path, "r") as fh:
            keys = [k for k in fh.keys() if not k.startswith("#")]
            if len(keys) != 1:
                raise MatFileError(path, f"{len(keys)} variables {keys}; expected one mask")
            shape = tuple(fh[keys[0]].shape)
    return (1, *shape) if len(shape) == 2 else shape


def _check_mask_shape(kpath: Path, mpath: Path, mask_shape: tuple[int, ...], kshape: tuple[int, ...]) -> None:
    nt, _, _, ny, nx = kshape
    if len(mask_shape) != 3 or tuple(mask_shape[1:]) != (ny, nx) or mask_shape[0] not in (1, nt):
        raise MatFileError(kpath, f"mask shape {tuple(mask_shape)} does not match k-space (nt, ny, nx) = "
                                  f"{(nt, ny, nx)} (mask file {mpath})")


def _meta(case: Case, z: int, nz: int, shape: tuple[int, ...], key: str, scale: float,
          has_mask: bool, has_ref: bool, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": key, "year": case.year, "split": case.split, "task": case.task, "set": case.set,
        "center": case.center, "scanner": case.scanner, "vendor": case.vendor, "field_T": case.field_T,
        "model": case.model, "patient": case.patient, "modality": case.modality, "file": case.file,
        "view": case.view, "slice": z, "nz": nz, "shape": list(shape), "pattern": case.pattern, "R": case.R,
        "source": case.source, "scale": scale, "fully_sampled": case.set == "FullSample",
        "has_mask": has_mask, "has_reference": has_ref, "info": case.info, **extra,
    }


def convert_case(case: Case) -> CaseResult:
    """Read one file (+ its mask and reference) and cut it into per-slice samples.

    Never raises for bad input: the problem is returned in `CaseResult.error`.
    """
    result = CaseResult(source=case.source)
    try:
        kspace = read_kspace(case.kspace_path)          # complex64 (nt, nz, nc, ny, nx), finite, rank checked
        result.read_bytes = kspace.nbytes
        mask, ref, extra = None, None, {}
        if case.set == "FullSample":
            # the Mask_TaskAll set: only checked (header), the loader draws the same families on the fly
            for m in case.mask_paths:
                _check_mask_shape(case.kspace_path, m, _peek_mask_shape(m), kspace.shape)
            extra["task_masks"] = [m.stem.rsplit("_mask_", 1)[-1] for m in case.mask_paths]
        else:
            if case.mask_paths:
                mask = read_mask(case.mask_paths[0])
                _check_mask_shape(case.kspace_path, case.mask_paths[0], mask.shape, kspace.shape)
                extra["mask_source"] = "file"
            else:
                # no mask file: the acquired lines are the non-zero ones of kus (all coils and slices)
                mask = (np.abs(kspace).sum(axis=(1, 2)) > 0).astype(np.float32)
                extra["mask_source"] = "derived"
            if case.reference_path is not None:
                ref = read_kspace(case.reference_path)
                if ref.shape != kspace.shape:
                    raise MatFileError(case.kspace_path, f"reference shape {ref.shape} does not match k-space "
                                                         f"{kspace.shape} (reference file {case.reference_path})")
                result.read_bytes += ref.nbytes
        nt, nz = kspace.shape[:2]
        for z in range(nz):
            k = np.ascontiguousarray(kspace[:, z])                              # (T, C, Y, X)
            key = sample_key(case.year, case.split, case.task, case.set, case.center, case.scanner,
                             case.patient, case.stem, z)
            # meta "scale": a reference value, kspace_scale of the FIRST frame as stored (one frame keeps
            # conversion near read speed); the loader computes the scale of every window it builds
            scale = kspace_scale(k[:1], None if mask is None else mask[:1])
            sample = Sample(key=key, kspace=k, mask=mask,
                            ref=None if ref is None else np.ascontiguousarray(ref[:, z]),
                            meta=_meta(case, z, nz, k.shape, key, scale, mask is not None, ref is not None, extra))
            result.samples.append((case.split, key, sample.to_files()))
    except MatFileError as exc:
        result.error, result.samples = str(exc), []
    except (OSError, ValueError, MemoryError) as exc:   # anything else a damaged file can cause
        result.error, result.samples = f"{case.kspace_path}: {type(exc).__name__}: {exc}", []
    return result


# ------------------------------------------------------------------------------------ writing (main)


class _HashingFile:
    """Write-through file wrapper that hashes and counts what passes (no second read for sha256)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


class ShardSink:
    """Writes one shard `<out>/<name>`: `<name>.tmp` while open, fsynced and renamed by `close()`."""

    def __init__(self, out: Path, name: str, split: str) -> None:
        self.out, self.name, self.split = out, name, split
        self.entry: ShardEntry | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        if self._tar is None:
            self._f = open(self.out / (self.name + ".tmp"), "wb")
            self._hf = _HashingFile(self._f)
            self._tar = tarfile.open(fileobj=self._hf, mode="w", format=tarfile.PAX_FORMAT,
                                     copybufsize=1 << 22)   # big copies: few write/hash calls
        for member, data in files.items():
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644   # fixed mtime: reproducible sha256
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def abort(self) -> None:
        """Drop the incomplete shard: its .tmp is removed."""
        if self._tar is not None:
            self._f.close()
            (self.out / (self.name + ".tmp")).unlink(missing_ok=True)
            self._tar = None

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.out / (self.name + ".tmp"), self.out / self.name)
        fsync_dir(self.out)   # the rename itself is durable before the manifest can list the shard
        self.entry = ShardEntry(name=self.name, split=self.split, samples=self._count, bytes=self._hf.n,
                                sha256=self._hf.h.hexdigest())
        self._tar = None


def _next_index(out: Path, split: str) -> int:
    """First shard number not used by any file in `out` (listed or stray): never overwrite."""
    used = [int(m[1]) for p in out.iterdir() if (m := re.match(rf"^{split}-(\d+)\.tar(\.tmp)?$", p.name))]
    return max(used, default=-1) + 1


def _peek_kspace(path: Path) -> tuple[int, int]:
    """(slices, bytes as complex64) of a k-space file from its header; (1, 0) when unreadable (the
    worker that reads it reports the problem)."""
    try:
        if mat_format(path) == "v5":
            shape = tuple(reversed(next(s for n, s, _ in scipy.io.whosmat(str(path)) if not n.startswith("__"))))
        else:
            with h5py.File(path, "r") as fh:
                keys = [k for k in fh.keys() if not k.startswith("#")]
                shape = tuple(fh[keys[0]].shape)
            if path.suffix == ".h5":                       # fastMRI: (slices, coils, readout, phase)
                shape = (1, *shape)
    except (MatFileError, OSError, ValueError, IndexError, StopIteration):
        return 1, 0
    nz = shape[0] if len(shape) == 4 else shape[1] if len(shape) == 5 else 1
    return max(nz, 1), 8 * int(np.prod(shape, dtype=np.int64))


@dataclass
class ShardTask:
    """One shard to write: whole files, in planned order (a file never spans two shards)."""

    out: str
    name: str
    split: str
    cases: list[Case]


@dataclass
class ShardResult:
    entry: ShardEntry | None                       # None when every file of the task failed
    sources: dict[str, dict[str, Any]]
    errors: list[dict[str, str]]
    read_bytes: int
    samples: int


def interleaved(cases: list[Case], seed: int) -> list[Case]:
    """The cases in a seeded random order that depends only on their source paths."""
    ordered = sorted(cases, key=lambda c: c.source)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def stratum(case: Case) -> dict[str, Any]:
    """The manifest stratum (shards.manifest.STRATUM_FIELDS) every sample of a file belongs to."""
    return {name: getattr(case, name) for name in STRATUM_FIELDS}


def plan_shards(cases: list[Case], out: Path, cfg: ConvertConfig) -> list[ShardTask]:
    """Group files into shards per split, in seeded interleaved order (or input order): a shard is
    closed once it holds `shard_samples` samples or `shard_mb` MB (estimated from the file headers),
    so the shard contents depend only on the tree, never on which worker finishes first."""
    if cfg.interleave:
        cases = interleaved(cases, cfg.seed)
    tasks: list[ShardTask] = []
    current: dict[str, tuple[ShardTask, int, int]] = {}
    index = {}
    for case in cases:
        nz, nbytes = _peek_kspace(case.kspace_path)
        if case.reference_path is not None:
            nbytes *= 2
        if case.split not in current:
            index.setdefault(case.split, _next_index(out, case.split))
            task = ShardTask(str(out), f"{case.split}-{index[case.split]:06d}.tar", case.split, [])
            index[case.split] += 1
            tasks.append(task)
            current[case.split] = (task, 0, 0)
        task, n, b = current[case.split]
        task.cases.append(case)
        n, b = n + nz, b + nbytes
        if n >= cfg.shard_samples or b >= cfg.shard_mb * 2**20:
            del current[case.split]
        else:
            current[case.split] = (task, n, b)
    return tasks


def convert_shard(task: ShardTask) -> ShardResult:
    """Read the task's files (in this worker) and write its shard: `.tar.tmp`, then renamed.
    Bad files become error entries; an exception while writing removes the partial shard."""
    sink = ShardSink(Path(task.out), task.name, task.split)
    sources, errors, read_bytes, samples, strata = {}, [], 0, 0, []
    try:
        for case in task.cases:
            res = convert_case(case)
            read_bytes += res.read_bytes
            if res.error is not None:
                log.warning("conversion error: %s", res.error)
                errors.append({"source": res.source, "problem": res.error})
                continue
            for _, key, files in res.samples:
                sink.add(key, files)
            samples += len(res.samples)
            record = stratum(case)
            have = next((s for s in strata if all(s[k] == v for k, v in record.items())), None)
            if have is None:
                strata.append(have := dict(record, samples=0))
            have["samples"] += len(res.samples)
            sources[res.source] = {"samples": len(res.samples), "split": case.split}
        sink.close()
        if sink.entry is not None:
            sink.entry.strata = strata
    except BaseException:
        sink.abort()
        raise
    return ShardResult(sink.entry, sources, errors, read_bytes, samples)


def _run_tasks(tasks: list[ShardTask], workers: int):
    if workers <= 1 or len(tasks) <= 1:
        yield from map(convert_shard, tasks)
        return
    # fork: workers inherit the imported modules; results come back in plan order
    with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(convert_shard, tasks, chunksize=1)


def _duplicates(cases: list[Case], root: str) -> tuple[list[Case], list[dict[str, str]]]:
    """Trap 16 guard: two files that would give the same sample keys (the later one is an error)."""
    seen, keep, errors = {}, [], []
    for c in cases:
        ident = sample_key(c.year, c.split, c.task, c.set, c.center, c.scanner, c.patient, c.stem, 0)
        if ident in seen:
            errors.append({"source": c.source, "problem": f"{root}/{c.source}: its sample keys ({ident}) "
                                                         f"are already produced by {seen[ident]}"})
        else:
            seen[ident] = c.source
            keep.append(c)
    return keep, errors


def convert(cfg: ConvertConfig) -> Manifest:
    """Convert `cfg.input` into shards under `cfg.out`; return the manifest written last."""
    check_separate(cfg.input, [cfg.out])
    found = scan(cfg.input, cfg.year or None)          # an empty/unrecognised tree fails before any write
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        for stale in sorted(out.glob("*.tar.tmp")):    # a killed converter's shard: never listed, never complete
            log.warning("removing %s: an incomplete shard of an interrupted conversion", stale)
            stale.unlink()
        return _convert_locked(cfg, found, out)


def _convert_locked(cfg: ConvertConfig, found: Any, out: Path) -> Manifest:
    root = str(Path(cfg.input).resolve())
    old = Manifest.read_if_exists(out)
    if old is not None and old.schema_version != SCHEMA_VERSION:
        raise ManifestError(f"{out}: manifest has schema {old.schema_version}, this code writes {SCHEMA_VERSION}")
    if old is not None and old.input != root:
        raise ConvertError(f"{out}: holds shards of {old.input}, not of {root}; use another out folder")
    old = old or Manifest(schema_version=SCHEMA_VERSION, input=root)
    todo, errors = _duplicates([c for c in found.cases if c.source not in old.sources], root)
    errors += [{"source": s, "problem": f"{root}/{s}: {why}"} for s, why in found.ignored]
    tasks = plan_shards(todo, out, cfg)
    sources, new = dict(old.sources), []
    t0, nbytes, nsamples = time.perf_counter(), 0, 0
    bar = tqdm(total=len(todo), unit="file", desc="convert", disable=not cfg.progress)
    try:
        for task, res in zip(tasks, _run_tasks(tasks, cfg.workers)):
            bar.update(len(task.cases))
            nbytes, nsamples = nbytes + res.read_bytes, nsamples + res.samples
            errors += res.errors
            sources.update(res.sources)
            if res.entry is not None:
                new.append(res.entry)
            bar.set_postfix(MBps=f"{nbytes / 2**20 / max(time.perf_counter() - t0, 1e-9):.1f}", samples=nsamples)
    finally:
        bar.close()
    manifest = Manifest(schema_version=SCHEMA_VERSION, input=root, shards=old.shards + new, sources=sources,
                        errors=errors, config=config_to_dict(cfg))
    dump_config(cfg, out / "convert_config.toml")
    manifest.write(out)
    log.info("converted %d files into %d samples, %d new shards, %d errors",
             len(sources) - len(old.sources), nsamples, len(new), len(errors))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all converted, 3 (EXIT_SKIPPED) some files failed, 2 (EXIT_USAGE) nothing done."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(ConvertConfig, argv, description=__doc__.splitlines()[0])
    try:
        manifest = convert(cfg)
    except (LayoutError, ConvertError, ManifestError, OutputError) as exc:
        print(f"convert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for e in manifest.errors:
        print(f"error: {e['problem']}")
    print(f"{cfg.out}: {len(manifest.shards)} shards, {manifest.samples()} samples "
          f"({', '.join(f'{s}: {manifest.samples(s)}' for s in sorted({e.split for e in manifest.shards}))}), "
          f"{len(manifest.errors)} errors")
    return EXIT_SKIPPED if manifest.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
