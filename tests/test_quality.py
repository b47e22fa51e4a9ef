"""bench/quality.py: the readout crop is exact for Cartesian masks, the VarNet arm sees the same batch as
cmrfm (same k-space, mask and FFT convention), parameter counts are matched, and the whole benchmark
runs end to end on a tiny setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench/quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


def _ifft2c(k: np.ndarray) -> np.ndarray:  # the centred orthonormal convention, written out in numpy
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _kspace(rng: np.random.Generator, t: int = 3, c: int = 4, y: int = 41, x: int = 90) -> np.ndarray:
    img = rng.standard_normal((t, c, y, x)) + 1j * rng.standard_normal((t, c, y, x))
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


@pytest.mark.parametrize("pattern", ["Uniform", "ktGaussian"])
def test_readout_crop_is_exact_for_line_masks(quality, pattern: str) -> None:
    rng = np.random.default_rng(0)
    k = _kspace(rng, t=12)
    cfg = quality.QualityConfig(crop_readout=True)
    problem = quality.make_problem(k, np.arange(3), pattern, 8, 5, {}, cfg)
    x0, x1 = problem.columns
    assert 0 < x0 < x1 < k.shape[-1] and x1 - x0 >= round(k.shape[-1] / 3)
    mask = quality.make_mask(pattern, 8, 12, k.shape[-2], k.shape[-1], seed=5)[:3]
    full_zf = _ifft2c(k[:3] * mask[:, None])[..., x0:x1] / problem.scale  # every column of the full problem
    np.testing.assert_allclose(_ifft2c(problem.kus), full_zf, atol=1e-5 * np.abs(full_zf).max())
    np.testing.assert_array_equal(problem.mask, mask[..., x0:x1])


def test_radial_problems_are_not_cropped(quality) -> None:
    k = _kspace(np.random.default_rng(1), t=12)
    problem = quality.make_problem(k, np.arange(3), "ktRadial", 8, 0, {}, quality.QualityConfig())
    assert problem.columns == (0, k.shape[-1]) and problem.kus.shape == (3,) + k.shape[1:]


def test_varnet_arm_is_fed_the_same_batch_as_cmrfm(quality) -> None:
    import fastmri

    k = _kspace(np.random.default_rng(2), t=12, y=37)  # odd phase-encode size
    problem = quality.make_problem(k, np.arange(3), "ktGaussian", 8, 3, {"modality": "cine"}, quality.QualityConfig())
    kv, mv = quality.to_fastmri(problem)
    # the same k-space and mask, phase encode along fastMRI's W axis
    np.testing.assert_array_equal(torch.view_as_complex(kv).numpy(), problem.kus.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(mv[:, 0, :, :, 0].numpy(), problem.mask.transpose(0, 2, 1) > 0)
    # the same FFT convention: fastMRI's zero-filled RSS is ours, transposed (odd sizes included)
    theirs = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(kv)), dim=1).transpose(-2, -1).numpy()
    ours = np.sqrt((np.abs(_ifft2c(problem.kus)) ** 2).sum(1))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5 * ours.max())
    # both arms take that problem and return RSS images of the same shape
    cfg = quality.tiny_overrides(quality.QualityConfig())
    torch.manual_seed(0)
    cmrfm = quality.build_model(cfg.model).eval()
    varnet, _ = quality.build_varnet(cfg, 10_000)
    with torch.no_grad():
        a = quality.cmrfm_image(cmrfm, problem)
        b = quality.varnet_image(varnet.eval(), problem).numpy()
    assert a.shape == b.shape == problem.target_image().shape
    assert np.isfinite(a).all() and np.isfinite(b).all()


def test_varnet_parameter_count_is_matched_within_ten_percent(quality) -> None:
    cfg = quality.QualityConfig()
    target = quality.parameter_count(quality.build_model(cfg.model, device="meta"))
    _, n = quality.build_varnet(cfg, target)
    assert abs(n - target) <= 0.1 * target, (n, target)


@pytest.mark.slow
def test_quality_bench_runs_end_to_end_on_a_tiny_setting(quality, tmp_path: Path) -> None:
    assert quality.main(["--set", "tiny=true", "--set", f"out={tmp_path}", "--set", "threads=1"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    arms = {"zero-filled", "CG-SENSE", "L1-wavelet", "VarNet", "cmrfm scratch", "cmrfm SSL+adapters"}
    assert {(r["pattern"], r["R"]) for r in result["rows"]} == {(p, R) for p in quality.PATTERNS for R in quality.RATES}
    for row in result["rows"]:
        assert set(row) - {"pattern", "R"} == arms
        for arm in arms:
            assert np.isfinite(row[arm]["psnr"]) and 0 < row[arm]["ssim"] <= 1
    table = (tmp_path / "quality.md").read_text()
    assert all(name in table for name in arms) and "Command: python bench/quality.py" in table
    from PIL import Image

    for pattern in quality.PATTERNS:
        with Image.open(tmp_path / f"quality_{pattern}.png") as im:
            assert im.size[0] >= 7 * 256 and im.size[1] >= 2 * 256  # 7 panels a row, each >= 256 px


def test_scoring_window_centres_longer_windows_on_the_scored_frames() -> None:
    """5-frame windows reconstruct the 3 scored cine frames (the first three, challenge.ranking) with a
    neighbour on each side, wrapping around the periodic cardiac cycle."""
    from bench.quality import scoring_window

    window, scored = scoring_window(12, "cine_sax", 5)
    assert window.tolist() == [11, 0, 1, 2, 3] and scored == [1, 2, 3]
    assert [window[i] for i in scored] == [0, 1, 2]
    window, scored = scoring_window(12, "cine_sax", 3)
    assert window.tolist() == [0, 1, 2] and scored == [0, 1, 2]


@pytest.mark.slow
def test_compare_with_puts_an_earlier_runs_arms_beside_and_refuses_other_problems(quality, tmp_path: Path) -> None:
    """A cmrfm-only run with `compare_with` shows the earlier run's CG-SENSE column and scores the goal
    against it; the earlier column is copied, not recomputed; the earlier cmrfm arm (another model) is
    not brought in. With another seed (other masks) the
    zero-filled scores differ and the run is refused, naming the file: never a table of two problem sets."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--set", "tiny=true", "--set", "threads=1", "--set", "patterns=ktRadial"]
    assert quality.main(base + ["--set", f"out={first}", "--set", "arms=CG-SENSE,VarNet,cmrfm SSL+adapters"]) == 0
    assert quality.main(base + ["--set", f"out={second}", "--set", f"corpus_dir={first / 'data'}",
                                "--set", "arms=cmrfm scratch", "--set", f"compare_with={first / 'results.json'}"]) == 0
    old = json.loads((first / "results.json").read_text())["rows"]
    new = json.loads((second / "results.json").read_text())["rows"]
    assert [list(r) for r in new] == [["pattern", "R", "zero-filled", "CG-SENSE", "VarNet", "cmrfm scratch"]] * len(new)
    assert [r["CG-SENSE"] for r in new] == [r["CG-SENSE"] for r in old]
    assert [r["VarNet"] for r in new] == [r["VarNet"] for r in old]
    assert (second / "weights" / "cmrfm_scratch.safetensors").is_file()
    # the figures redraw the earlier peers: rebuilt from its tuning and saved VarNet weights, they score
    # the held-out problems exactly as that run did
    cfg = quality.tiny_overrides(quality.QualityConfig(tiny=True, patterns=["ktRadial"], out=str(first)))
    _, held = quality.corpus(cfg, first)
    n_cmrfm = quality.parameter_count(quality.build_model(cfg.model, device="meta"))
    again, _ = quality.evaluate(quality.earlier_methods(first / "results.json", cfg, n_cmrfm), held, cfg)
    for r_new, r_old in zip(again, old):
        for arm in ("CG-SENSE", "VarNet"):
            assert r_new[arm]["psnr"] == pytest.approx(r_old[arm]["psnr"], abs=1e-3)
    table = (second / "quality.md").read_text()
    assert "ahead of CG-SENSE in PSNR and SSIM" in table and "sense lamda" in table
    with pytest.raises(SystemExit, match="results.json.*differs"):
        quality.main(base + ["--set", f"out={tmp_path / 'third'}", "--set", "seed=1", "--set", "arms=cmrfm scratch",
                             "--set", f"compare_with={first / 'results.json'}"])


def test_train_seed_defaults_to_the_corpus_seed(quality) -> None:
    assert quality.train_seed(quality.QualityConfig(seed=4)) == 4
    assert quality.train_seed(quality.QualityConfig(seed=4, train_seed=1)) == 1


@pytest.mark.slow
def test_train_steps_trains_the_scratch_arm_exactly_that_many_steps(quality, tmp_path: Path) -> None:
    assert quality.main(["--set", "tiny=true", "--set", "threads=1", "--set", "patterns=Uniform",
                         "--set", f"out={tmp_path}", "--set", "arms=cmrfm scratch", "--set", "train_steps=3"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["cost"]["cmrfm scratch"]["steps"] == 3
    # its saved weights, scored without training (scratch_init, train_seconds 0), give the same scores
    again = tmp_path / "again"
    assert quality.main(["--set", "tiny=true", "--set", "threads=1", "--set", "patterns=Uniform",
                         "--set", f"out={again}", "--set", f"corpus_dir={tmp_path / 'data'}", "--set", "arms=cmrfm scratch",
                         "--set", "train_seconds=0",
                         "--set", f"scratch_init={tmp_path / 'weights' / 'cmrfm_scratch.safetensors'}"]) == 0
    second = json.loads((again / "results.json").read_text())
    assert second["cost"]["cmrfm scratch"]["steps"] == 0
    for a, b in zip(first["rows"], second["rows"]):
        assert a["cmrfm scratch"]["psnr"] == pytest.approx(b["cmrfm scratch"]["psnr"], abs=1e-4)
    with pytest.raises(SystemExit, match="scratch_init .*no such file"):
        quality.main(["--set", "tiny=true", "--set", f"out={tmp_path / 'x'}", "--set", "scratch_init=/nonexistent.safetensors"])


@pytest.mark.slow
def test_varnet_init_scores_saved_varnet_weights_as_they_scored(quality, tmp_path: Path) -> None:
    """`varnet_init` with train_seconds 0: VarNet's saved weights, scored again, give the scores of the
    run that trained them (a run whose scoring was lost need not retrain)."""
    common = ["--set", "tiny=true", "--set", "threads=1", "--set", "patterns=Uniform", "--set", "arms=VarNet"]
    assert quality.main(common + ["--set", f"out={tmp_path}", "--set", "train_seconds=3"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["cost"]["VarNet"]["steps"] > 0
    again = tmp_path / "again"
    assert quality.main(common + ["--set", f"out={again}", "--set", f"corpus_dir={tmp_path / 'data'}",
                                  "--set", "train_seconds=0",
                                  "--set", f"varnet_init={tmp_path / 'weights' / 'VarNet.safetensors'}"]) == 0
    second = json.loads((again / "results.json").read_text())
    assert second["cost"]["VarNet"]["steps"] == 0
    for a, b in zip(first["rows"], second["rows"]):
        assert a["VarNet"]["psnr"] == pytest.approx(b["VarNet"]["psnr"], abs=1e-4)
    with pytest.raises(SystemExit, match="varnet_init .*no such file"):
        quality.main(common + ["--set", f"out={tmp_path / 'x'}", "--set", "varnet_init=/nonexistent.safetensors"])


def test_problem_ranking_window_follows_the_readout_crop(quality) -> None:
    """A readout-cropped (and shifted) Cartesian problem's ranking window holds the same pixels as the
    ranking crop of the uncropped problem: the region the loss reads is the scored one either way."""
    from finetune.train import ranking_window

    k = _kspace(np.random.default_rng(4), t=12, y=41, x=90)
    full = quality.make_problem(k, np.arange(3), "Uniform", 8, 5, {}, quality.QualityConfig(crop_readout=False))
    for shift in (0, -5, 5):  # within the 5-column margin of a 90-column readout
        cropped = quality.make_problem(k, np.arange(3), "Uniform", 8, 5, {}, quality.QualityConfig(), x_shift=shift)
        rows, cols = cropped.ranking_window()
        want = full.target_image()[:, ranking_window(41, 90)[0], ranking_window(41, 90)[1]] * full.scale
        got = cropped.target_image()[:, rows, cols] * cropped.scale
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * want.max())
    # a shift past the margin cuts the window at the problem's edge instead of indexing outside it
    edge = quality.make_problem(k, np.arange(3), "Uniform", 8, 5, {}, quality.QualityConfig(), x_shift=8)
    rows, cols = edge.ranking_window()
    assert cols.start == 0 and cols.stop == 30 - 3


def test_control_parameters_get_their_own_lr(quality) -> None:
    """`lr_control`: the scalar controls (listed by hand from the model's construction) form their own
    AdamW group. Adam's first step moves every parameter with a nonzero gradient by about its lr
    (lr * g / |g|), so after one step of `train_for` a control moves `scale` times as far as the others."""
    from models.sizes import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", cascades=2, update_gate=True, final_cg=2))
    expected = {"final_log_mu", "final_mu_weight", "sensitivities.refiner.gain"} | {
        f"cascades.{i}.{n}" for i in range(2) for n in ("backbone.gain", "backbone.gate_weight", "backbone.gate_bias",
                                                        "dc.weight")}
    groups = quality.control_groups(model, 1e-3, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[1]["params"]} == expected
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    k = torch.randn(1, 2, 3, 16, 12, dtype=torch.complex64)
    m = (torch.rand(1, 2, 16, 12) < 0.5).float()
    m[..., 6:10, :] = 1
    meta = [{"pattern": "ktRadial", "R": 8}]
    quality.train_for(0, groups, lambda: model(k * m.unsqueeze(2), m, meta)["image"].abs().mean(), 1e-3, "t", max_steps=1)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["final_log_mu"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["cascades.1.dc.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["cascades.0.backbone.head.bias"] == pytest.approx(1e-3, rel=1e-3)


def test_inference_timing_takes_turns_and_keeps_the_median(quality, monkeypatch) -> None:
    """`timing_repeats`: each method runs once to warm up, then the methods take turns; the reported
    time is the median of each method's timed runs (a scripted clock that advances only inside a
    method gives known durations)."""
    import dataclasses

    clock, order = [0.0], []
    durations = {"A": iter([100.0, 3.0, 1.0, 2.0]), "B": iter([100.0, 5.0, 5.0, 9.0])}  # warm-up first

    def method(name):
        def run(problem):
            order.append(name)
            clock[0] += next(durations[name])
        return run

    monkeypatch.setattr(quality.time, "perf_counter", lambda: clock[0])
    cfg = dataclasses.replace(quality.QualityConfig(), patterns=["Uniform"], timing_repeats=3)
    out = quality.inference_timing({"A": method("A"), "B": method("B")}, cfg, size=(2, 24, 40))
    assert order == ["A", "B"] + ["A", "B"] * 3
    assert out == {"A": {"Uniform": 2.0}, "B": {"Uniform": 5.0}}
