"""Classical reconstructions a user would otherwise reach for: zero-filled RSS, ESPIRiT + CG-SENSE,
ESPIRiT + L1-wavelet compressed sensing (sigpy), per 2-D frame.

Conventions (docs/design.md §2): k-space (T, C, Y, X) complex64, mask (T, Y, X) float32 {0, 1}, centred
orthonormal FFT `fftshift(fft2(ifftshift(.)))`. sigpy's `sp.fft/sp.ifft` use exactly that centring
(ifftshift -> fft -> fftshift, "ortho"), odd sizes included (checked in tests/test_classical.py), so
its operators are used as they are.

Sensitivities: one ESPIRiT calibration per slice from the frame-averaged k-space (every 2025 mask
has the same fully sampled 20-line / 20x20 ACS in each frame, and averaging the frames lowers the
noise of the calibration), `calib_width=20`. The data are divided by a scale before the solve so
`lamda` means the same on UIH and Siemens data (whose raw scales differ by ~1e9), then multiplied back.

`python -m finetune.classical --set input=<validation tree> --set out=<dir> [--set classical.method=sense]`
writes a submission tree of img4ranking files (the baseline column of `finetune.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import sigpy as sp
import sigpy.mri.app as mri_app

from challenge.ranking import crop_selected, select_frames, select_slices
from finetune.settings import ClassicalConfig, ReconstructConfig
from shards.fft import ifft2c


def _check(kspace: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(kspace)
    m = np.asarray(mask, dtype=np.float32)
    if k.ndim != 4:
        raise ValueError(f"k-space must be (T, C, Y, X), got {k.shape}")
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[-2:] != k.shape[-2:] or m.shape[0] not in (1, k.shape[0]):
        raise ValueError(f"mask {m.shape} does not fit k-space {k.shape} (expected (T, Y, X))")
    return k.astype(np.complex64, copy=False), np.broadcast_to(m, (k.shape[0],) + m.shape[1:])


def zero_filled(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero-filled RSS: (T, C, Y, X) k-space (zeros where unsampled) -> (T, Y, X) complex64 (real >= 0)."""
    k, m = _check(kspace, mask)
    img = ifft2c(k * m[:, None])
    return np.sqrt(np.sum(np.abs(img) ** 2, axis=1)).astype(np.complex64)


def espirit_maps(
    kspace: np.ndarray, mask: np.ndarray, calib_width: int = 20, thresh: float = 0.02, crop: float = 0.95
) -> np.ndarray:
    """ESPIRiT sensitivities (C, Y, X) from the frame-averaged k-space of one slice (T, C, Y, X)."""
    k, m = _check(kspace, mask)
    counts = m.sum(axis=0)  # (Y, X): how many frames sampled each point
    avg = (k * m[:, None]).sum(axis=0) / np.maximum(counts, 1)[None]
    width = int(min(calib_width, k.shape[-2], k.shape[-1]))
    return mri_app.EspiritCalib(
        avg.astype(np.complex64), calib_width=width, thresh=thresh, crop=crop, show_pbar=False,
        device=sp.cpu_device,
    ).run()


def _scale(kspace: np.ndarray, mask: np.ndarray) -> float:
    """Robust magnitude scale of the zero-filled image (99th percentile), 1 if the data are all zero."""
    zf = np.abs(zero_filled(kspace, mask))
    s = float(np.percentile(zf, 99))
    return s if s > 0 else 1.0


def sense(
    kspace: np.ndarray, mask: np.ndarray, lamda: float = 0.01, max_iter: int = 30,
    calib_width: int = 20, maps: np.ndarray | None = None,
) -> np.ndarray:
    """ESPIRiT + CG-SENSE (L2-regularised), frame by frame: (T, C, Y, X) -> (T, Y, X) complex64."""
    return _per_frame(mri_app.SenseRecon, kspace, mask, lamda, max_iter, calib_width, maps)


def l1_wavelet(
    kspace: np.ndarray, mask: np.ndarray, lamda: float = 0.005, max_iter: int = 50,
    calib_width: int = 20, maps: np.ndarray | None = None,
) -> np.ndarray:
    """ESPIRiT + L1-wavelet compressed sensing, frame by frame: (T, C, Y, X) -> (T, Y, X) complex64."""
    return _per_frame(mri_app.L1WaveletRecon, kspace, mask, lamda, max_iter, calib_width, maps)


def _per_frame(app: type, kspace: np.ndarray, mask: np.ndarray, lamda: float, max_iter: int,
               calib_width: int, maps: np.ndarray | None) -> np.ndarray:
    """Run the sigpy app `app` on each frame with shared ESPIRiT maps, on data divided by `_scale` so
    that `lamda` means the same for every vendor; the scale is multiplied back."""
    k, m = _check(kspace, mask)
    mps = espirit_maps(k, m, calib_width) if maps is None else maps
    scale = _scale(k, m)
    out = np.zeros((k.shape[0],) + k.shape[-2:], dtype=np.complex64)
    for t in range(k.shape[0]):
        y = (k[t] * m[t][None]) / scale
        out[t] = app(y, mps, lamda=lamda, weights=m[t], max_iter=max_iter, show_pbar=False,
                     device=sp.cpu_device).run()
    return out * scale


def reconstruct_slice(kspace: np.ndarray, mask: np.ndarray, cfg: ClassicalConfig) -> np.ndarray:
    """The baseline `cfg.method` on one slice: (T, C, Y, X) -> (T, Y, X) complex64."""
    if cfg.method == "zero_filled":
        return zero_filled(kspace, mask)
    if cfg.method in ("sense", "l1_wavelet"):
        maps = espirit_maps(kspace, mask, cfg.calib_width, cfg.espirit_thresh, cfg.espirit_crop)
        fn = sense if cfg.method == "sense" else l1_wavelet
        return fn(kspace, mask, lamda=cfg.lamda, max_iter=cfg.max_iter, calib_width=cfg.calib_width, maps=maps)
    raise ValueError(f"classical.method must be zero_filled, sense or l1_wavelet, got {cfg.method!r}")


REPORT = "classical_report.json"


def reconstruct_tree(cfg: ReconstructConfig, files: list[Path] | None = None, skipped: list[str] = ()) -> list[str]:
    """Reconstruct every `*_kus_*.mat` under `cfg.input` (or the given `files`) into a submission tree
    under `cfg.out`, written under a staging name and swapped in whole (launch.outputs.replaced_tree:
    no stale file of a previous run survives).

    Only the slices and frames that img4ranking keeps are reconstructed (all frames of those slices
    are not needed: frames are solved independently). Returns the problems met, one line per file
    (and per input-tree entry that could not be walked); every other file is still written.
    """
    from tqdm import tqdm

    from challenge.submission import SubmissionError, mask_path, parse_kus_path, save_img4ranking, submission_path
    from launch.outputs import replaced_tree
    from launch.trees import find_files
    from shards.matfile import MatFileError, read_kspace, read_mask

    root = Path(cfg.input)
    if files is None:
        found, skipped = find_files(root, "*_kus_*.mat")
        files = [p for p in found if not cfg.task or cfg.task in p.parts]
    problems: list[str] = [f"{s} (input tree)" for s in skipped]
    t0, n_slices = time.perf_counter(), 0
    with replaced_tree(Path(cfg.out), REPORT) as stage:
        bar = tqdm(files, desc=f"classical:{cfg.classical.method}", disable=not cfg.progress, unit="file")
        for path in bar:
            try:
                case = parse_kus_path(path)
                mpath = mask_path(path)
                if not mpath.exists():
                    raise SubmissionError(path, f"no matching mask (looked for {mpath})")
                k = read_kspace(path)  # (nt, nz, nc, ny, nx)
                m = read_mask(mpath)  # (nt, ny, nx)
                if m.shape[-2:] != k.shape[-2:]:
                    raise SubmissionError(path, f"mask {m.shape} does not fit k-space {k.shape}")
                frames, slices = select_frames(k.shape[0], case.stem), select_slices(k.shape[1])
                mt = m if m.shape[0] == 1 else m[frames]
                img = np.zeros((len(frames), len(slices)) + k.shape[-2:], dtype=np.complex64)
                for j, z in enumerate(slices):
                    img[:, j] = reconstruct_slice(k[frames, z], mt, cfg.classical)
                    n_slices += 1
                save_img4ranking(submission_path(path, stage), crop_selected(img))
            except (SubmissionError, MatFileError, ValueError, OSError) as exc:
                problems.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
                print(f"[classical] skipped {problems[-1]}", file=sys.stderr)
            bar.set_postfix(slices_per_s=f"{n_slices / max(time.perf_counter() - t0, 1e-9):.2f}")
        (stage / REPORT).write_text(json.dumps({"input": str(root), "out": str(cfg.out), "method": cfg.classical.method,
                                                "files": len(files), "errors": problems}, indent=2) + "\n")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Exit status as finetune.reconstruct: 0 all written, 3 inputs skipped, 2 a usage error."""
    from finetune.reconstruct import CLASSICAL_METHODS, ReconstructError, validate
    from launch.cli import parse_args
    from launch.outputs import EXIT_SKIPPED, EXIT_USAGE, OutputError

    cfg = parse_args(ReconstructConfig, argv, description="classical baseline -> submission tree")
    try:
        if cfg.classical.method not in CLASSICAL_METHODS:
            raise ReconstructError("classical.method", f"unknown method {cfg.classical.method!r}; expected one of "
                                                       f"{', '.join(CLASSICAL_METHODS)}")
        files, _, skipped = validate(dataclasses.replace(cfg, methods=[cfg.classical.method]), outs=[Path(cfg.out)])
        problems = reconstruct_tree(cfg, files, skipped)
    except (ReconstructError, OutputError) as exc:
        print(f"classical: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[classical] wrote {cfg.out} ({len(problems)} problem(s))")
    return EXIT_SKIPPED if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
