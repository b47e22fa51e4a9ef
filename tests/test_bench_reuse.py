"""Benchmarks reuse corpus, shards and backbone under `out` only when the config that made them is
the one they would use now (issue 11 item 5): otherwise they stop, naming the differences, instead of
measuring one corpus while reporting another."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from launch.cli import dump_config, load_config
from pretrain.settings import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fg():
    return bench("foundation_gain")


def small(fg, out: Path, **kw):
    return fg.BenchConfig(out=str(out), train_scanners=["Center001/UIH_30T_umr780"], patients_per_scanner=1,
                          eval_patients=1, ny=[40, 42], nx=[48, 50], coils=3, **kw)


def test_corpus_and_shards_are_reused_for_the_same_config_and_refused_for_another(fg, tmp_path: Path) -> None:
    work = tmp_path / "bench"
    data, shards = fg.corpus(small(fg, work), work)
    manifest = (shards / "manifest.json").read_bytes()
    assert fg.corpus(small(fg, work), work) == (data, shards)
    assert (shards / "manifest.json").read_bytes() == manifest            # reused as it was
    with pytest.raises(ValueError, match="another config"):
        fg.corpus(small(fg, work, seed=1), work)                           # another corpus: refused


def test_a_backbone_made_with_another_config_is_not_reused(fg, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "bench"
    cfg = small(fg, work)
    run_dir = work / "pretrain"
    argv = fg.pretrain_command(cfg, work / "shards", run_dir)
    sets = [argv[i + 1] for i in range(2, len(argv), 2)]
    other = load_config(PretrainConfig, argv[1], sets + ["run.steps=7"])
    dump_config(other, run_dir / "config.toml")
    (run_dir / "backbone.safetensors").write_bytes(b"made by a 7-step run")
    ran: list = []
    monkeypatch.setattr(fg.subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit, match=r"run\.steps: 7 -> 600"):
        fg.pretrain(cfg, work / "shards", work)
    assert not ran
    dump_config(load_config(PretrainConfig, argv[1], sets), run_dir / "config.toml")
    assert fg.pretrain(cfg, work / "shards", work)[0] == run_dir and not ran   # same config: reused
