"""Window reads vs whole-sample reads at real sample sizes, the loader alone: ``python bench/window_reads.py``.

A tar of `samples` seeded fully sampled slices of `frames_stored` x 10 coils x `ny` x `nx` (12-frame
cine at a real 2025 matrix by default) is written once; then one-pass eval loaders read it with
`lazy_frames` on (the 3 frames of the window, shards.frames) and off (every frame, the loader before),
the arms taking turns, best of `repeats`. Printed per arm: wall and CPU seconds per sample (CPU: this
process only, workers = 0, so other jobs on a shared machine do not inflate it) and the bytes the
process read (/proc/self/io rchar) per sample, and the ratios. Everything after the tar is written
is the loader's own work: read, decode, window, retrospective mask, normalisation, collate.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.cli import parse_args  # noqa: E402
from launch.outputs import work_folder  # noqa: E402
from shards.loader import LoaderConfig, make_loader  # noqa: E402
from shards.sample import META_KEYS, Sample  # noqa: E402


@dataclass
class WindowConfig:
    """Loader window reads at real sizes."""

    samples: int = 8
    frames_stored: int = 12
    """T of each stored slice (cine: 12; perfusion: 50)"""
    frames: int = 3
    """the loader's window"""
    coils: int = 10
    ny: int = 246
    nx: int = 450
    repeats: int = 3
    seed: int = 0
    work: str = ""
    """folder for the tar ('' = a temporary folder)"""


def write_tar(cfg: WindowConfig, path: Path) -> int:
    """`samples` seeded slices into one tar (atomic: temp name, then rename); returns its size."""
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.frames_stored, cfg.coils, cfg.ny, cfg.nx)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tf:
        for i in range(cfg.samples):
            k = (rng.standard_normal(shape, np.float32) + 1j * rng.standard_normal(shape, np.float32)).astype(np.complex64)
            meta = {key: None for key in META_KEYS} | {
                "key": f"s{i:03d}", "modality": "Cine", "fully_sampled": True, "has_mask": False,
                "has_reference": False, "shape": list(shape), "nz": 1, "slice": 0, "split": "train"}
            for name, data in Sample(key=f"s{i:03d}", kspace=k, meta=meta).to_files().items():
                info = tarfile.TarInfo(f"s{i:03d}.{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path.stat().st_size


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def one_pass(tar: Path, cfg: WindowConfig, lazy: bool) -> tuple[float, float, int, int]:
    """(wall s, CPU s, bytes read, samples) of one eval pass."""
    lc = LoaderConfig(shards=str(tar.parent / "window-*.tar"), mode="eval", workers=0, micro_batch=1, frames=cfg.frames, lazy_frames=lazy)
    r0, c0, t0 = rchar(), time.process_time(), time.perf_counter()
    n = sum(b["kspace"].shape[0] for b in make_loader(lc))
    return time.perf_counter() - t0, time.process_time() - c0, rchar() - r0, n


def run(cfg: WindowConfig, work: Path) -> None:
    tar = work / "window-000.tar"
    size = write_tar(cfg, tar)
    print(f"{cfg.samples} samples of {cfg.frames_stored} x {cfg.coils} x {cfg.ny} x {cfg.nx} complex64 "
          f"({size / cfg.samples / 2**20:.0f} MiB each); window {cfg.frames} frames", flush=True)
    one_pass(tar, cfg, False)                                    # page cache and imports warm
    best: dict[bool, tuple[float, float, int, int]] = {}
    for _ in range(cfg.repeats):
        for lazy in (True, False):
            got = one_pass(tar, cfg, lazy)
            best[lazy] = got if lazy not in best else tuple(min(a, b) for a, b in zip(best[lazy], got))
    print(f"\n| reads | wall ms/sample | CPU ms/sample | MiB read/sample |\n|---|---|---|---|")
    for lazy in (True, False):
        wall, cpu, nbytes, n = best[lazy]
        print(f"| {'window (lazy_frames)' if lazy else 'every frame'} | {1e3 * wall / n:.1f} | {1e3 * cpu / n:.1f} | "
              f"{nbytes / n / 2**20:.1f} |")
    (w1, c1, b1, _), (w0, c0, b0, _) = best[True], best[False]
    print(f"\nwindow / every frame: wall {w1 / w0:.2f}x, CPU {c1 / c0:.2f}x, bytes {b1 / b0:.2f}x "
          f"(best of {cfg.repeats}, arms taking turns; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(WindowConfig, argv, description=__doc__.splitlines()[0])
    with work_folder(cfg.work, prefix="cmrfm-window-") as work:
        run(cfg, work)


if __name__ == "__main__":
    main()
