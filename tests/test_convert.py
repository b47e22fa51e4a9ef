"""shards.convert: shards round-trip bit-exactly; the manifest is right (counts, sha256, sources);
reruns skip what is done; the output is deterministic; the CLI runs with --set overrides."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from launch.cli import load_config
from shards.convert import ConvertConfig, convert
from shards.layout import find_cases
from shards.manifest import Manifest
from shards.matfile import read_kspace, read_mask
from shards.sample import META_KEYS, SCHEMA_VERSION, Sample

ROOT = Path(__file__).resolve().parents[1]


def read_shard(path: Path) -> dict[str, Sample]:
    """Every sample of one tar, decoded with the reader's schema."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, member = m.name.partition(".")
            groups.setdefault(key, {})[member] = tf.extractfile(m).read()
    return {k: Sample.from_files(k, files) for k, files in groups.items()}


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_shards_round_trip_bit_exactly(synthetic_root: Path, shard_dir: Path) -> None:
    manifest = Manifest.read(shard_dir)
    cases = {c.source: c for c in find_cases(synthetic_root)}
    samples = {k: s for p in manifest.shard_paths(shard_dir) for k, s in read_shard(p).items()}
    assert manifest.errors == [] and set(manifest.sources) == set(cases)
    cache: dict[Path, np.ndarray] = {}

    def kspace(path: Path) -> np.ndarray:
        if path not in cache:
            cache.clear()
            cache[path] = read_kspace(path)
        return cache[path]

    n_expected = 0
    for source, case in sorted(cases.items()):
        k = kspace(case.kspace_path)
        n_expected += k.shape[1]
        for z in range(k.shape[1]):
            mine = [s for s in samples.values() if s.meta["source"] == source and s.meta["slice"] == z]
            assert len(mine) == 1, (source, z)
            s = mine[0]
            assert bits_equal(s.kspace, np.ascontiguousarray(k[:, z])), (source, z)
            assert s.meta["shape"] == list(k[:, z].shape) and s.meta["nz"] == k.shape[1]
            for name in ("year", "split", "task", "set", "center", "scanner", "vendor", "field_T", "model",
                         "patient", "modality", "file", "view", "pattern", "R", "info"):
                assert s.meta[name] == getattr(case, name), (source, name)
            assert set(META_KEYS) <= set(s.meta) and s.meta["key"] == s.key and "." not in s.key
            assert s.meta["fully_sampled"] == (case.set == "FullSample")
            if case.set == "UnderSample":
                assert s.meta["has_mask"] and bits_equal(s.mask, read_mask(case.mask_paths[0]))
            else:
                assert s.mask is None and not s.meta["has_mask"]
            assert s.meta["has_reference"] == (case.reference_path is not None)
            if case.reference_path is not None:
                assert bits_equal(s.ref, np.ascontiguousarray(read_kspace(case.reference_path)[:, z]))
            assert s.meta["scale"] > 0
    assert len(samples) == n_expected == manifest.samples()


def test_manifest_counts_hashes_and_config(shard_dir: Path) -> None:
    manifest = Manifest.read(shard_dir)
    assert manifest.schema_version == SCHEMA_VERSION
    assert {s.split for s in manifest.shards} >= {"train", "val"}
    for entry in manifest.shards:
        path = shard_dir / entry.name
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.bytes
        assert entry.name.startswith(entry.split + "-")
        samples = read_shard(path)
        assert len(samples) == entry.samples and all(s.meta["split"] == entry.split for s in samples.values())
    assert sum(v["samples"] for v in manifest.sources.values()) == manifest.samples()
    assert not list(shard_dir.glob("*.tmp"))
    cfg = load_config(ConvertConfig, shard_dir / "convert_config.toml")
    assert cfg.shard_samples == manifest.config["shard_samples"]


def test_rerun_skips_done_files_and_output_is_deterministic(tree, tmp_path: Path) -> None:
    for p in ("P001", "P002"):
        tree.train_file("Cine", "Center005", "UIH_30T_umr780", p, "cine_sax", tree.kspace(nz=3, scale=1e6))
    tree.val_file("TaskR1", "Cine", "Center009", "Siemens_15T_Aera", "P001", "cine_sax", tree.kspace())
    cfg = ConvertConfig(input=str(tree.root), out=str(tmp_path / "a"), shard_samples=2, progress=False)
    first = convert(cfg)
    again = convert(ConvertConfig(input=str(tree.root), out=str(tmp_path / "b"), shard_samples=2, progress=False))
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in again.shards]   # deterministic bytes
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.tar")}
    rerun = convert(cfg)
    assert rerun.shards == first.shards and rerun.sources == first.sources
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.tar")} == files   # nothing rewritten
    tree.train_file("Cine", "Center005", "UIH_30T_umr780", "P003", "cine_sax", tree.kspace(nz=1))
    grown = convert(cfg)
    assert grown.shards[: len(first.shards)] == first.shards
    new = grown.shards[len(first.shards):]
    assert [(s.split, s.samples) for s in new] == [("train", 1)]
    assert set(grown.sources) - set(first.sources) == {
        "ChallengeData/MultiCoil/Cine/TrainingSet/FullSample/Center005/UIH_30T_umr780/P003/cine_sax.mat"}


def test_cli_with_set_overrides(tree, tmp_path: Path) -> None:
    tree.train_file("T2w", "Center002", "UIH_30T_umr880", "P001", "T2w", tree.kspace()[0])
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "shards.convert", "--set", f"input={tree.root}", "--set", f"out={out}",
                           "--set", "shard_samples=1", "--set", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "1 shards, 2 samples (train: 2), 0 errors" in proc.stdout   # whole files per shard
    assert json.loads((out / "manifest.json").read_text())["config"]["shard_samples"] == 1
    bad = subprocess.run([sys.executable, "-m", "shards.convert", "--set", "shard_size=3"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "shard_size" in bad.stderr
