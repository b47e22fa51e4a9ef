"""bench/label_efficiency.py runs end to end on a tiny setting: every arm on every label count and seed,
the adapter-form ablation, test-time adaptation from the pretrained model and the best adapter, the
adapters in the PEFT layout, the table and the PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_label_efficiency_and_adaptation_bench_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "le"
    args = ["tiny=true", f"out={out}", "labelled=1,all", "forms=lora,scale_shift+prompt"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench/label_efficiency.py")]
                          + [a for kv in args for a in ("--set", kv)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    res = results["patterns"]["ktGaussian"]
    assert [(r["labelled"], r["seed"]) for r in res["labels"]] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    for r in res["labels"]:
        for arm in ("adapter", "scratch", "full"):
            assert math.isfinite(r[arm]["psnr"]) and 0 < r[arm]["ssim"] <= 1 and r[arm]["steps"] >= 1
        # the adapter trains far fewer parameters than the full model; scratch and full train all of them
        assert r["adapter"]["trainable"] < r["full"]["trainable"] == r["scratch"]["trainable"] == results["parameters"]
    assert [f["forms"] for f in res["forms"]] == ["lora", "scale_shift+prompt"]
    assert res["forms"][1]["trainable"] < res["forms"][0]["trainable"]
    runs = [("pretrained", 0), ("pretrained", 2), ("best adapter", 0), ("best adapter", 2)]
    assert [(t["set"], t["start"], t["steps"]) for t in res["test_time"]] == [
        (s, *r) for s in ("held-out", "held-out, 4 coils, k-space x10000") for r in runs]
    assert all(t["status"] in ("none", "adapted", "stopped early", "fallback") for t in res["test_time"])
    for n in ("1", "all"):
        for seed in (0, 1):
            folder = out / "adapters" / f"{n}_s{seed}" / "cine_ktGaussian"
            assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    text = (out / "label_efficiency.md").read_text()
    assert "(a) adapter" in text and "test-time adaptation" in text
    assert (out / "label_efficiency.png").stat().st_size > 1000
