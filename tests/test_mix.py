"""Mixing corpora and groups: over 1,000 samples the realised shares are within 3 standard errors of
the configured ones (computed here from the samples in the tars and the documented formula, not
from the loader's plan); the loader's own tally agrees; exact resume holds under mixing."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from launch.cli import load_config
from pretrain.settings import PretrainConfig
from shards.loader import LoaderConfig, make_loader
from shards.manifest import Manifest
from shards.mix import MixSource
from test_select import batches_with_states, resumes_exactly, tar_metas

N_DRAWS = 1000


def modality_counts(shard_dir: Path, split: str = "train") -> Counter:
    return Counter(m["modality"] for p in Manifest.read(shard_dir).shard_paths(shard_dir, split) for m in tar_metas(p))


def draw(cfg: LoaderConfig, n: int = N_DRAWS) -> tuple[list[dict], object]:
    loader = make_loader(cfg)
    metas: list[dict] = []
    for batch in loader:
        metas += batch["meta"]
        if len(metas) >= n:
            break
    return metas[:n], loader


def within_3_se(realised: dict, configured: dict, n: int) -> list[str]:
    bad = []
    for g, w in configured.items():
        se = math.sqrt(w * (1 - w) / n)
        if abs(realised.get(g, 0) / n - w) > 3 * se:
            bad.append(f"{g}: realised {realised.get(g, 0) / n:.3f}, configured {w:.3f}, 3 SE {3 * se:.3f}")
    return bad


def test_temperature_balanced_groups_are_realised_within_3_se(shard_dir: Path) -> None:
    counts = modality_counts(shard_dir)
    T = 2.0
    raw = {m: n ** (1 / T) for m, n in counts.items()}
    configured = {m: r / sum(raw.values()) for m, r in raw.items()}
    assert max(configured.values()) < counts.most_common(1)[0][1] / sum(counts.values())   # Cine is damped
    cfg = LoaderConfig(shards=str(shard_dir), split="train", micro_batch=4, seed=11, mix_by=["modality"], temperature=T)
    metas, loader = draw(cfg)
    realised = Counter(m["modality"] for m in metas)
    assert not (bad := within_3_se(realised, configured, N_DRAWS)), bad
    # the loader's own tally (what pretraining logs) counts the same samples
    tally = loader.mixed
    assert {k.split("=", 1)[1]: v["samples"] for k, v in tally.items() if v["samples"]} == dict(realised)
    assert all(tally[f"modality={m}"]["configured"] == pytest.approx(w) for m, w in configured.items())


def test_weighted_corpora_and_groups_within_them(shard_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "corpus_b"
    shutil.copytree(shard_dir, other)
    counts = modality_counts(shard_dir)
    b_mods = ["LGE", "Mapping"]
    # source a: cine only, weight 0.7; source b: LGE + Mapping, weight 0.3 split by size (temperature 1)
    nb = sum(counts[m] for m in b_mods)
    configured = {("a", "Cine"): 0.7, **{("b", m): 0.3 * counts[m] / nb for m in b_mods}}
    cfg = LoaderConfig(split="train", micro_batch=4, seed=5, mix_by=["modality"], mix=[
        MixSource(shards=str(shard_dir), select={"modality": ["cine"]}, weight=0.7),
        MixSource(shards=str(other), select={"modality": [m.lower() for m in b_mods]}, weight=0.3)])
    metas, loader = draw(cfg)
    realised = Counter(("b" if str(other) in m["__url__"] else "a", m["modality"]) for m in metas)
    assert set(realised) <= set(configured)
    assert not (bad := within_3_se(realised, configured, N_DRAWS)), bad


def test_mix_from_toml_and_bad_mixes(shard_dir: Path, tmp_path: Path) -> None:
    toml = tmp_path / "mix.toml"
    toml.write_text(f'[data]\nmix_by = ["modality", "center"]\ntemperature = 3.0\n'
                    f'[[data.mix]]\nshards = "{shard_dir}"\nweight = 1.0\nselect = {{year = ["2025"]}}\n')
    cfg = load_config(PretrainConfig, toml)
    assert cfg.data.mix == [MixSource(shards=str(shard_dir), select={"year": ["2025"]}, weight=1.0)]
    loader = make_loader(cfg.data)
    assert all(",center=" in g for g in loader.mixed) and sum(v["configured"] for v in loader.mixed.values()) == pytest.approx(1)
    with pytest.raises(ValueError, match="every source a weight"):
        make_loader(LoaderConfig(mix=[MixSource(str(shard_dir), {"modality": ["cine"]}, 1.0),
                                      MixSource(str(shard_dir), {"modality": ["lge"]}, 0.0)]))
    with pytest.raises(ValueError, match="same shard"):
        make_loader(LoaderConfig(mix=[MixSource(str(shard_dir)), MixSource(str(shard_dir))]))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_under_mixing_and_selection(shard_dir: Path, workers: int) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), split="train", workers=workers, micro_batch=2, bucket_limit=3, seed=4,
                       mix_by=["modality"], temperature=4.0, select={"year": ["2025"]})
    batches, states = batches_with_states(cfg)
    for i, restored in resumes_exactly(cfg, batches, states).items():
        # the realised-mix tally resumes too: it counts every sample handed out up to that batch
        expect = Counter(m["mix_group"] for b in batches[: i + 2] for m in b["meta"])
        assert {g: v["samples"] for g, v in restored.mixed.items() if v["samples"]} == dict(expect)
    with pytest.raises(ValueError, match="mix"):
        make_loader(LoaderConfig(**{**cfg.__dict__, "temperature": 1.0}), state=states[0])


def test_pretraining_logs_the_realised_mix(shard_dir: Path, tmp_path: Path) -> None:
    from pretrain.dist_env import DistEnv
    from pretrain.logbook import Logbook
    from pretrain.settings import LogConfig

    metas, loader = draw(LoaderConfig(shards=str(shard_dir), micro_batch=2, mix_by=["modality"], temperature=2.0), 40)
    book = Logbook(DistEnv(), LogConfig(every=5, tensorboard=False), tmp_path, 0, 10)
    for step in range(1, 11):
        book.mix(step, loader.mixed)
    book.close()
    lines = [json.loads(x) for x in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10]
    assert sum(v["samples"] for v in lines[-1]["groups"].values()) == sum(loader._mixed.values()) >= 40
