"""Resumable fine-tuning state in safetensors + JSON (no pickle anywhere).

accelerate's `save_state` pickles the optimizer, the scheduler and the RNG states with `torch.save`,
so cmrfm keeps its own, small state instead. Layout of `<run>/state/`:

    latest                        text: the tag of the newest COMPLETE state
    step00000020/
        trainable.safetensors     the trainable parameters, named as in model.named_parameters()
        optimizer.safetensors     AdamW's per-parameter tensors, "<parameter name>.<exp_avg|exp_avg_sq|step>"
        optimizer.json            AdamW's param_groups (hyper-parameters; params as parameter names)
        rank00000.safetensors     that rank's torch CPU RNG state (uint8)
        rank00000.json            that rank's loader position (shards.loader state_dict) and step

Commit protocol (pretrain.checkpoint's, shared code): every rank writes its files into
`<tag>.incomplete/` (fsynced), all ranks meet at a barrier, then rank 0 marks the folder complete,
renames it to `<tag>`, moves `latest` (atomic, fsynced) and prunes this run lineage's older tags. A
crash before that leaves the previous `latest` intact; a missing `latest` is recovered from the
newest complete tag, and `*.incomplete` leftovers are removed (`discard_incomplete`). Frozen parameters are not saved: they come
back from the backbone file, which is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from launch.outputs import write_atomic
from pretrain.checkpoint import (
    LATEST, TAG_PATTERN, commit_tag, new_owner, staging_dir, tag_for, tag_owner,
)



class ResumeError(RuntimeError):
    """A state folder that is incomplete or does not fit the model; the message names the file."""


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    write_atomic(path, lambda p: save_file(clean, str(p), metadata={"format": "pt"}))


def save_state(state_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               rank: int, loader_state: dict[str, Any], barrier: Callable[[], None], owner: str,
               keep: int = 2) -> Path:
    """Write this rank's part of the state for `step`; rank 0 also the shared part and `latest`.

    Collective: every rank calls it (the barrier sits between the per-rank files and the commit).
    `model` is the unwrapped module (no DDP "module." prefix); `owner` the run lineage (pruning).
    """
    root = Path(state_dir)
    tag_dir = staging_dir(root, tag_for(step))
    tag_dir.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    if rank == 0:
        _save_tensors(tag_dir / "trainable.safetensors",
                      {n: p for n, p in model.named_parameters() if p.requires_grad})
        sd = optimizer.state_dict()
        # optimizer.state_dict() numbers parameters in param_group order: map the numbers to names
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        tensors = {f"{order[i]}.{k}": torch.as_tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
        _save_tensors(tag_dir / "optimizer.safetensors", tensors)
        groups = [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]]
        write_atomic(tag_dir / "optimizer.json", lambda p: p.write_text(json.dumps(groups, indent=1)))
    _save_tensors(tag_dir / f"rank{rank:05d}.safetensors", {"torch_rng": torch.get_rng_state()})
    rank_state = {"step": step, "loader": loader_state}
    write_atomic(tag_dir / f"rank{rank:05d}.json", lambda p: p.write_text(json.dumps(rank_state)))
    barrier()   # every file above went through write_atomic (fsynced) before the commit
    if rank == 0:
        commit_tag(root, tag_for(step), owner, {"step": step}, keep)
    barrier()
    return root / tag_for(step)


def state_owner(tag_dir: Path | None) -> str:
    """The lineage of a resumed state (its tags may be pruned by the continuing run), or a new one."""
    return (tag_owner(tag_dir) if tag_dir is not None else None) or new_owner()


def latest_tag(state_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` names, or None when there is no state yet (rank 0 has run
    `discard_incomplete` first: a missing `latest` is recovered from the newest complete tag)."""
    pointer = Path(state_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    folder = Path(state_dir) / tag
    if not TAG_PATTERN.match(tag) or not folder.is_dir():
        raise ResumeError(f"{pointer}: names {tag!r}, which is not a state folder")
    return folder


def load_state(tag_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Restore trainable parameters, optimizer and this rank's RNG; return {"step", "loader"}."""
    files = {n: tag_dir / n for n in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json",
                                      f"rank{rank:05d}.safetensors", f"rank{rank:05d}.json")}
    for f in files.values():
        if not f.is_file():
            raise ResumeError(f"{f}: missing from the fine-tuning state (written by a different world size?)")
    params = dict(model.named_parameters())
    trainable = load_file(str(files["trainable.safetensors"]))
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != expected:
        raise ResumeError(f"{files['trainable.safetensors']}: trainable parameters differ from the model "
                          f"(e.g. {sorted(set(trainable) ^ expected)[:3]})")
    with torch.no_grad():
        for n, v in trainable.items():
            params[n].copy_(v)
    groups = json.loads(files["optimizer.json"].read_text())
    order = [names for g in groups for names in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    saved = load_file(str(files["optimizer.safetensors"]))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        name, _, field = key.rpartition(".")
        state.setdefault(index[name], {})[field] = value
    current = [names for g in optimizer.param_groups for names in g["params"]]
    ids = {id(p): n for n, p in params.items()}
    if [ids[id(p)] for p in current] != order:
        raise ResumeError(f"{files['optimizer.json']}: optimizer parameters differ from the model's")
    optimizer.load_state_dict({"state": state, "param_groups": [dict(g, params=[index[n] for n in g["params"]])
                                                                for g in groups]})
    torch.set_rng_state(load_file(str(files[f"rank{rank:05d}.safetensors"]))["torch_rng"])
    return json.loads(files[f"rank{rank:05d}.json"].read_text())
