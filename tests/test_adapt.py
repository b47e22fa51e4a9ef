"""finetune.adapt: test-time self-supervised adaptation per (center, vendor) never reads a reference,
changes the output, lowers the held-out SSDU loss, is saved beside the tree, and falls back when the
held-out loss rises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import finetune.adapt as adapt_mod
import finetune.reconstruct as reconstruct_mod
from finetune.adapt import adapt_model, draw_windows, group_of
from finetune.reconstruct import reconstruct_tree
from finetune.settings import AdaptConfig, ReconstructConfig
from models.adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter
from pretrain.checkpoint import load_backbone


def cine_tree_without_references(synthetic_root: Path, dest: Path) -> Path:
    """The validation Cine folder with every FullSample_* folder removed: only kus + masks remain."""
    src = next((synthetic_root / "ChallengeData_ValSet").rglob("MultiCoil/Cine"))
    target = dest / src.relative_to(synthetic_root)
    shutil.copytree(src, target)
    for full in list(target.rglob("FullSample_*")):
        shutil.rmtree(full)
    assert not list(dest.rglob("FullSample_*"))
    return dest / "ChallengeData_ValSet"


def images(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): scipy.io.loadmat(p)["img4ranking"] for p in sorted(root.rglob("*_kus_*.mat"))}


def test_adaptation_reads_no_reference_changes_the_output_and_lowers_the_heldout_loss(
        synthetic_root: Path, tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = cine_tree_without_references(synthetic_root, tmp_path / "in")
    opened: list[str] = []
    real_read = reconstruct_mod.read_kspace
    monkeypatch.setattr(reconstruct_mod, "read_kspace", lambda p, *a, **k: opened.append(str(p)) or real_read(p, *a, **k))
    base = ReconstructConfig(input=str(inp), backbone=str(tiny_backbone), progress=False, batch_size=4)
    plain = reconstruct_tree(ReconstructConfig(**{**base.__dict__, "out": str(tmp_path / "plain")}), log=lambda m: None)
    logs: list[str] = []
    adapt = AdaptConfig(steps=8, lr=3e-3, windows=6, holdout=0.34, eval_every=4, patience=2)
    cfg = ReconstructConfig(**{**base.__dict__, "out": str(tmp_path / "adapted"), "adapt": adapt})
    report = reconstruct_tree(cfg, log=logs.append)

    assert opened and all("UnderSample_" in p and "FullSample" not in p for p in opened)
    assert plain["written"] == report["written"] == 4 and not report["errors"]
    groups = {group_of(Path(p)) for p in report["adapters"]}
    assert len(report["adapt"]) == len(groups) == 3  # one adaptation per (center, vendor): the bank has no adapters
    adapted = [r for r in report["adapt"].values() if r["status"] != "fallback"]
    assert adapted, logs
    for r in adapted:  # the kept weights have a lower held-out SSDU loss than the unadapted model
        first, kept = r["heldout"][0][1], dict(r["heldout"])[r["best_step"]]
        assert r["best_step"] > 0 and kept < first
    a, b = images(tmp_path / "plain"), images(tmp_path / "adapted")
    assert a.keys() == b.keys()
    changed = [k for k in a if not np.array_equal(a[k], b[k])]
    adapted_files = {Path(f).name for r in adapted for f in r["files"]}
    assert {Path(k).name for k in changed} == adapted_files
    # saved beside the outputs (not inside the submission tree), in the PEFT layout, loadable
    for key, r in report["adapt"].items():
        folder = tmp_path / "adapted_adapted" / r["folder"]
        assert (folder / WEIGHTS_NAME).is_file()
        config = json.loads((folder / CONFIG_NAME).read_text())
        assert config["status"] == r["status"] and config["adapt"]["steps"] == 8
        load_adapter(load_backbone(tiny_backbone), folder)
    assert not list((tmp_path / "adapted").rglob(WEIGHTS_NAME))
    assert json.loads((tmp_path / "adapted_adapted" / "adapt_report.json").read_text()) == report["adapt"]
    assert any("held-out SSDU loss" in m for m in logs)


def scripted_heldout(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> list[dict]:
    """Make the held-out loss follow `values` (one per evaluation); returns the adapter weights seen
    at each evaluation, so a test can tell which ones were kept."""
    seen: list[dict] = []

    def fake(model, windows, cfg, device) -> float:
        seen.append({k: v.clone() for k, v in adapter_state_dict(model).items()})
        return values[len(seen) - 1]

    monkeypatch.setattr(adapt_mod, "heldout_loss", fake)
    return seen


@pytest.fixture(scope="module")
def center012_windows(synthetic_root: Path) -> list:
    files = sorted(p for p in (synthetic_root / "ChallengeData_ValSet").rglob("*_kus_*.mat")
                   if "Center012" in str(p) and "/Cine/" in str(p))
    return draw_windows(files, 3, 4, seed=0)


def test_the_guard_falls_back_to_the_unadapted_model_when_the_heldout_loss_only_rises(
        center012_windows: list, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    windows = center012_windows
    assert len(windows) == 4
    scripted_heldout(monkeypatch, [1.0, 1.1, 1.2, 1.3])
    base = load_backbone(tiny_backbone).eval()
    logs: list[str] = []
    cfg = AdaptConfig(steps=12, lr=1e-2, eval_every=1, patience=2, holdout=0.5)
    model, result = adapt_model(base, windows, cfg, torch.device("cpu"), logs.append)
    assert result.status == "fallback" and result.best_step == 0
    assert result.steps_run == 2 < cfg.steps  # stopped after `patience` evaluations above the best
    assert any("stopping" in m for m in logs)
    w = windows[0]
    with torch.no_grad():
        ref = base(w.kspace, w.mask, [w.meta])["kspace"]
        out = model(w.kspace, w.mask, [w.meta])["kspace"]
    assert torch.equal(out, ref)  # fallback: exactly the unadapted model


def test_the_guard_keeps_the_weights_of_the_lowest_heldout_loss(
        center012_windows: list, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = scripted_heldout(monkeypatch, [1.0, 0.9, 0.8, 0.85, 0.95, 0.7])
    cfg = AdaptConfig(steps=10, lr=1e-2, eval_every=1, patience=2, holdout=0.5)
    model, result = adapt_model(load_backbone(tiny_backbone).eval(), center012_windows, cfg,
                                torch.device("cpu"), lambda m: None)
    assert result.status == "stopped early" and result.best_step == 2 and result.steps_run == 4
    kept = adapter_state_dict(model)
    assert all(torch.equal(kept[k], seen[2][k]) for k in kept)  # evaluation 2 = after step 2
    assert not all(torch.equal(kept[k], seen[4][k]) for k in kept)


def test_an_unreadable_file_is_left_out_of_its_groups_adaptation_and_named(
        synthetic_root: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    inp = cine_tree_without_references(synthetic_root, tmp_path / "in")
    bad = next(p for p in inp.rglob("*_kus_*.mat") if "Center012" in str(p) and "lax" in p.name)
    bad.write_bytes(b"not a mat file")
    logs: list[str] = []
    cfg = ReconstructConfig(input=str(inp), out=str(tmp_path / "out"), backbone=str(tiny_backbone), progress=False,
                            adapt=AdaptConfig(steps=2, windows=4, eval_every=1))
    report = reconstruct_tree(cfg, log=logs.append)
    assert report["written"] == 3 and len(report["errors"]) == 1 and str(bad) in report["errors"][0]
    group = report["adapt"]["Center012/Philips_30T_IngeniaCX/backbone"]
    assert [Path(f).name for f in group["files"]] == ["cine_sax_kus_ktGaussian16.mat"]
    assert any("left out of adaptation" in m and str(bad) in m for m in logs)


def test_default_test_time_adapter_is_conv_lora_and_a_conv_less_backbone_is_named(center012_windows: list) -> None:
    """The default (issue 14, third pass): rank-16 LoRA on the conv stem and head at lr 1e-2; fourth pass:
    on the model each file uses, anchored (weight 1) on a supervised adapter, not on the bare backbone;
    a backbone without a convolutional stem is refused with the setting to change, before any step."""
    import dataclasses

    from models.sizes import SIZES, build_model

    cfg = AdaptConfig(steps=2)
    assert (cfg.rank, cfg.alpha, cfg.layers, cfg.lr) == (16, 32.0, ["conv"], 1e-2)
    assert (cfg.start, cfg.anchor, cfg.anchor_backbone, cfg.max_drift) == ("adapter", 1.0, 0.0, 0.0)
    plain = build_model(dataclasses.replace(SIZES["tiny"], conv_channels=0)).eval()
    with pytest.raises(ValueError, match=r"no convolutional stem or head.*set adapt.layers"):
        adapt_model(plain, center012_windows, cfg, torch.device("cpu"), lambda m: None)


@pytest.fixture(scope="module")
def radial_bank(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    """An adapter bank with one non-trivial cine_ktRadial adapter (B != 0: it changes the output)."""
    from models.adapters import add_adapters, lora_layers, save_adapter

    folder = tmp_path_factory.mktemp("radial_bank") / "adapters"
    model = load_backbone(tiny_backbone)
    torch.manual_seed(1)
    add_adapters(model, rank=2, alpha=4.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, folder / "cine_ktRadial", {"contrast": "cine", "pattern": "ktRadial"})
    return folder


def test_start_backbone_ignores_the_bank_adapter_and_start_adapter_does_not(
        synthetic_root: Path, tiny_backbone: Path, radial_bank: Path, tmp_path: Path) -> None:
    """adapt.start = "backbone" (issue 14, fourth pass): with a supervised adapter in the bank, the output
    is bit for bit that of adapting the bare backbone with no bank at all; "adapter" adapts on top of the
    bank's adapter, one group per (center, vendor, adapter), with that adapter's anchor weight, and its
    ktRadial outputs differ."""
    inp = cine_tree_without_references(synthetic_root, tmp_path / "in")
    radial = sorted(str(p.relative_to(inp)) for p in inp.rglob("*_kus_ktRadial*.mat"))
    assert radial  # the bank's adapter is used by some files

    def run(name: str, adapters: Path | None, start: str) -> tuple[dict, dict]:
        cfg = ReconstructConfig(input=str(inp), out=str(tmp_path / name), backbone=str(tiny_backbone),
                                adapters=str(adapters or ""), progress=False, batch_size=4,
                                adapt=AdaptConfig(steps=3, lr=1e-2, windows=4, eval_every=1, patience=3, start=start,
                                                  anchor=2.0, anchor_backbone=0.5))
        report = reconstruct_tree(cfg, log=lambda m: None)
        assert not report["errors"]
        return report, images(tmp_path / name)

    alone, alone_images = run("alone", None, "backbone")
    ignored, ignored_images = run("ignored", radial_bank, "backbone")
    on_top, on_top_images = run("on_top", radial_bank, "adapter")
    assert ignored_images.keys() == alone_images.keys()
    assert all(np.array_equal(ignored_images[k], alone_images[k]) for k in alone_images)
    assert all(key.endswith("/backbone") and r["start"] == "backbone" for key, r in ignored["adapt"].items())
    assert ignored["adapt"].keys() == alone["adapt"].keys()
    assert any(key.endswith("/cine_ktRadial") and r["start"] == "adapter" for key, r in on_top["adapt"].items())
    # the anchor follows what the LoRA sits on: `anchor` on a supervised adapter, `anchor_backbone` on the backbone
    assert {r["anchor"] for r in ignored["adapt"].values()} == {0.5}
    assert {(k.rsplit("/", 1)[1], r["anchor"]) for k, r in on_top["adapt"].items()} == {("cine_ktRadial", 2.0),
                                                                                        ("backbone", 0.5)}
    adapted_radial = [Path(f).name for r in on_top["adapt"].values() if r["status"] != "fallback" for f in r["files"]
                      if "ktRadial" in f]
    assert adapted_radial, on_top["adapt"]
    changed = [k for k in on_top_images if not np.array_equal(on_top_images[k], ignored_images[k])]
    assert any("ktRadial" in k for k in changed)


def test_an_unknown_start_is_refused_before_any_file_is_read(synthetic_root: Path, tiny_backbone: Path,
                                                            tmp_path: Path) -> None:
    from finetune.reconstruct import ReconstructError

    inp = cine_tree_without_references(synthetic_root, tmp_path / "in")
    cfg = ReconstructConfig(input=str(inp), out=str(tmp_path / "out"), backbone=str(tiny_backbone), progress=False,
                            adapt=AdaptConfig(steps=2, start="supervised"))
    with pytest.raises(ReconstructError, match="adapt.start"):
        reconstruct_tree(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def image_change(model: torch.nn.Module, base: torch.nn.Module, w) -> float:
    """||model(w) - base(w)|| / ||base(w)|| on the window's whole acquired set, computed here directly."""
    with torch.no_grad():
        a = base(w.kspace, w.mask, [w.meta])["image"]
        b = model(w.kspace, w.mask, [w.meta])["image"]
    return float((b - a).abs().pow(2).sum().sqrt() / a.abs().pow(2).sum().sqrt())


def test_an_anchor_keeps_the_output_closer_to_the_unadapted_one(
        center012_windows: list, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same steps, seed and windows, with and without the consistency anchor; a falling scripted
    held-out loss keeps the last step's weights in both, so the comparison is of the training alone."""
    base = load_backbone(tiny_backbone).eval()
    changes, drifts = {}, {}
    for anchor in (0.0, 50.0):
        scripted_heldout(monkeypatch, [1.0 - 0.01 * i for i in range(20)])
        cfg = AdaptConfig(steps=6, lr=3e-2, eval_every=1, patience=2, holdout=0.5, anchor=anchor)
        model, result = adapt_model(base, center012_windows, cfg, torch.device("cpu"), lambda m: None)
        assert result.best_step == 6 and result.status == "adapted"
        train = center012_windows[2:]  # holdout 0.5 of 4: the first two are held out
        changes[anchor] = np.mean([image_change(model, base, w) for w in train])
        drifts[anchor] = result.drift[-1][1]
        held = np.mean([image_change(model, base, w) for w in center012_windows[:2]])
        assert drifts[anchor] == pytest.approx(held, rel=1e-4)  # the reported drift is the held-out change
    assert changes[0.0] > 0
    assert changes[50.0] < 0.5 * changes[0.0], changes


def test_max_drift_never_keeps_weights_that_moved_the_image_too_far(
        center012_windows: list, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the held-out SSDU loss scripted to fall at every evaluation, only the drift guard can refuse:
    a limit below any change falls back to exactly the unadapted model; a limit above all keeps the last."""
    base = load_backbone(tiny_backbone).eval()
    w = center012_windows[0]
    for limit, expected in ((1e-12, "fallback"), (10.0, "adapted")):
        scripted_heldout(monkeypatch, [1.0 - 0.01 * i for i in range(20)])
        logs: list[str] = []
        cfg = AdaptConfig(steps=4, lr=3e-2, eval_every=1, patience=10, holdout=0.5, max_drift=limit)
        model, result = adapt_model(base, center012_windows, cfg, torch.device("cpu"), logs.append)
        assert result.status == expected and all(d > 0 for _, d in result.drift[1:])
        if expected == "fallback":
            assert result.best_step == 0 and any("max_drift" in m for m in logs)
            assert image_change(model, base, w) == 0.0
        else:
            assert result.best_step == 4 and image_change(model, base, w) > 0
