"""Resumable, crash-safe checkpoints and the backbone export that fine-tuning starts from.

Layout of a checkpoint directory (`PretrainConfig.checkpoint.dir`):

    latest                                   text: the tag of the newest COMPLETE checkpoint
    step00000040/                            one folder per tag, written by DeepSpeed + cmrfm:
        mp_rank_00_model_states.pt           module weights, scheduler, client_state (step, config, schema)
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt   each rank's optimizer partition (ZeRO >= 1)
        cmrfm_rank<r:05d>.pt                 each rank's RNG states (torch, numpy, python) + loader position

Commit protocol (open_clip's "never leave a half-written latest", made multi-rank): every rank writes
its files, DeepSpeed saves with `save_latest=False` (its own pointer is a plain `open(.., "w")`), all
ranks meet at a barrier, and only then rank 0 writes `latest` under a temporary name and
`os.replace`s it. A crash anywhere before that leaves the previous `latest`, and its folder, intact;
the last k tags are kept and never the one `latest` names.

Resume: rank 0 alone reads `latest` (ranks may see different files on a stressed shared filesystem)
and broadcasts the tag; every rank then loads DeepSpeed's state and its own `cmrfm_rank` file. Every
file loads with `torch.load(weights_only=True)`. A missing or unreadable file is a `CheckpointError`
naming it.

Export: `export_backbone` gathers the (ZeRO-3-partitioned) weights to rank 0 and writes
`<run>/backbone.safetensors` (float32) + `<run>/model_config.json` (the resolved ModelConfig);
`load_backbone(path)` turns them back into a `ReconModel` (what finetune imports).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from launch.cli import config_to_dict
from models.recon import ReconModel
from models.sizes import ModelConfig, build_model

SCHEMA_VERSION = 1
LATEST = "latest"
BACKBONE = "backbone.safetensors"
MODEL_CONFIG = "model_config.json"
TAG_PATTERN = re.compile(r"^step(\d{8})$")   # tag_for(step); shared with finetune.resume



class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file."""


__all__ = ["CheckpointError", "ResumeState", "save", "resume", "export_backbone", "load_backbone",
           "read_latest", "tag_for", "prune_tags", "TAG_PATTERN", "LATEST"]


def tag_for(step: int) -> str:
    """The tag (folder name) of the checkpoint taken after optimizer step `step`."""
    return f"step{step:08d}"


def _rank_file(ckdir: Path, tag: str, rank: int) -> Path:
    return ckdir / tag / f"cmrfm_rank{rank:05d}.pt"


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


# ---- RNG state, per rank, as tensors and plain data (loadable with weights_only=True) -------------

def rng_state() -> dict[str, Any]:
    """This process's torch, numpy and python RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- save ------------------------------------------------------------------------------------------

def save(engine: Any, ckdir: str | os.PathLike, step: int, loader_state: dict[str, Any], cfg: Any, keep: int) -> Path:
    """Checkpoint after optimizer step `step` (collective: every rank calls it). Returns the tag folder.

    `latest` moves to the new tag only after every rank finished writing (see the module docstring).
    """
    ckdir, tag, rank = Path(ckdir), tag_for(step), _rank()
    (ckdir / tag).mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({"schema": SCHEMA_VERSION, "step": step, "rank": rank, "rng": rng_state(),
                        "loader": loader_state}, _rank_file(ckdir, tag, rank))
    client = {"cmrfm": {"schema": SCHEMA_VERSION, "step": step, "world_size": engine.world_size,
                        "config": json.dumps(config_to_dict(cfg))}}
    engine.save_checkpoint(str(ckdir), tag=tag, client_state=client, save_latest=False)
    _barrier()   # every rank's files are on disk before the pointer moves
    if rank == 0:
        _atomic_write_text(ckdir / LATEST, tag + "\n")
        prune_tags(ckdir, keep, protect=tag)
    _barrier()
    return ckdir / tag


def _tags(ckdir: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in ckdir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name)))


def prune_tags(ckdir: Path, keep: int, protect: str) -> None:
    """Delete all but the newest `keep` complete tags (never `protect`, the one `latest` names)."""
    latest_step = int(TAG_PATTERN.match(protect).group(1))
    complete = [(s, p) for s, p in _tags(ckdir) if s <= latest_step]
    for _, path in complete[: max(len(complete) - max(keep, 1), 0)]:
        if path.name != protect:
            shutil.rmtree(path, ignore_errors=True)


# ---- resume ----------------------------------------------------------------------------------------

@dataclass
class ResumeState:
    """What the training loop needs back: the step already done, and this rank's loader position."""

    step: int
    tag: str
    loader: dict[str, Any]


def read_latest(ckdir: str | os.PathLike) -> str | None:
    """The tag `latest` names, validated; None when there is no `latest` (a fresh run)."""
    ckdir = Path(ckdir)
    pointer = ckdir / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not TAG_PATTERN.match(tag):
        raise CheckpointError(f"{pointer}: does not name a checkpoint tag (content {tag[:80]!r})")
    model_states = ckdir / tag / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        raise CheckpointError(f"{model_states}: missing, but {pointer} names checkpoint {tag!r}")
    return tag


def _broadcast_text(text: str) -> str:
    """Rank 0's string on every rank (a byte tensor: no pickling, unlike broadcast_object_list)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return text
    device = "cuda" if tdist.get_backend() == "nccl" else "cpu"   # NCCL only moves GPU tensors
    buf = torch.zeros(4096, dtype=torch.uint8, device=device)
    if tdist.get_rank() == 0:
        raw = text.encode()[:4095]
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    tdist.broadcast(buf, src=0)
    return bytes(buf.cpu()[buf.cpu().nonzero().flatten()].tolist()).decode()


def resume(engine: Any, ckdir: str | os.PathLike) -> ResumeState | None:
    """Load the checkpoint `latest` names into `engine` and this process's RNGs (collective).

    Returns None when there is nothing to resume. Raises CheckpointError naming the file when the
    pointer, a DeepSpeed file or this rank's cmrfm file is missing or unreadable; on every rank.
    """
    ckdir = Path(ckdir)
    answer = ""
    if _rank() == 0:
        try:
            answer = "tag:" + (read_latest(ckdir) or "") if ckdir.exists() else "tag:"
        except CheckpointError as exc:
            answer = "error:" + str(exc)
    answer = _broadcast_text(answer)
    if answer.startswith("error:"):
        raise CheckpointError(answer[len("error:"):])
    tag = answer[len("tag:"):]
    if not tag:
        return None
    load_path, client = engine.load_checkpoint(str(ckdir), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None or "cmrfm" not in (client or {}):
        raise CheckpointError(f"{ckdir / tag}: DeepSpeed could not load this checkpoint (no cmrfm client state)")
    rank_path = _rank_file(ckdir, tag, _rank())
    if not rank_path.is_file():
        raise CheckpointError(f"{rank_path}: missing (was the checkpoint written by {client['cmrfm']['world_size']} "
                              f"ranks and resumed by {engine.world_size}?)")
    try:
        mine = torch.load(rank_path, weights_only=True)
    except Exception as exc:   # a truncated/corrupt file raises one of several types
        raise CheckpointError(f"{rank_path}: cannot load ({type(exc).__name__}: {exc})") from exc
    set_rng_state(mine["rng"])
    return ResumeState(step=int(client["cmrfm"]["step"]), tag=tag, loader=mine["loader"])


def discard_incomplete(ckdir: str | os.PathLike) -> list[Path]:
    """Rank 0 at start-up: delete tag folders newer than `latest` (left by a crash while saving)."""
    ckdir = Path(ckdir)
    if not ckdir.exists():
        return []
    latest = read_latest(ckdir)
    newest = int(TAG_PATTERN.match(latest).group(1)) if latest else -1
    stale = [p for s, p in _tags(ckdir) if s > newest]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ---- backbone export for fine-tuning ------------------------------------------------------------

def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full model state dict, gathered from every rank; returned on rank 0, None elsewhere.

    Collective: every rank must call it. ZeRO-3 gathers the partitions layer by layer
    (DeepSpeed's `_zero3_consolidated_16bit_state_dict`; "16bit" means "the training dtype");
    stages 0-2 keep full parameters on every rank.
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if engine.global_rank == 0 else None
    if engine.global_rank != 0:
        return None
    return engine.module.state_dict()


def export_backbone(engine: Any, run_dir: str | os.PathLike, step: int | None = None) -> Path | None:
    """Write <run_dir>/backbone.safetensors (float32) + model_config.json (collective; rank 0 writes).

    ZeRO-3 partitions are gathered first. Returns the safetensors path on rank 0, None elsewhere.
    """
    state = consolidated_state_dict(engine)
    if state is None:
        _barrier()
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (shared-weight cascades)
    tensors = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}
    path = run_dir / BACKBONE
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "schema": str(SCHEMA_VERSION),
                                           "step": str(step if step is not None else -1)})
    os.replace(tmp, path)
    _atomic_write_text(run_dir / MODEL_CONFIG, json.dumps(dataclasses.asdict(engine.module.config), indent=2) + "\n")
    _barrier()
    return path


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> ReconModel:
    """A ReconModel with the exported weights (float32, on `device`).

    Args:
        path: the run directory, or the `backbone.safetensors` file (model_config.json next to it).
    """
    path = Path(path)
    weights = path / BACKBONE if path.is_dir() else path
    config_path = weights.with_name(MODEL_CONFIG)
    for f in (weights, config_path):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (expected {BACKBONE} + {MODEL_CONFIG} from pretrain.checkpoint.export_backbone)")
    try:
        cfg = ModelConfig(**json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: not a ModelConfig ({exc})") from exc
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from exc
    model = build_model(cfg, device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match {config_path} ({exc})") from exc
    return model
