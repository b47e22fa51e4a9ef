"""End to end: `bash launch/demo.sh` (the README's first command) on the tiny session corpus:
shards -> 1-process pretraining -> 2-process accelerate adapter bank -> reconstruction -> evaluation."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import scipy.io

from challenge.ranking import ranking_shape
from challenge.submission import parse_kus_path
from shards.matfile import read_kspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_pipeline_writes_tree_tables_and_figures(synthetic_root: Path, shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, CMRFM_OUT=str(out), CMRFM_DATA=str(synthetic_root), CMRFM_SHARDS=str(shard_dir),
               CMRFM_PRETRAIN_STEPS="3", CMRFM_PRETRAIN_RANKS="1", CMRFM_FINETUNE_STEPS="2",
               CMRFM_FINETUNE_RANKS="2", CMRFM_CONTRASTS="cine", CMRFM_BASELINES="zero_filled")
    proc = subprocess.run(["bash", "launch/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # 2 accelerate ranks trained every cine pattern of the shards into the bank
    for pattern in ("Uniform", "ktGaussian", "ktRadial"):
        folder = out / "adapters" / f"cine_{pattern}"
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert (out / "finetune" / f"cine_{pattern}" / "state" / "step00000002" / "rank00001.json").is_file()
    assert "2 rank(s)" in proc.stderr

    # one img4ranking per kus input, same relative path and name, official shape, float32
    inputs = sorted(p for p in (synthetic_root / "ChallengeData_ValSet").rglob("*_kus_*.mat"))
    for tree in ("cmrfm", "cmrfm_zero_filled"):
        written = sorted((out / "recon" / tree).rglob("*.mat"))
        assert len(written) == len(inputs), tree
    for src in inputs:
        case = parse_kus_path(src)
        arr = scipy.io.loadmat(out / "recon" / "cmrfm" / case.relative_path())["img4ranking"]
        nt, nz, _, ny, nx = read_kspace(src).shape
        assert arr.dtype == "float32" and arr.shape == ranking_shape(nx, ny, nz, nt, case.stem)
    report = json.loads((out / "recon" / "cmrfm" / "reconstruct_report.json").read_text())
    assert not report["errors"] and any(a.startswith("cine_") for a in report["adapters"].values())

    # tables (both methods scored on every file) and figures
    with open(out / "eval" / "per_file.csv") as fh:
        rows = list(csv.DictReader(fh))
    methods = {r.get("method") for r in rows}
    assert {"cmrfm", "zero_filled"} <= methods and len(rows) >= 2 * len(inputs)
    for name in ("per_center_vendor.csv", "per_contrast_pattern_R.csv", "results.json"):
        assert (out / "eval" / name).is_file(), name
    figures = list((out / "eval" / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 1000 for f in figures)
    assert str(out / "eval") in proc.stdout
