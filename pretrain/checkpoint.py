"""Resumable, crash-safe checkpoints and the backbone export that fine-tuning starts from.

Layout of a checkpoint directory (`PretrainConfig.checkpoint.dir`):

    latest                                   text: the tag of the newest COMPLETE checkpoint
    step00000040/                            one folder per tag, written by DeepSpeed + cmrfm:
        mp_rank_00_model_states.pt           module weights, scheduler, client_state (step, config, schema)
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt   each rank's optimizer partition (ZeRO >= 1)
        cmrfm_rank<r:05d>.pt                 each rank's RNG states (torch, numpy, python) + loader position

Commit protocol (open_clip's "never leave a half-written latest", made multi-rank): every rank writes
its files into `<tag>.incomplete/` (a name `TAG_PATTERN` never matches) and fsyncs them; DeepSpeed
saves with `save_latest=False` (its own pointer is a plain `open(.., "w")`); all ranks meet at a
barrier; only then rank 0 adds `cmrfm_complete.json` (step, world size, the run lineage `owner`, the
file list), renames the folder to `<tag>` and moves `latest` (temporary name, fsync, rename, fsync of
the folder: launch.outputs.write_atomic). So a `stepNNNNNNNN` folder is complete by construction,
and a crash anywhere leaves the previous `latest` and its folder intact.

Nothing complete is ever deleted because a pointer is missing: at start-up (`discard_incomplete`,
rank 0, holding the folder lock so no other run writes here) only `*.incomplete` folders are removed
(a dead writer's: provably incomplete), and a missing `latest` is recovered from the newest tag that
carries `cmrfm_complete.json` (said in the log). Pruning keeps the last k tags of this run's lineage
only: a tag another run wrote (another `owner`) or an older code wrote (no marker) is never pruned.
A save onto an existing tag name moves the old folder aside (`<tag>.superseded-<time>`), never over it.

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
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from launch.cli import config_to_dict
from launch.outputs import FolderLock, fsync_dir, fsync_tree, write_atomic
from models.recon import ReconModel
from models.sizes import ModelConfig, build_model

SCHEMA_VERSION = 1
LATEST = "latest"
BACKBONE = "backbone.safetensors"
MODEL_CONFIG = "model_config.json"
TAG_PATTERN = re.compile(r"^step(\d{8})$")   # tag_for(step); shared with finetune.resume
INCOMPLETE = ".incomplete"                   # suffix of a tag folder still being written
COMPLETE_MARKER = "cmrfm_complete.json"      # written last into a tag folder, before its rename



class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file."""


__all__ = ["CheckpointError", "ResumeState", "save", "resume", "export_backbone", "load_backbone",
           "read_latest", "tag_for", "prune_tags", "TAG_PATTERN", "LATEST", "commit_tag", "new_owner",
           "discard_incomplete", "lock_dir", "tag_owner"]


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
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


# ---- tag folders: staged, committed, recovered, pruned (shared with finetune.resume) ---------------

def new_owner() -> str:
    """A fresh run lineage id (a resumed run keeps its lineage's id)."""
    return uuid.uuid4().hex


def staging_dir(ckdir: Path, tag: str) -> Path:
    """Where every rank writes tag `tag` until rank 0 commits it."""
    return Path(ckdir) / (tag + INCOMPLETE)


def tag_owner(folder: Path) -> str | None:
    """The lineage that wrote a committed tag folder; None for no (or an unreadable) marker."""
    try:
        return str(json.loads((Path(folder) / COMPLETE_MARKER).read_text())["owner"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def commit_tag(ckdir: str | os.PathLike, tag: str, owner: str, info: dict[str, Any], keep: int) -> Path:
    """Rank 0, after every rank's files of `tag` are in `staging_dir` and fsynced: mark, rename, point
    `latest` at it, prune this lineage's old tags. Returns the committed folder."""
    ckdir = Path(ckdir)
    staging, final = staging_dir(ckdir, tag), ckdir / tag
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    write_atomic(staging / COMPLETE_MARKER, json.dumps({"tag": tag, "owner": owner, "files": files, **info},
                                                       indent=1) + "\n")
    fsync_tree(staging)
    if final.exists():   # a tag of the same name (another lineage, or a rolled-back `latest`): keep it aside
        aside = ckdir / f"{tag}.superseded-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.replace(final, aside)
        print(f"checkpoint {final} already existed: moved to {aside.name} (not deleted)", flush=True)
    os.replace(staging, final)
    fsync_dir(ckdir)
    write_atomic(ckdir / LATEST, tag + "\n")
    prune_tags(ckdir, keep, protect=tag, owner=owner)
    return final


# ---- save ------------------------------------------------------------------------------------------

def save(engine: Any, ckdir: str | os.PathLike, step: int, loader_state: dict[str, Any], cfg: Any, keep: int,
         owner: str) -> Path:
    """Checkpoint after optimizer step `step` (collective: every rank calls it). Returns the tag folder.

    `owner` is the run lineage (`new_owner()`, or `ResumeState.owner`); only its tags are pruned.
    `latest` moves to the new tag only after every rank finished writing (see the module docstring).
    """
    ckdir, tag, rank = Path(ckdir), tag_for(step), _rank()
    staging = staging_dir(ckdir, tag)
    client = {"cmrfm": {"schema": SCHEMA_VERSION, "step": step, "world_size": engine.world_size,
                        "config": json.dumps(config_to_dict(cfg))}}
    try:
        staging.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"schema": SCHEMA_VERSION, "step": step, "rank": rank, "rng": rng_state(),
                            "loader": loader_state}, _rank_file(ckdir, staging.name, rank))
        engine.save_checkpoint(str(ckdir), tag=staging.name, client_state=client, save_latest=False)
        fsync_tree(staging)   # each rank makes its own files durable (nodes may not share a page cache)
    except (OSError, RuntimeError) as exc:   # a full disk surfaces as either (torch.save: RuntimeError)
        free = shutil.disk_usage(ckdir).free if ckdir.exists() else 0
        raise CheckpointError(f"{staging}: writing checkpoint {tag} failed on rank {rank} ({type(exc).__name__}: "
                              f"{exc}; {free / 2**20:.1f} MiB free); {ckdir / LATEST} still names the previous "
                              f"checkpoint") from exc
    _barrier()            # every rank's files are on disk before the folder is committed
    if rank == 0:
        commit_tag(ckdir, tag, owner, {"step": step, "world_size": engine.world_size}, keep)
    _barrier()
    return ckdir / tag


def _tags(ckdir: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in ckdir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name)))


def prune_tags(ckdir: Path, keep: int, protect: str, owner: str) -> None:
    """Delete all but the newest `keep` tags of lineage `owner` up to `protect` (the one `latest`
    names, never deleted). Tags of other lineages, or without a marker, are never touched."""
    latest_step = int(TAG_PATTERN.match(protect).group(1))
    mine = [(s, p) for s, p in _tags(ckdir) if s <= latest_step and tag_owner(p) == owner]
    for _, path in mine[: max(len(mine) - max(keep, 1), 0)]:
        if path.name != protect:
            shutil.rmtree(path)


# ---- resume ----------------------------------------------------------------------------------------

@dataclass
class ResumeState:
    """What the training loop needs back: the step already done, and this rank's loader position."""

    step: int
    tag: str
    loader: dict[str, Any]
    owner: str = ""


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
    return ResumeState(step=int(client["cmrfm"]["step"]), tag=tag, loader=mine["loader"],
                       owner=tag_owner(ckdir / tag) or new_owner())


_LOCKS: dict[Path, FolderLock] = {}


def lock_dir(ckdir: str | os.PathLike) -> FolderLock:
    """Rank 0: own checkpoint folder `ckdir` until the process ends (a second run writing there fails
    at once with the owner's pid: two runs interleaving tags and `latest` would corrupt both)."""
    path = Path(ckdir).resolve()
    if path not in _LOCKS:
        _LOCKS[path] = FolderLock(path).acquire()
    return _LOCKS[path]


def discard_incomplete(ckdir: str | os.PathLike, log: Any = print) -> list[Path]:
    """Rank 0 at start-up, holding `lock_dir(ckdir)`: remove `<tag>.incomplete` folders (a dead writer's:
    the lock proves no live run is writing them) and recover a missing `latest` from the newest tag
    that carries the completion marker. Complete tags are never deleted. Returns the removed folders."""
    ckdir = Path(ckdir)
    if not ckdir.exists():
        return []
    stale = sorted(p for p in ckdir.iterdir()
                   if p.is_dir() and p.name.endswith(INCOMPLETE) and TAG_PATTERN.match(p.name[: -len(INCOMPLETE)]))
    for path in stale:
        shutil.rmtree(path)
        log(f"removed incomplete checkpoint {path} (a crash while saving)")
    recover_latest(ckdir, log)
    return stale


def recover_latest(ckdir: Path, log: Any = print) -> str | None:
    """When `latest` is missing, point it at the newest committed tag (marker present) and say so."""
    if (ckdir / LATEST).exists():
        return None
    tags = _tags(ckdir)
    complete = [p for _, p in tags if (p / COMPLETE_MARKER).is_file()]
    unmarked = [p.name for _, p in tags if not (p / COMPLETE_MARKER).is_file()]
    if unmarked:
        log(f"{ckdir}: kept {', '.join(unmarked)} (no {COMPLETE_MARKER}: written by an older cmrfm or another "
            f"tool, so not known to be complete; never deleted, never resumed from automatically)")
    if not complete:
        return None
    write_atomic(ckdir / LATEST, complete[-1].name + "\n")
    log(f"{ckdir / LATEST} was missing: recovered it from the newest complete checkpoint {complete[-1].name} "
        f"(to start fresh instead, set checkpoint.resume=false or another checkpoint.dir)")
    return complete[-1].name


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
    path = write_backbone(run_dir, state, engine.module.config, {"step": str(step if step is not None else -1)})
    _barrier()
    return path


def write_backbone(folder: str | os.PathLike, state: dict[str, torch.Tensor], config: ModelConfig,
                   metadata: dict[str, str] | None = None) -> Path:
    """`<folder>/backbone.safetensors` (float32) + `<folder>/model_config.json`, as one atomic step.

    The ModelConfig travels inside the safetensors metadata, so the weights file alone is a complete,
    consistent record (one rename publishes it); model_config.json is the readable copy written after
    it. A crash between the two leaves a stale json beside new weights: `load_backbone` trusts the
    metadata, so the pair can never be mismatched.
    """
    folder = Path(folder)
    # clone: safetensors refuses tensors that share storage (shared-weight cascades)
    tensors = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}
    config_json = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    meta = {"format": "pt", "schema": str(SCHEMA_VERSION), MODEL_CONFIG: config_json, **(metadata or {})}
    path = write_atomic(folder / BACKBONE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    write_atomic(folder / MODEL_CONFIG, config_json)
    return path


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> ReconModel:
    """A ReconModel with the exported weights (float32, on `device`).

    Args:
        path: the run directory, or the `backbone.safetensors` file (model_config.json next to it).
    """
    path = Path(path)
    weights = path / BACKBONE if path.is_dir() else path
    config_path = weights.with_name(MODEL_CONFIG)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (expected {BACKBONE} from pretrain.checkpoint.export_backbone)")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            embedded = (fh.metadata() or {}).get(MODEL_CONFIG)
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from exc
    source = f"{weights} (metadata)"
    if embedded is None:   # written before the config travelled inside the weights file
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing (expected {BACKBONE} + {MODEL_CONFIG} from "
                                  f"pretrain.checkpoint.export_backbone)")
        embedded, source = config_path.read_text(), str(config_path)
    try:
        cfg = ModelConfig(**json.loads(embedded))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{source}: not a ModelConfig ({exc})") from exc
    model = build_model(cfg, device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match {source} ({exc})") from exc
    return model
