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
    args = ["tiny=true", f"out={out}", "labelled=1,all", "forms=lora,lora:r2:attn:last,lora+scale_shift:conv,scale_shift+prompt"]
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
    assert [f["spec"] for f in res["forms"]] == ["lora", "lora:r2:attn:last", "lora+scale_shift:conv", "scale_shift+prompt"]
    assert [(f["rank"], f["layers"], f["cascades"]) for f in res["forms"]] == [
        ("8", "attn+mlp", "all"), ("2", "attn", "last"), ("8", "conv", "all"), ("-", "attn+mlp", "all")]
    # the tiny bench model: dim 32, depth 1, mlp 4 x, 2 cascades, conv 4, patch 4 (bench/label_efficiency.py run())
    d, h, c = 32, 128, 4
    lora_attn_mlp = 2 * 8 * ((d + 3 * d) + (d + d) + (d + h) + (h + d))          # r (in + out), both cascades
    conv_out = [c, c, c, 2]                                                      # stem.0/2, conv_head.1/3
    conv_lora = 2 * 8 * ((2 * 9 + c) + (c * 9 + c) + (c * 9 + c) + (c * 9 + 2))  # r (in k k + out)
    expected = [lora_attn_mlp, 2 * ((d + 3 * d) + (d + d)), conv_lora + 2 * 2 * sum(conv_out),
                2 * 2 * (3 * d + d + h + d) + 6 * d]
    assert [f["trainable"] for f in res["forms"]] == expected
    for f in res["forms"]:
        assert f["reload_exact"] is True and f["share"] == f["trainable"] / results["parameters"]
        assert (out / "adapters" / "ablation").is_dir()
    matrices = results["matrices"]
    unlike = matrices["Center014/GE_15T_SIGNAArtist"]
    assert unlike["coils"] == [6] and matrices["training"]["coils"] == [4]
    assert unlike["ny"][1] < matrices["training"]["ny"][0] and unlike["nx"][0] > matrices["training"]["nx"][1]
    sets = ["held-out", "held-out, 4 coils, k-space x10000",
            f"Center014/GE_15T_SIGNAArtist, {unlike['ny'][0]}-{unlike['ny'][1]} x {unlike['nx'][0]}-{unlike['nx'][1]}, 6 coils"]
    assert list(res["sets"]) == sets and all(v["R_eff"] > 1 for v in res["sets"].values())
    runs = [("pretrained", 0), ("pretrained", 2), ("best adapter", 0), ("best adapter", 2)]
    assert [(t["set"], t["start"], t["steps"]) for t in res["test_time"]] == [(s, *r) for s in sets for r in runs]
    assert all(t["status"] in ("none", "adapted", "stopped early", "fallback") for t in res["test_time"])
    for n in ("1", "all"):
        for seed in (0, 1):
            folder = out / "adapters" / f"{n}_s{seed}" / "cine_ktGaussian"
            assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    text = (out / "label_efficiency.md").read_text()
    assert "(a) adapter" in text and "test-time adaptation" in text
    assert (out / "label_efficiency.png").stat().st_size > 1000


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_label_efficiency", ROOT / "bench/label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_label_efficiency"] = module
    spec.loader.exec_module(module)
    return module


def test_ablation_variants_parse_and_bad_ones_are_refused_by_name() -> None:
    le = _bench()
    v = le.parse_variant("lora+prompt:r4:attn+conv:c0+-1", 8)
    assert (v.forms, v.rank, v.layers, v.cascades) == (("lora", "prompt"), 4, ("attn", "conv"), (0, -1))
    assert le.parse_variant("lora", 8).describe() == ("8", "attn+mlp", "all")
    assert le.parse_variant("lora:last", 8).describe() == ("8", "attn+mlp", "last")
    assert le.parse_variant("prompt", 8).describe() == ("-", "-", "-")
    for bad in ("ia3", "lora:r0", "lora:attention"):
        with pytest.raises(SystemExit, match=bad.split(":")[0] if bad == "ia3" else "lora"):
            le.parse_variant(bad, 8)


def test_step_matched_training_runs_exactly_max_steps() -> None:
    import torch

    le = _bench()
    w = torch.nn.Parameter(torch.ones(3))
    calls = []

    def loss_fn():
        calls.append(1)
        return (w ** 2).sum()

    stats = le.Q.train_for(1e9, [w], loss_fn, 0.1, "test", max_steps=4)   # a budget of seconds that never ends
    assert stats["steps"] == 4 and len(calls) == 4
