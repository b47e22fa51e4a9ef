"""bench/label_efficiency.py runs end to end on a tiny setting: every arm on every label count and seed,
the adapter-form ablation, test-time adaptation from the pretrained model and the best adapter, the
adapters in the PEFT layout, the table and the PNG; bench/tta_followup.py rebuilds a missing run and runs
every test-time start."""

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
    args = ["tiny=true", f"out={out}", "labelled=1,all", "forms=lora,lora:r2:attn:last,lora+scale_shift:conv,scale_shift+prompt",
            "adapt_variants=lora:r4@1e-3,lora:r2:conv@1e-2"]
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
    # the main test-time adapter (rank-4 LoRA on attn+mlp) everywhere; the probe (rank-2 conv LoRA at lr 1e-2)
    # on the held-out set from (f) at the largest N only
    runs = [("pretrained", 0, "lora:r4"), ("pretrained", 2, "lora:r4"), ("best adapter", 0, "lora:r4"),
            ("best adapter", 2, "lora:r4")]
    expected_runs = [(s, *r) for s in sets for r in runs]
    expected_runs.insert(2, ("held-out", "pretrained", 2, "lora:r2:conv"))
    assert [(t["set"], t["start"], t["steps"], t["variant"]) for t in res["test_time"]] == expected_runs
    assert all(t["status"] in ("none", "adapted", "stopped early", "fallback") for t in res["test_time"])
    lora_r4 = 2 * 4 * ((d + 3 * d) + (d + d) + (d + h) + (h + d))              # r (in + out), attn+mlp, both cascades
    conv_r2 = 2 * 2 * ((2 * 9 + c) + (c * 9 + c) + (c * 9 + c) + (c * 9 + 2))   # r (in k k + out), conv
    for t in res["test_time"]:
        if t["steps"] == 0:
            assert t["trainable"] == 0 and t["ssdu_before"] is None
        else:
            assert t["trainable"] == (conv_r2 if t["variant"] == "lora:r2:conv" else lora_r4)
            assert t["lr"] == (1e-2 if t["variant"] == "lora:r2:conv" else 1e-3)
            assert t["ssdu_best"] <= t["ssdu_before"] and 0 <= t["best_step"] <= t["steps"]
    assert (out / "pretrained.safetensors").is_file()
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


def test_test_time_variants_parse_and_bad_ones_are_refused_by_name(tmp_path: Path) -> None:
    le = _bench()
    v, lr = le.parse_adapt_variant("lora:r16:conv@1e-2", 4, 1e-3)
    assert (v.forms, v.rank, v.layers, lr) == (("lora",), 16, ("conv",), 1e-2)
    v, lr = le.parse_adapt_variant("lora", 4, 1e-3)
    assert (v.rank, v.layers, lr) == (4, ("attn", "mlp"), 1e-3)
    for bad, match in (("lora@fast", "'fast' is not a number"), ("lora@-1", "must be > 0"), ("lora:conf", "lora:conf")):
        with pytest.raises(SystemExit, match=match):
            le.parse_adapt_variant(bad, 4, 1e-3)
    with pytest.raises(SystemExit, match=r"adapt_sets \['nowhere'\]"):   # refused before any data is read
        le.run(le.LabelEfficiencyConfig(out=str(tmp_path / "x"), adapt_sets=["held-out", "nowhere"]))


def test_default_label_efficiency_adapter_meets_the_parameter_budget(tmp_path: Path) -> None:
    """Arm (a)'s default adapter (ABLATION[0], rank-16 LoRA on the conv stem and head) on the bench's
    default model: a no-op at init, its count r (in k k + out) per conv from the layer shapes, at most 1% of
    the model, and its PEFT folder reloads into a fresh backbone exactly."""
    import copy

    import torch

    from models.adapters import adapter_parameters, add_adapters, load_adapter, save_adapter
    from models.sizes import build_model, parameter_count

    le = _bench()
    cfg = le.LabelEfficiencyConfig()
    v = le.parse_variant(le.ABLATION[0], cfg.adapter_rank)
    assert (v.forms, v.rank, v.layers, v.cascades) == (("lora",), 16, ("conv",), ())
    torch.manual_seed(0)
    base = build_model(cfg.model).eval()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 3, 32, 48, generator=g) < 0.3).float()
    mask[..., 12:20, :] = 1
    kspace = torch.randn(1, 3, 4, 32, 48, dtype=torch.complex64, generator=g) * mask[:, :, None]
    meta = [{"modality": "Cine", "pattern": "ktGaussian", "R": 16, "vendor": "Philips", "field_T": 3.0}]
    with torch.no_grad():
        before = model(kspace, mask, meta)["image"]
        add_adapters(model, v.rank, 2.0 * v.rank, v.targets, forms=v.forms, cascades=v.cascades)
        assert torch.equal(model(kspace, mask, meta)["image"], before)
    m, c = cfg.model, cfg.model.conv_channels          # stem: 2 -> c -> c (3 x 3); head: c -> c -> 2 (3 x 3)
    per_cascade = v.rank * ((2 * 9 + c) + (c * 9 + c) + (c * 9 + c) + (c * 9 + 2))
    trainable = sum(p.numel() for p in adapter_parameters(model))
    assert trainable == m.cascades * per_cascade == 32_000
    assert trainable <= 0.01 * parameter_count(base)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        adapted = model(kspace, mask, meta)["image"]
    assert not torch.equal(adapted, before)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, save_adapter(model, tmp_path / "cine_ktGaussian", {"contrast": "cine", "pattern": "ktGaussian"}))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(kspace, mask, meta)["image"], adapted)


@pytest.mark.slow
def test_tta_followup_rebuilds_a_missing_run_and_runs_every_start(tmp_path: Path) -> None:
    """bench/tta_followup.py on an empty run folder (tiny): it pretrains (f) and trains the best adapter,
    then adapts from (f), from the adapter (with and without the anchor) and stacks; the zero-step rows
    are the unadapted models, the stacked row shares (f)'s adaptation, every adapted row reports its drift;
    the supervised ablation rows (full fine-tuning, an adapter at its own lr) follow."""
    run = tmp_path / "run"
    runs = ["held-out/pretrained/0", "held-out/best adapter/0", "held-out/pretrained/2", "held-out/stack/2",
            "held-out/best adapter/2", "held-out/best adapter/2/a5"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench/tta_followup.py"), "--set", "tiny=true", "--set", f"run={run}",
                           "--set", "best=1_s0", "--set", "variant=lora:r2:conv@1e-2", "--set", "adapt_windows=2",
                           "--set", "adapter=lora:r2:conv", "--set", "adapter_lr=1e-2", "--set", "ablation_labelled=1",
                           "--set", "runs=" + ",".join(runs), "--set", "ablation=full,lora:r2:conv@1e-2"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "pretrained.safetensors").is_file() and (run / "adapters/1_s0/cine_ktGaussian").is_dir()
    rows = json.loads((run / "tta_followup.json").read_text())["rows"]
    assert [(r["start"], r["steps"], r["anchor"]) for r in rows] == [
        ("pretrained", 0, 0), ("best adapter", 0, 0), ("pretrained", 2, 0), ("stack", 2, 0), ("best adapter", 2, 0),
        ("best adapter", 2, 5)]
    assert rows[0]["psnr"] != rows[1]["psnr"]  # the adapter changes the output
    assert rows[3]["ssdu_kept"] == rows[2]["ssdu_kept"] and rows[3]["status"] == rows[2]["status"]  # one adaptation
    for r in rows[2:]:
        assert math.isfinite(r["psnr"]) and r["ssdu_before"] is not None and r["drift_last"] >= 0
    ablation = json.loads((run / "tta_followup.json").read_text())["ablation"]
    assert [(r["spec"], r["lr"], r["steps"]) for r in ablation] == [("full", 1e-3, 2), ("lora:r2:conv@1e-2", 1e-2, 2)]
    assert ablation[1]["trainable"] < ablation[0]["trainable"] and ablation[0]["share"] == 1.0
    # the rebuilt "best" adapter (adapter=lora:r2:conv at adapter_lr 1e-2 on 1 file, seed 0) is the ablation's
    # "lora:r2:conv@1e-2" row trained by another path (ablation_rows, unmerged): the same model, so the same score
    # (to the merge's rounding); at the bench's default lr 3e-3 it would differ
    assert ablation[1]["psnr"] == pytest.approx(rows[1]["psnr"], abs=1e-3)
    saved = json.loads((run / "adapters/1_s0/cine_ktGaussian/adapter_config.json").read_text())
    assert (saved["variant"], saved["lr"], saved["r"]) == ("lora:r2:conv", 1e-2, 2)
    bad = subprocess.run([sys.executable, str(ROOT / "bench/tta_followup.py"), "--set", f"run={run}",
                          "--set", "runs=held-out/supervised/2"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "held-out/supervised/2" in bad.stderr


@pytest.mark.slow
def test_label_grid_on_a_loaded_backbone_with_two_adapter_variants(tmp_path: Path) -> None:
    """`pretrained=` loads an earlier run's SSL backbone instead of pretraining: (f), (b) and (c) and the first
    adapter then score exactly as in that run (every arm seeds itself); `label_variants=2` trains the second of
    `forms` as a further arm (a) at every labelled count and seed, with its own adapter folder and columns, and
    reuses it for the ablation's row."""
    # step-matched (tiny caps these at 3 and 2): a wall-clock budget would make the two runs' step counts differ
    common = ["tiny=true", "labelled=all", "seeds=0", "adapt_sets=", "adapt_steps=0", "pretrain_steps=3",
              "finetune_steps=2"]

    def bench(out: Path, *extra: str) -> dict:
        args = common + [f"out={out}", *extra]
        proc = subprocess.run([sys.executable, str(ROOT / "bench/label_efficiency.py")]
                              + [a for kv in args for a in ("--set", kv)], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "results.json").read_text())

    first = bench(tmp_path / "a", "forms=lora:r2:conv")
    second = bench(tmp_path / "b", f"pretrained={tmp_path / 'a' / 'pretrained.safetensors'}",
                   "forms=lora:r2:conv,lora+scale_shift:r2:conv", "label_variants=2")
    assert second["pretrain"]["loaded"].endswith("pretrained.safetensors")
    a, b = first["patterns"]["ktGaussian"], second["patterns"]["ktGaussian"]
    for key in ("psnr", "ssim"):                                   # the same backbone, not a second draw
        assert b["pretrained"][key] == a["pretrained"][key]
    (ra,), (rb,) = a["labels"], b["labels"]
    for arm in ("adapter", "scratch", "full"):
        assert rb[arm]["psnr"] == ra[arm]["psnr"] and rb[arm]["ssim"] == ra[arm]["ssim"]
    assert ra["adapter_variants"] == {} and list(rb["adapter_variants"]) == ["lora+scale_shift:r2:conv"]
    extra = rb["adapter_variants"]["lora+scale_shift:r2:conv"]
    # the tiny bench model (2 cascades, conv 4): LoRA r (in k k + out) per conv, plus a scale and a shift per
    # output channel of each conv (stem 2 -> 4 -> 4, head 4 -> 4 -> 2), as the end-to-end test counts them
    c, conv_out = 4, [4, 4, 4, 2]
    conv_r2 = 2 * 2 * ((2 * 9 + c) + (c * 9 + c) + (c * 9 + c) + (c * 9 + 2))
    assert rb["adapter"]["trainable"] == conv_r2 and extra["trainable"] == conv_r2 + 2 * 2 * sum(conv_out)
    assert math.isfinite(extra["psnr"]) and extra["steps"] == rb["adapter"]["steps"]
    assert (tmp_path / "b/adapters/all_s0_lora+scale_shift_r2_conv/cine_ktGaussian/adapter_config.json").is_file()
    # the ablation's rows (every labelled file, first seed) are the grid's models, not retrained
    assert [(f["spec"], f["psnr"]) for f in b["forms"]] == [("lora:r2:conv", rb["adapter"]["psnr"]),
                                                           ("lora+scale_shift:r2:conv", extra["psnr"])]
    text = (tmp_path / "b/label_efficiency.md").read_text()
    assert "(a) `lora+scale_shift:r2:conv`" in text and "backbone loaded from" in text


def test_label_variants_beyond_forms_are_refused_before_any_data_is_read(tmp_path: Path) -> None:
    le = _bench()
    with pytest.raises(SystemExit, match="label_variants=3"):
        le.run(le.LabelEfficiencyConfig(out=str(tmp_path / "x"), forms=["lora", "lora:conv"], label_variants=3))
    assert not (tmp_path / "x").exists()
