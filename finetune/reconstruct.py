"""Reconstruct a challenge folder with the backbone + the adapter of each file's contrast and pattern.

    python -m finetune.reconstruct --set input=<validation-style tree> --set out=<dir> \
        [--set backbone=out/pretrain] [--set adapters=out/adapters] [--set methods=cmrfm,zero_filled,sense]

For each `<Task>/MultiCoil/<Modality>/ValidationSet/UnderSample_<Task>/.../<file>_kus_<Pattern><R>.mat`
with its `Mask_<Task>/.../<file>_mask_<Pattern><R>.mat` (docs/cmrxrecon.md §2.2):

1. the adapter `<contrast>_<pattern>` of the bank (contrast = the modality folder, lower case;
   pattern from the file name, checked against the mask's structure) is merged into a copy of the
   backbone; no adapter -> the bare backbone, said in the log;
2. every needed slice and frame is reconstructed with a sliding temporal window of the model's T
   frames: frame t is read from the window that has it in the centre (moved inside the series at
   its ends, so the model sees windows like the training ones, never a replicated edge); each window
   is divided by `shards.normalise.kspace_scale` (the loader's normalisation) and multiplied back;
3. the RSS image of the model's multi-coil k-space goes through `challenge.ranking.crop_selected` and
   `challenge.submission.save_img4ranking`: `img4ranking`, float32, MAT v5, same relative path and
   file name under `out`, written under a temporary name and renamed (§6.4).

Only the slices and frames img4ranking scores are reconstructed unless `full_volumes` is set; then
every slice and frame is, and the magnitude volume (MATLAB order (nx, ny, nz, nt), key `img`) is
also written to `<out>_volumes/<same relative path>` (outside the submission tree: the validation
scorer rejects extra files). A fastMRI folder (`*.h5` with a complex `kspace`) gives `<out>/<same
name>.h5` holding `reconstruction` (slices, readout, phase) float32, fastMRI's orientation.

`methods` adds baselines side by side: `zero_filled`, `sense`, `l1_wavelet` (finetune.classical)
write the same tree to `<out>_<method>`, a sibling of the resolved `out` (never inside it). Bad input
(no mask, unknown contrast or pattern, a shape the model cannot take, a missing or broken adapter)
gets one message naming the file; the rest of the folder is still processed; the messages are also
in `<out>/reconstruct_report.json`. `adapt.steps` > 0 first adapts the model of each (center, vendor)
group to that group's own undersampled k-space (finetune.adapt; adapters in `<out>_adapted/`).

Safety (docs/design.md §4): the whole config is checked before any work (input present and holding
inputs, backbone readable, method names known, no output equal to, inside or containing the input);
a user error ends in one line and exit status 2. Each output tree is written under a staging name
and swapped in whole (finetune.rank_share.shared_stage, launch.outputs' rules), so a re-run leaves no
file it did not write and a killed run leaves the previous tree untouched; a rerun of the same
configuration resumes the killed run's staging folder. Exit status 3 (EXIT_SKIPPED) when any input
was skipped, including entries of the input tree that could not be walked (broken links).

Several processes (torchrun, srun: launch/reconstruct.sbatch) split the files between them
(finetune.rank_share); the tree is byte-identical to one process's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from tqdm import tqdm

from challenge.ranking import crop_selected, select_frames, select_slices
from finetune.rank_share import Journal, fingerprint, share, shared_stage
from finetune.settings import ReconstructConfig, check_adapt_config
from challenge.submission import SubmissionError, mask_path, parse_kus_path, save_img4ranking
from launch.cli import ConfigError, dump_config, parse_args
from launch.outputs import EXIT_SKIPPED, EXIT_USAGE, OutputError, check_separate, replaced_tree, sibling
from launch.trees import find_files
from models.adapters import load_adapter, merge_adapters
from models.coils import rss
from models.fft import ifft2c
from models.recon import ReconModel
from pretrain.checkpoint import BACKBONE, CheckpointError, load_backbone
from pretrain.dist_env import DistEnv, export_for_torch, read_dist_env
from shards.layout import parse_scanner, view_of
from challenge.masks import PATTERNS_2025
from shards.matfile import MatFileError, is_fastmri, read_fastmri, read_kspace, read_mask, write_mat5
from shards.normalise import kspace_scale

#: modality folders of the 2023-2025 releases (docs/cmrxrecon.md §2): anything else is "unknown contrast".
KNOWN_CONTRASTS = ("cine", "lge", "mapping", "t1rho", "t1w", "t2w", "blackblood", "flow2d", "perfusion",
                   "aorta", "tagging")
KNOWN_PATTERNS = PATTERNS_2025 + ("ktUniform",)
#: smallest (ny, nx) reconstructed: img4ranking keeps ny/2 x nx/3 and the scorer's SSIM needs 7 x 7.
MIN_MATRIX = (14, 21)
CLASSICAL_METHODS = ("zero_filled", "sense", "l1_wavelet")
METHODS = ("cmrfm",) + CLASSICAL_METHODS
REPORT = "reconstruct_report.json"
ADAPT_REPORT = "adapt_report.json"  # marks <out>_adapted/ as test-time adaptation's output


class ReconstructError(ValueError):
    """One input that cannot be reconstructed; the message names the file and the problem."""

    def __init__(self, path: object, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


# ---- which model ---------------------------------------------------------------------------------


def infer_pattern(mask: np.ndarray) -> str:
    """The 2025 pattern family from a mask's structure (nt, ny, nx): ktRadial masks vary along the
    readout, ktGaussian masks change between frames, Uniform masks do neither (trap 6)."""
    m = np.asarray(mask) > 0
    if (m != m[:, :, :1]).any():
        return "ktRadial"
    if m.shape[0] > 1 and (m != m[:1]).any():
        return "ktGaussian"
    return "Uniform"


class ModelBank:
    """The backbone and, per `<contrast>_<pattern>`, a copy with that adapter merged in (cached).

    A missing or unreadable adapter falls back to the bare backbone; `notes` receives one message
    per input file that does so, naming the file and the adapter.
    """

    def __init__(self, backbone: str, adapters: str, device: torch.device) -> None:
        self.device = device
        self.backbone = load_backbone(backbone, device=device).eval()
        self.adapters = Path(adapters) if adapters else None
        self.cache: dict[str, tuple[ReconModel, str | None]] = {}

    def _load(self, name: str) -> tuple[ReconModel, str | None]:
        """(model, problem): the model for adapter `name`, or the backbone and why not."""
        if self.adapters is None:
            return self.backbone, "no adapter bank configured (set adapters=DIR)"
        folder = self.adapters / name
        try:
            if (folder / BACKBONE).is_file():  # a fully fine-tuned model saved in the bank
                return load_backbone(folder, device=self.device).eval(), None
            if not folder.is_dir():
                return self.backbone, f"no adapter {name} in {self.adapters}"
            model = copy.deepcopy(self.backbone)
            load_adapter(model, folder)
            merge_adapters(model)  # inference at backbone speed: B A folded into the weights
            return model.eval(), None
        except (OSError, ValueError, KeyError, CheckpointError, SafetensorError) as exc:
            # load_adapter does not name the weights file in every error: say the folder
            return self.backbone, f"adapter {folder} is unusable ({type(exc).__name__}: {exc})"

    def get(self, contrast: str, pattern: str | None) -> tuple[ReconModel, str, str | None]:
        """(model, adapter name or "backbone", reason for falling back or None)."""
        if contrast not in KNOWN_CONTRASTS:
            return self.backbone, "backbone", f"unknown contrast {contrast!r} (known: {', '.join(KNOWN_CONTRASTS)})"
        if pattern not in KNOWN_PATTERNS:
            return self.backbone, "backbone", f"unknown sampling pattern {pattern!r} (known: {', '.join(KNOWN_PATTERNS)})"
        name = f"{contrast}_{pattern}"
        if name not in self.cache:
            self.cache[name] = self._load(name)
        model, problem = self.cache[name]
        return model, (name if problem is None else "backbone"), problem


# ---- one slice ------------------------------------------------------------------------------------


def window_frames(t: int, nt: int, frames: int) -> tuple[np.ndarray, int]:
    """(indices of the T-frame window for frame t, position of t in it).

    Centred on t, shifted inside [0, nt) at the ends; a series shorter than T repeats its last
    frame (the loader's convention).
    """
    start = min(max(t - frames // 2, 0), max(nt - frames, 0))
    idx = np.clip(np.arange(start, start + frames), 0, nt - 1)
    return idx, t - start


@torch.inference_mode()
def reconstruct_slice(model: ReconModel, kspace: np.ndarray, mask: np.ndarray, wanted: list[int], meta: dict,
                      frames: int, batch_size: int, device: torch.device) -> np.ndarray:
    """RSS magnitude of the wanted frames of one slice.

    kspace: complex (nt, C, Y, X) undersampled; mask: (nt, Y, X); wanted: frame indices.
    Returns float32 (len(wanted), Y, X), in the units of the input k-space.
    """
    nt = kspace.shape[0]
    windows = [window_frames(t, nt, frames) for t in wanted]
    out = np.zeros((len(wanted),) + kspace.shape[-2:], dtype=np.float32)
    for i in range(0, len(windows), max(batch_size, 1)):
        chunk = windows[i:i + max(batch_size, 1)]
        ks, ms, scales = [], [], []
        for idx, _ in chunk:
            k, m = kspace[idx] * mask[idx][:, None], mask[idx]
            s = kspace_scale(k, m)  # the loader's per-window scale, from undersampled data only
            ks.append(k / s)
            ms.append(m)
            scales.append(s)
        k_t = torch.from_numpy(np.stack(ks).astype(np.complex64)).to(device)  # (B, T, C, Y, X)
        m_t = torch.from_numpy(np.stack(ms).astype(np.float32)).to(device)  # (B, T, Y, X)
        pred = model(k_t, m_t, [meta] * len(chunk))["kspace"]
        image = rss(ifft2c(pred), dim=2).float().cpu().numpy()  # (B, T, Y, X)
        for j, ((_, pos), s) in enumerate(zip(chunk, scales)):
            out[i + j] = image[j, pos] * s
    return out


# ---- one file ------------------------------------------------------------------------------------


@dataclass
class FileOutcome:
    path: str
    adapter: str = ""
    slices: int = 0
    notes: list[str] = field(default_factory=list)
    error: str = ""


def load_pair(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """k-space (nt, nz, nc, ny, nx) and mask (nt, ny, nx) of an input file, checked; notes for the log."""
    notes: list[str] = []
    kspace = read_kspace(path)
    if kspace.ndim != 5:
        raise ReconstructError(path, f"k-space has shape {kspace.shape}; expected (nt, nz, nc, ny, nx)")
    mpath = mask_path(path)
    if mpath.is_file():
        mask = read_mask(mpath)
    else:
        notes.append(f"{path}: no matching mask (looked for {mpath}); using the non-zero k-space locations")
        mask = (np.abs(kspace).sum(axis=(1, 2)) > 0).astype(np.float32)
    nt, _, _, ny, nx = kspace.shape
    if mask.ndim != 3 or mask.shape[1:] != (ny, nx) or mask.shape[0] not in (1, nt):
        raise ReconstructError(path, f"mask {mpath.name} has shape {mask.shape}, which does not fit k-space "
                                     f"{kspace.shape} (expected ({nt} or 1, {ny}, {nx}))")
    if ny < MIN_MATRIX[0] or nx < MIN_MATRIX[1]:
        raise ReconstructError(path, f"k-space matrix {ny} x {nx} (phase x readout) is smaller than the "
                                     f"{MIN_MATRIX[0]} x {MIN_MATRIX[1]} the model and the scorer can take")
    return kspace, np.broadcast_to(mask, (nt, ny, nx)), notes


def file_meta(path: Path) -> tuple[dict, str, str | None, list[str]]:
    """(conditioning meta, contrast, pattern, notes) of a kus file, from its path (and later its mask)."""
    case = parse_kus_path(path)
    vendor, field_t, model = parse_scanner(case.vendor)
    meta = {"modality": case.modality, "view": view_of(case.stem), "pattern": case.pattern, "R": case.R,
            "vendor": vendor, "field_T": field_t, "model": model, "center": case.center, "scanner": case.vendor,
            "file": case.stem}
    return meta, case.modality.lower(), case.pattern, []


def reconstruct_file(path: Path, bank: ModelBank, cfg: ReconstructConfig,
                     adapted: tuple[ReconModel, str] | None = None) -> tuple[FileOutcome, np.ndarray, np.ndarray | None]:
    """Reconstruct one kus file -> (outcome, img4ranking, full volume (nt, nz, ny, nx) or None).
    `adapted`: (model, label) from test-time adaptation (finetune.adapt), used instead of the bank's."""
    outcome = FileOutcome(str(path))
    meta, contrast, pattern, outcome.notes = file_meta(path)
    kspace, mask, notes = load_pair(path)
    outcome.notes += notes
    seen = infer_pattern(mask)
    # undecidable: one frame (ktGaussian and Uniform look alike) or an ACS that covers the whole matrix
    decisive = not mask.all() and (mask.shape[0] > 1 or seen == "ktRadial")
    if pattern not in KNOWN_PATTERNS:
        outcome.notes.append(f"{path}: pattern {pattern!r} from the file name is unknown (the mask looks {seen})")
    elif pattern != seen and decisive and pattern != "ktUniform":
        outcome.notes.append(f"{path}: the file name says {pattern}, the mask looks {seen}; using {pattern}")
    model, outcome.adapter, problem = bank.get(contrast, pattern)
    if problem:
        outcome.notes.append(f"{path}: {problem}; using the bare backbone")
    if adapted is not None:
        model, outcome.adapter = adapted
    nt, nz = kspace.shape[:2]
    stem = parse_kus_path(path).stem
    frames = list(range(nt)) if cfg.full_volumes else select_frames(nt, stem)
    slices = list(range(nz)) if cfg.full_volumes else select_slices(nz)
    volume = np.zeros((len(frames), len(slices)) + kspace.shape[-2:], dtype=np.float32)
    for j, z in enumerate(slices):
        try:
            volume[:, j] = reconstruct_slice(model, kspace[:, z], mask, frames, meta, cfg.frames, cfg.batch_size,
                                             bank.device)
        except RuntimeError as exc:  # a shape or size the network cannot take
            raise ReconstructError(path, f"the model failed on slice {z} of k-space {kspace.shape}: {exc}") from None
        outcome.slices += 1
    if cfg.full_volumes:
        ranked = crop_selected(volume[np.ix_(select_frames(nt, stem), select_slices(nz))])
        return outcome, ranked, volume
    return outcome, crop_selected(volume), None


def reconstruct_fastmri(path: Path, bank: ModelBank, cfg: ReconstructConfig, target: Path) -> FileOutcome:
    """A fastMRI .h5 file -> `target` (.h5) with `reconstruction` (slices, readout, phase) float32."""
    outcome = FileOutcome(str(path), adapter="backbone")
    kspace = read_fastmri(path)[0]  # (nz, C, ny = phase, nx = readout)
    with h5py.File(path, "r") as fh:
        mask_1d = np.asarray(fh["mask"][()], dtype=np.float32) if "mask" in fh else None
    nz, _, ny, nx = kspace.shape
    if mask_1d is not None and mask_1d.shape == (ny,):
        mask = np.broadcast_to(mask_1d[None, :, None], (1, ny, nx))
    else:
        mask = (np.abs(kspace).sum(axis=(0, 1)) > 0).astype(np.float32)[None]
        outcome.notes.append(f"{path}: no 'mask' dataset; using the non-zero k-space locations")
    meta = {"modality": "fastMRI", "pattern": infer_pattern(mask)}
    model, _, _ = bank.get("fastmri", None)
    recon = np.stack([reconstruct_slice(model, kspace[z][None], mask, [0], meta, cfg.frames, cfg.batch_size,
                                        bank.device)[0] for z in range(nz)])  # (nz, ny, nx)
    outcome.slices = nz
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with h5py.File(tmp, "w") as fh:
        fh.create_dataset("reconstruction", data=np.ascontiguousarray(recon.transpose(0, 2, 1)))
    os.replace(tmp, target)
    return outcome


# ---- the folder ----------------------------------------------------------------------------------


def find_inputs(root: Path, task: str = "") -> tuple[list[Path], list[Path], list[str]]:
    """(kus .mat files under UnderSample_* folders, fastMRI .h5 files, entries that could not be walked)
    below `root`, sorted; symlinked folders are followed (launch.trees)."""
    mats, skipped = find_files(root, "*_kus_*.mat")
    kus = [p for p in mats if any(part.startswith("UnderSample_") for part in p.parts)
           and (not task or task in p.parts)]
    h5s, more = find_files(root, "*.h5")
    return kus, [p for p in h5s if is_fastmri(p)], skipped + [s for s in more if s not in skipped]


def output_dirs(cfg: ReconstructConfig) -> dict[str, Path]:
    """{method: output tree}: "cmrfm" -> `out`, a baseline m -> `<out>_<m>` beside the resolved `out`."""
    return {m: Path(cfg.out) if m == "cmrfm" else sibling(cfg.out, f"_{m}") for m in cfg.methods}


def validate(cfg: ReconstructConfig, outs: list[Path] | None = None) -> tuple[list[Path], list[Path], list[str]]:
    """Check the whole config before any work; returns `find_inputs`. Raises ReconstructError (a user
    error: one line, naming the setting) or OutputError. `outs`: the output trees (default: every
    method's, and the volumes tree)."""
    if not cfg.input:
        raise ReconstructError("input", "not set (--set input=<validation-style tree>)")
    if not cfg.methods:
        raise ReconstructError("methods", "empty; expected some of " + ", ".join(METHODS))
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ReconstructError("methods", f"unknown method {unknown[0]!r}; expected some of {', '.join(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ReconstructError("methods", f"{cfg.methods} names a method twice")
    if cfg.adapt.steps > 0:  # before any file is read, not per group
        try:
            check_adapt_config(cfg.adapt)
        except ValueError as exc:
            raise ReconstructError("adapt", str(exc)) from None
    root = Path(cfg.input)
    if not root.is_dir():
        raise ReconstructError(root, "input folder does not exist" if not root.exists() else "input is not a folder")
    if "cmrfm" in cfg.methods:
        if not cfg.backbone:
            raise ReconstructError("backbone", "not set (--set backbone=<pretraining run folder or its "
                                               f"{BACKBONE}>; make one with pretrain/run.py)")
        weights = Path(cfg.backbone) / BACKBONE if Path(cfg.backbone).is_dir() else Path(cfg.backbone)
        if not weights.is_file():
            raise ReconstructError(weights, f"backbone not found (--set backbone=<folder holding {BACKBONE}>)")
        if cfg.adapters and not Path(cfg.adapters).is_dir():
            raise ReconstructError(cfg.adapters, "adapter bank folder does not exist (--set adapters= for none)")
    if outs is None:
        outs = list(output_dirs(cfg).values()) + ([sibling(cfg.out, "_volumes")] if cfg.full_volumes else []) \
            + ([sibling(cfg.out, "_adapted")] if cfg.adapt.steps > 0 and "cmrfm" in cfg.methods else [])
    check_separate(root, outs)
    for i, a in enumerate(outs):   # two outputs nested in each other would swap each other away
        for b in outs[i + 1:]:
            check_separate(a, [b], what="other output")
    kus, h5, skipped = find_inputs(root, cfg.task)
    if not kus and not h5:
        raise ReconstructError(root, "no *_kus_*.mat under UnderSample_<Task> folders and no fastMRI .h5 files"
                                     + (f" ({len(skipped)} entries could not be walked: {skipped[0]})" if skipped else ""))
    return kus, h5, skipped


def output_path(path: Path, root: Path, out: Path) -> Path:
    """Where the output of input `path` goes: same relative path (kus: without UnderSample_ prefix folders)."""
    if path.suffix == ".h5":
        return out / path.relative_to(root)
    return out / parse_kus_path(path).relative_path("UnderSample_")


def _join_ranks(cfg: ReconstructConfig) -> tuple[DistEnv, bool]:
    """This process's rank (torchrun / srun variables); joins a gloo group when there are several.
    Returns (rank info, whether this call created the group)."""
    dist = read_dist_env("cuda" if cfg.device.startswith("cuda") else "cpu")
    if dist.world_size == 1 or tdist.is_initialized():
        return dist, False
    export_for_torch(dist)
    tdist.init_process_group("gloo", rank=dist.rank, world_size=dist.world_size)   # reports only: CPU objects
    return dist, True


def reconstruct_tree(cfg: ReconstructConfig, log: Callable[[str], None] | None = None,
                     inputs: tuple[list[Path], list[Path], list[str]] | None = None) -> dict:
    """Reconstruct every input under `cfg.input` into `cfg.out` (staged, then swapped in whole);
    returns the report (also written as `<out>/reconstruct_report.json`).

    On several processes (torchrun, srun) each rank reconstructs its share of the inputs into one
    shared staging folder (finetune.rank_share); rank 0 writes the one report and swaps the tree in.
    Inputs an interrupted run of the same configuration finished are not redone."""
    dist, created = _join_ranks(cfg)
    try:
        return _reconstruct_ranks(cfg, dist, log, inputs)
    finally:
        if created:
            tdist.destroy_process_group()


def _reconstruct_ranks(cfg: ReconstructConfig, dist: DistEnv, log: Callable[[str], None] | None,
                       inputs: tuple[list[Path], list[Path], list[str]] | None) -> dict:
    rank, world = dist.rank, dist.world_size
    tag = f"[reconstruct rank {rank}/{world}]" if world > 1 else "[reconstruct]"
    log = log or (lambda msg: print(f"{tag} {msg}", file=sys.stderr))
    root, out = Path(cfg.input), Path(cfg.out)
    kus, h5, skipped = inputs or validate(dataclasses.replace(cfg, methods=["cmrfm"]))
    if rank == 0:
        for entry in skipped:
            log(f"skipped {entry}")
    files = kus + h5
    settings = {k: getattr(cfg, k) for k in ("frames", "batch_size", "full_volumes", "task", "backbone", "adapters")}
    settings.update(input=str(root.resolve()), out=str(out.resolve()), device=cfg.device.split(":")[0])
    settings["adapt"] = dataclasses.asdict(cfg.adapt)  # adapted outputs differ from unadapted ones
    if cfg.adapt.steps > 0 and world > 1:
        raise ReconstructError("adapt.steps", f"test-time adaptation runs on one process ({world} ranks here): "
                                              "a (center, vendor) group's files are adapted on together")
    fp = fingerprint(settings, cfg.backbone, cfg.adapters)
    device = torch.device(dist.device if cfg.device.startswith("cuda") and world > 1 else cfg.device)
    bank = ModelBank(cfg.backbone, cfg.adapters, device)
    volumes = sibling(out, "_volumes")
    with shared_stage(out, REPORT, fp, rank, world) as stage, \
            (shared_stage(volumes, REPORT, fp, rank, world) if cfg.full_volumes else _no_tree()) as vstage, \
            (replaced_tree(sibling(out, "_adapted"), ADAPT_REPORT) if cfg.adapt.steps > 0 else _no_tree()) as astage:
        adapter = None
        if astage is not None:  # test-time self-supervised adaptation per (center, vendor), one process
            from finetune.adapt import TestTimeAdapter  # it imports this module

            adapter = TestTimeAdapter(kus, bank, cfg, log, astage)
        journal = Journal(stage, rank, world)
        done = {p: o for p, o in journal.done().items() if output_path(Path(p), root, stage).is_file()}
        if world > 1:
            tdist.barrier()            # every rank has read the journal before anyone appends to it
        if rank == 0:
            dump_config(cfg, stage / "reconstruct_config.toml")
            if done:
                log(f"resuming: {len(done)} of {len(files)} files were written by an interrupted run of this "
                    f"configuration ({stage})")
        mine = share([p for p in files if str(p) not in done], rank, world)
        outcomes: list[FileOutcome] = []
        t0, n_slices = time.perf_counter(), 0
        bar = tqdm(mine, desc=f"reconstruct {rank}/{world}" if world > 1 else "reconstruct", unit="file",
                   disable=not cfg.progress, position=rank)
        for path in bar:
            target = output_path(path, root, stage)
            target.unlink(missing_ok=True)     # an output of ours the journal does not vouch for
            try:
                if path.suffix == ".h5":
                    outcome = reconstruct_fastmri(path, bank, cfg, target)
                else:
                    outcome, ranked, volume = reconstruct_file(path, bank, cfg, adapter.model_for(path) if adapter else None)
                    save_img4ranking(target, ranked)
                    if volume is not None:
                        write_volume(output_path(path, root, vstage), volume)
                journal.record(dataclasses.asdict(outcome))
            except (ReconstructError, SubmissionError, MatFileError, ValueError, OSError) as exc:
                outcome = FileOutcome(str(path), error=str(exc) if str(path) in str(exc) else f"{path}: {exc}")
                log(f"skipped {outcome.error}")
            for note in outcome.notes:
                log(note)
            outcomes.append(outcome)
            n_slices += outcome.slices
            bar.set_postfix(slices_per_s=f"{n_slices / max(time.perf_counter() - t0, 1e-9):.2f}")
        seconds = time.perf_counter() - t0
        mine_stats = {"rank": rank, "files": len(outcomes), "slices": n_slices, "seconds": round(seconds, 2),
                      "slices_per_s": round(n_slices / max(seconds, 1e-9), 3)}
        if world > 1:
            log(f"{len(outcomes)} files, {n_slices} slices in {seconds:.1f} s: {mine_stats['slices_per_s']:.2f} slices/s")
            gathered: list = [None] * world
            tdist.all_gather_object(gathered, ([dataclasses.asdict(o) for o in outcomes], mine_stats))
        else:
            gathered = [([dataclasses.asdict(o) for o in outcomes], mine_stats)]
        by_path = {**done, **{o["path"]: o for got, _ in gathered for o in got}}
        merged = [FileOutcome(**by_path[str(p)]) for p in files if str(p) in by_path]
        ranks = [stats for _, stats in gathered]
        new_slices, wall = sum(r["slices"] for r in ranks), max(r["seconds"] for r in ranks)
        report = {"input": str(root), "out": str(out), "files": len(merged),
                  "written": sum(1 for o in merged if not o.error),
                  "errors": [o.error for o in merged if o.error] + [f"{s} (input tree)" for s in skipped],
                  "slices": sum(o.slices for o in merged), "seconds": round(wall, 2),
                  "resumed": len(done), "ranks": ranks,
                  "adapters": {o.path: o.adapter for o in merged if not o.error},
                  "notes": [n for o in merged for n in o.notes]}
        if adapter is not None:
            report["adapt"] = adapter.results
            (astage / ADAPT_REPORT).write_text(json.dumps(adapter.results, indent=2) + "\n")
        if rank == 0:
            text = json.dumps(report, indent=2) + "\n"
            (stage / REPORT).write_text(text)
            if vstage is not None:
                (vstage / REPORT).write_text(text)
    if rank == 0:
        log(f"wrote {report['written']}/{report['files']} files to {out} ({new_slices} slices on {world} rank(s), "
            f"{new_slices / max(wall, 1e-9):.2f} slices/s in total); {len(report['errors'])} error(s)")
    return report


@contextlib.contextmanager
def _no_tree() -> Iterator[None]:
    yield None


def write_volume(path: Path, volume: np.ndarray) -> None:
    """Full magnitude volume (nt, nz, ny, nx) -> MAT v5 `img` in MATLAB order (nx, ny, nz, nt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mat5(path, "img", volume.astype(np.float32))


def run(cfg: ReconstructConfig) -> dict[str, dict]:
    """Every method of `cfg.methods` ("cmrfm" -> `out`, a classical baseline m -> `<out>_<m>`), after
    the whole config was validated (nothing is written when it is not)."""
    from finetune.classical import reconstruct_tree as classical_tree

    inputs = validate(cfg)
    reports: dict[str, dict] = {}
    for method, folder in output_dirs(cfg).items():
        if method == "cmrfm":
            reports[method] = reconstruct_tree(cfg, inputs=inputs)
        else:
            sub = dataclasses.replace(cfg, out=str(folder), classical=dataclasses.replace(cfg.classical, method=method))
            if read_dist_env().rank > 0:     # several ranks: the baselines are not split; rank 0 writes them
                reports[method] = {"out": sub.out, "errors": []}
                continue
            reports[method] = {"out": sub.out, "errors": classical_tree(sub, inputs[0], inputs[2])}
    return reports


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every input written; 3 (EXIT_SKIPPED) finished, but inputs were skipped (each
    named in the log and the report); 2 (EXIT_USAGE) a config or path error, before any work."""
    cfg = parse_args(ReconstructConfig, argv, description="reconstruct a challenge folder into a submission tree")
    try:
        reports = run(cfg)
    except (ReconstructError, OutputError, ConfigError, CheckpointError) as exc:
        print(f"reconstruct: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for method, rep in reports.items():
        print(f"{method}: {rep['out']} ({len(rep['errors'])} error(s))")
    return EXIT_SKIPPED if any(rep["errors"] for rep in reports.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
