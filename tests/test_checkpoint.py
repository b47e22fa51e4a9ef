"""Checkpoints (pretrain/checkpoint.py) and the DeepSpeed config (pretrain/engine.py), in one process.

A 1-rank gloo group in this process; the multi-rank and kill/crash cases are in test_pretrain_faults.py.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from pretrain import checkpoint as ck
from pretrain.checkpoint import CheckpointError
from pretrain.dist_env import read_dist_env
from pretrain.objective import ssdu_step_loss
from pretrain.settings import PretrainConfig


def tiny_cfg(tmp_path, stage: int = 2) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model.size, cfg.model.dim, cfg.model.depth, cfg.model.cascades = "tiny", 32, 1, 2
    cfg.deepspeed.zero_stage = stage
    cfg.run.dir, cfg.run.steps = str(tmp_path / "run"), 10
    cfg.optim.warmup_steps = 0
    return cfg


@pytest.fixture(scope="module")
def engine_mod():
    """A 1-rank process group for this module (environment restored afterwards)."""
    from pretrain import engine as E

    saved = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    E.init_distributed(read_dist_env("cpu"))
    yield E
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 3, 16, 24)
    mask[:, :, ::3] = 1
    mask[:, :, 6:10] = 1
    k = torch.randn(2, 3, 4, 16, 24, dtype=torch.complex64, generator=g) * mask[:, :, None]
    return {"kspace": k, "mask": mask, "meta": [{"__key__": f"s{seed}a"}, {"__key__": f"s{seed}b"}]}


def train(engine, cfg, steps: range) -> None:
    for step in steps:
        loss = ssdu_step_loss(engine, batch(step), cfg.objective, cfg.run.seed, step)
        engine.backward(loss)
        engine.step()


def params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_ds_config_is_derived_once_from_the_typed_config(tmp_path, engine_mod) -> None:
    cfg = tiny_cfg(tmp_path, stage=3)
    cfg.data.micro_batch, cfg.deepspeed.grad_accum, cfg.deepspeed.offload = 3, 4, "cpu"
    conf = engine_mod.ds_config(cfg, world=8)
    assert conf["train_batch_size"] == 3 * 4 * 8
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert conf["optimizer"]["params"]["torch_adam"] is True
    assert conf["bf16"]["enabled"] is False                        # auto on CPU: fp32
    cfg.run.device = "cuda"
    assert engine_mod.ds_config(cfg, world=8)["bf16"]["enabled"] is True
    path = engine_mod.write_ds_config(conf, tmp_path / "run")
    assert json.loads(path.read_text()) == conf
    cfg.deepspeed.zero_stage = 4
    with pytest.raises(ValueError, match="zero_stage"):
        engine_mod.ds_config(cfg, world=1)


def test_save_resume_restores_weights_optimizer_rng_and_loader(tmp_path, engine_mod) -> None:
    cfg = tiny_cfg(tmp_path)
    conf = engine_mod.ds_config(cfg, 1)
    dist = read_dist_env("cpu")
    a = engine_mod.build_engine(cfg, dist, conf)
    train(a, cfg, range(1, 3))
    ck.save(a, tmp_path / "ck", 2, {"position": [2, 7]}, cfg, keep=2, owner="run-a")
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step00000002"
    after_save = torch.rand(3)
    train(a, cfg, range(3, 5))
    expected = params(a)

    b = engine_mod.build_engine(cfg, dist, conf)
    with torch.no_grad():
        for p in b.module.parameters():
            p.add_(1.0)                                            # loading must overwrite this
    state = ck.resume(b, tmp_path / "ck")
    assert (state.step, state.tag, state.loader) == (2, "step00000002", {"position": [2, 7]})
    assert torch.equal(torch.rand(3), after_save)                  # RNG as it was at the save
    train(b, cfg, range(3, 5))
    assert all(torch.equal(x, y) for x, y in zip(params(b), expected))   # bitwise: optimizer + scheduler too
    # every file of the checkpoint loads without unpickling arbitrary objects
    for f in (tmp_path / "ck" / "step00000002").glob("*.pt"):
        with torch.serialization.safe_globals(engine_mod.DEEPSPEED_SAFE_GLOBALS):
            torch.load(f, weights_only=True)


def test_keep_last_k_and_a_crash_while_saving_leaves_latest_usable(tmp_path, engine_mod, monkeypatch) -> None:
    cfg = tiny_cfg(tmp_path)
    e = engine_mod.build_engine(cfg, read_dist_env("cpu"), engine_mod.ds_config(cfg, 1))
    for step in range(1, 5):
        train(e, cfg, range(step, step + 1))
        ck.save(e, tmp_path / "ck", step, {}, cfg, keep=2, owner="run-a")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()) == ["step00000003", "step00000004"]
    good = params(e)

    def crash(save_dir, tag, **kw):                                # dies half-way through DeepSpeed's files
        (tmp_path / "ck" / tag / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt("killed while writing")

    train(e, cfg, range(5, 6))
    monkeypatch.setattr(e, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save(e, tmp_path / "ck", 5, {}, cfg, keep=2, owner="run-a")
    monkeypatch.undo()
    assert ck.read_latest(tmp_path / "ck") == "step00000004"
    assert not (tmp_path / "ck" / "step00000005").exists()       # never published under its tag name
    assert [p.name for p in ck.discard_incomplete(tmp_path / "ck")] == ["step00000005.incomplete"]
    state = ck.resume(e, tmp_path / "ck")
    assert state.step == 4 and all(torch.equal(x, y) for x, y in zip(params(e), good))


def test_corrupt_or_missing_checkpoints_raise_errors_naming_them(tmp_path, engine_mod) -> None:
    cfg = tiny_cfg(tmp_path)
    e = engine_mod.build_engine(cfg, read_dist_env("cpu"), engine_mod.ds_config(cfg, 1))
    ckdir = tmp_path / "ck"
    assert ck.resume(e, ckdir) is None                             # nothing yet: fresh start
    train(e, cfg, range(1, 2))
    ck.save(e, ckdir, 1, {}, cfg, keep=2, owner="run-a")
    optim = next((ckdir / "step00000001").glob("zero_pp_rank_0_*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])                    # truncated
    with pytest.raises(CheckpointError, match=str(optim.name)):
        ck.resume(e, ckdir)
    rank_file = ckdir / "step00000001" / "cmrfm_rank00000.pt"
    optim.unlink()
    with pytest.raises(CheckpointError, match="optim_states.pt: checkpoint file is missing"):
        ck.resume(e, ckdir)
    ck.save(e, ckdir, 1, {}, cfg, keep=2, owner="run-a")           # repaired
    rank_file.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cmrfm_rank00000.pt"):
        ck.resume(e, ckdir)
    (ckdir / "latest").write_text("step00000007\n")
    with pytest.raises(CheckpointError, match="step00000007"):
        ck.resume(e, ckdir)
    (ckdir / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="latest: does not name a checkpoint tag"):
        ck.resume(e, ckdir)


@pytest.mark.parametrize("stage", [2, 3])
def test_export_backbone_round_trips_to_a_recon_model(tmp_path, engine_mod, stage: int) -> None:
    cfg = tiny_cfg(tmp_path, stage=stage)
    e = engine_mod.build_engine(cfg, read_dist_env("cpu"), engine_mod.ds_config(cfg, 1))
    train(e, cfg, range(1, 3))
    path = ck.export_backbone(e, tmp_path / "run", step=2)
    assert path == tmp_path / "run" / "backbone.safetensors"
    model = ck.load_backbone(tmp_path / "run")
    full = ck.consolidated_state_dict(e)
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["dim"] == 32
    assert set(model.state_dict()) == set(full)
    assert all(torch.equal(model.state_dict()[k], full[k].float()) for k in full)
    b = batch(9)
    with torch.no_grad():
        e.eval(); model.eval()
        assert torch.allclose(model(b["kspace"], b["mask"], b["meta"])["image"],
                              e(b["kspace"], b["mask"], b["meta"])["image"], atol=1e-5)
    # the config travels inside the weights file: a stale or missing json cannot mismatch the pair
    (tmp_path / "run" / "model_config.json").write_text(json.dumps({**json.loads(
        (tmp_path / "run" / "model_config.json").read_text()), "dim": 64}))
    assert ck.load_backbone(tmp_path / "run").config.dim == 32
    (tmp_path / "run" / "model_config.json").unlink()
    assert ck.load_backbone(tmp_path / "run" / "backbone.safetensors").config.dim == 32
    from safetensors.torch import save_file                        # an export from before: json needed
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "old.safetensors"))
    with pytest.raises(CheckpointError, match="model_config.json: missing"):
        ck.load_backbone(tmp_path / "old.safetensors")


def test_missing_latest_recovers_it_and_never_deletes_a_complete_or_foreign_tag(tmp_path, engine_mod) -> None:
    """Issue 11 item 1: without `latest`, start-up deleted every tag. Now the complete tags stay,
    `latest` is recovered from the newest complete one (said in the log), a folder another run or tool
    wrote (no completion marker) is kept and not resumed from, and only `*.incomplete` goes."""
    cfg = tiny_cfg(tmp_path)
    e = engine_mod.build_engine(cfg, read_dist_env("cpu"), engine_mod.ds_config(cfg, 1))
    ckdir = tmp_path / "ck"
    for step in (1, 2):
        train(e, cfg, range(step, step + 1))
        ck.save(e, ckdir, step, {"at": step}, cfg, keep=5, owner="run-a")
    foreign = ckdir / "step00000300"                               # copied from another run, no marker
    foreign.mkdir()
    (foreign / "mp_rank_00_model_states.pt").write_bytes(b"someone else's")
    half = ckdir / "step00000003.incomplete"                       # a dead writer's partial tag
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"PK half")
    (ckdir / "latest").unlink()
    said: list[str] = []
    removed = ck.discard_incomplete(ckdir, log=said.append)
    assert removed == [half] and not half.exists()
    assert {p.name for p in ckdir.iterdir() if p.is_dir()} == {"step00000001", "step00000002", "step00000300"}
    assert (ckdir / "latest").read_text().strip() == "step00000002"
    assert any("recovered it from the newest complete checkpoint step00000002" in m for m in said), said
    assert any("step00000300" in m and "never deleted" in m for m in said), said
    assert ck.resume(e, ckdir).loader == {"at": 2}
    # a second start changes nothing more
    assert ck.discard_incomplete(ckdir, log=said.append) == []
    assert {p.name for p in ckdir.iterdir() if p.is_dir()} == {"step00000001", "step00000002", "step00000300"}


def test_pruning_keeps_other_lineages_and_a_same_named_tag_is_moved_aside(tmp_path, engine_mod) -> None:
    """A shared checkpoint.dir: run B's saves prune only B's tags; B saving a tag name A already has
    moves A's folder aside instead of writing into it."""
    cfg = tiny_cfg(tmp_path)
    e = engine_mod.build_engine(cfg, read_dist_env("cpu"), engine_mod.ds_config(cfg, 1))
    ckdir = tmp_path / "ck"
    for step in (1, 2):
        ck.save(e, ckdir, step, {"run": "a"}, cfg, keep=1, owner="run-a")
    assert ck.tag_owner(ckdir / "step00000002") == "run-a" and not (ckdir / "step00000001").exists()
    for step in (2, 3, 4):
        ck.save(e, ckdir, step, {"run": "b"}, cfg, keep=1, owner="run-b")
    names = sorted(p.name for p in ckdir.iterdir() if p.is_dir())
    assert names[-1] == "step00000004" and "step00000003" not in names and "step00000002" not in names
    aside = [n for n in names if n.startswith("step00000002.superseded-")]
    assert len(aside) == 1 and ck.tag_owner(ckdir / aside[0]) == "run-a"     # A's tag kept, renamed


def test_a_second_writer_of_a_checkpoint_folder_is_refused(tmp_path) -> None:
    from launch.outputs import FolderLock, OutputError

    ckdir = tmp_path / "ck"
    with FolderLock(ckdir):
        with pytest.raises(OutputError, match=f"another process \\(pid {os.getpid()}\\) is writing"):
            FolderLock(ckdir).acquire()
    FolderLock(ckdir).acquire().release()                          # free again once released


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (root only): `mount(size_bytes) -> Path`; unmounted afterwards."""
    import shutil
    import subprocess

    mounted: list = []

    def mount(size: int):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if r.returncode != 0 or shutil.disk_usage(where).total > 2 * size:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_whole(tmp_path, engine_mod, small_disk) -> None:
    """Fill the disk during a checkpoint write: the save fails loudly (OSError ENOSPC), `latest` still
    names the previous tag, that tag resumes bitwise, and no half-written file is visible under a tag
    name; the next start removes the leftover `.incomplete` folder."""
    import errno
    import shutil

    cfg = tiny_cfg(tmp_path)
    e = engine_mod.build_engine(cfg, read_dist_env("cpu"), engine_mod.ds_config(cfg, 1))
    train(e, cfg, range(1, 2))
    probe = tmp_path / "probe"
    ck.save(e, probe, 1, {}, cfg, keep=1, owner="probe")
    one = sum(f.stat().st_size for f in (probe / "step00000001").iterdir())
    ckdir = small_disk(int(1.5 * one) + (64 << 10)) / "ck"          # room for one checkpoint, not two
    ck.save(e, ckdir, 1, {"at": 1}, cfg, keep=1, owner="run-a")
    good = params(e)
    train(e, cfg, range(2, 3))
    with pytest.raises(CheckpointError, match="step00000002.incomplete: writing checkpoint step00000002 failed") as info:
        ck.save(e, ckdir, 2, {"at": 2}, cfg, keep=1, owner="run-a")
    cause = info.value.__cause__
    assert getattr(cause, "errno", None) == errno.ENOSPC or "unexpected pos" in str(cause) or "No space" in str(cause)
    assert ck.read_latest(ckdir) == "step00000001"
    assert sorted(p.name for p in ckdir.iterdir() if ck.TAG_PATTERN.match(p.name)) == ["step00000001"]
    assert not list(ckdir.glob("*.tmp*")) and not list((ckdir / "step00000001").glob("*.tmp*"))
    assert ck.discard_incomplete(ckdir) == [ckdir / "step00000002.incomplete"]
    state = ck.resume(e, ckdir)
    assert state.loader == {"at": 1} and all(torch.equal(x, y) for x, y in zip(params(e), good))
    shutil.rmtree(probe)
