"""finetune.train / finetune.bank: only adapter tensors change, PEFT files load back to the same
outputs, a resumed run ends where an uninterrupted one does, and the bank finds the shards' pairs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finetune.bank import find_pairs, pair_config
from finetune.settings import FinetuneConfig
from finetune.train import build_trainable, lr_at, train
from models.adapters import adapter_state_dict, load_adapter, lora_layers, merge_adapters
from pretrain.checkpoint import load_backbone

META = [{"modality": "Cine", "view": "sax", "pattern": "ktRadial", "R": 8, "vendor": "UIH", "field_T": 3.0}]


def config(tmp: Path, shards: Path, backbone: Path, steps: int = 3, **run) -> FinetuneConfig:
    cfg = FinetuneConfig()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=str(shards), micro_batch=2, frames=3),
        run=dataclasses.replace(cfg.run, backbone=str(backbone), adapters=str(tmp / "adapters"), dir=str(tmp / "run"),
                                steps=steps, checkpoint_every=0, progress=False, tensorboard=False, **run),
        optim=dataclasses.replace(cfg.optim, lr=5e-3, warmup_steps=1),
    )


@pytest.fixture(scope="module")
def backbone(tiny_backbone: Path) -> Path:
    return tiny_backbone


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shard_dir: Path, backbone: Path):
    """One short adapter run (cine, ktRadial): (config, result)."""
    tmp = tmp_path_factory.mktemp("finetune")
    cfg = config(tmp, shard_dir, backbone, steps=3)
    return cfg, train(cfg)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kspace = torch.randn(1, 3, 4, 24, 30, dtype=torch.complex64, generator=g)
    mask = (torch.rand(1, 3, 24, 30, generator=g) < 0.4).float()
    mask[:, :, 8:16] = 1
    return kspace * mask.unsqueeze(2), mask


def test_finetuning_changes_only_adapter_tensors(trained, backbone: Path) -> None:
    cfg, result = trained
    before = load_backbone(backbone).state_dict()
    model = load_backbone(backbone)
    load_adapter(model, result.output)
    after = model.state_dict()
    # every backbone tensor is bit-identical; LoRALinear moved them under ".base_layer."
    for name, value in before.items():
        moved = name if name in after else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[moved], value), name
    lora_b = [layer.lora_B.weight for layer in lora_layers(model).values()]
    assert lora_b and all(b.abs().sum() > 0 for b in lora_b), "training left some LoRA B at its zero init"
    assert result.trainable == sum(p.numel() for layer in lora_layers(model).values()
                                   for p in (layer.lora_A.weight, layer.lora_B.weight))
    assert result.trainable < result.total * 0.2


def test_optimizer_sees_adapters_only(shard_dir: Path, backbone: Path, tmp_path: Path) -> None:
    model = build_trainable(config(tmp_path, shard_dir, backbone), torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    full = build_trainable(config(tmp_path, shard_dir, backbone, full_finetune=True), torch.device("cpu"))
    assert all(p.requires_grad for p in full.parameters())


def test_saved_adapter_is_peft_format_and_reloads_to_same_output(trained, backbone: Path) -> None:
    cfg, result = trained
    folder = Path(cfg.run.adapters) / "cine_ktRadial"
    assert result.output == folder and not list(folder.glob("*.tmp"))
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == cfg.adapter.rank and conf["lora_alpha"] == cfg.adapter.alpha
    assert conf["contrast"] == "cine" and conf["pattern"] == "ktRadial" and conf["trained_shapes"]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)

    kspace, mask = _batch()
    one, two = load_backbone(backbone).eval(), load_backbone(backbone).eval()
    load_adapter(one, folder)
    load_adapter(two, folder)
    saved = adapter_state_dict(one)
    with torch.no_grad():
        a = one(kspace, mask, META)["image"]
        b = two(kspace, mask, META)["image"]
        merge_adapters(two)
        c = two(kspace, mask, META)["image"]
        plain = load_backbone(backbone).eval()(kspace, mask, META)["image"]
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-6), "the trained adapter does not change the output"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), saved[k]) for k in keys)


def test_resumed_run_ends_where_an_uninterrupted_run_does(shard_dir: Path, backbone: Path, tmp_path: Path) -> None:
    straight = config(tmp_path / "a", shard_dir, backbone, steps=3)
    train(straight)
    first = config(tmp_path / "b", shard_dir, backbone, steps=2)
    train(first)  # writes state/step00000002 (the last step always saves)
    second = dataclasses.replace(first, run=dataclasses.replace(first.run, steps=3))
    train(second)
    a = Path(straight.run.adapters) / "cine_ktRadial" / "adapter_model.safetensors"
    b = Path(second.run.adapters) / "cine_ktRadial" / "adapter_model.safetensors"
    assert (Path(second.run.dir) / "state" / "latest").read_text().strip() == "step00000003"
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for k in fa.keys():
            torch.testing.assert_close(fb.get_tensor(k), fa.get_tensor(k), rtol=0, atol=0)


def test_learning_rate_warms_up_then_decays() -> None:
    cfg = FinetuneConfig()
    lrs = [lr_at(s, cfg) for s in range(cfg.run.steps)]
    peak = lrs.index(max(lrs))
    assert peak == cfg.optim.warmup_steps - 1 and lrs[peak] == pytest.approx(cfg.optim.lr)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])) and lrs[-1] < lrs[peak]
    assert lrs[-1] >= cfg.optim.lr * cfg.optim.min_lr_ratio - 1e-12


def test_bank_finds_contrast_pattern_pairs_of_the_shards(shard_dir: Path) -> None:
    cfg = FinetuneConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(shard_dir)))
    pairs = find_pairs(cfg)
    assert {("cine", p) for p in ("Uniform", "ktGaussian", "ktRadial")} <= set(pairs)
    assert all(p in cfg.data.patterns for _, p in pairs)
    only = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, bank_contrasts=["LGE"]))
    assert {c for c, _ in find_pairs(only)} == {"lge"}
    held = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, exclude_centers=["Center001", "Center002"]))
    assert find_pairs(held)[("cine", "ktRadial")] < pairs[("cine", "ktRadial")]
    one = pair_config(cfg, "lge", "Uniform")
    assert one.adapter.contrast == "lge" and one.run.dir.endswith("lge_Uniform")


def test_unknown_contrast_is_an_error_not_a_hang(shard_dir: Path, backbone: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, shard_dir, backbone, steps=1)
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, contrast="spectroscopy"))
    with pytest.raises(ValueError, match="no training sample"):
        train(cfg)


def test_shard_metas_skips_a_truncated_shard_by_name_and_ignores_path_members(shard_dir: Path, tmp_path: Path,
                                                                              capsys) -> None:
    """Issue 11 item 9: one truncated shard crashed fine-tuning at start with a bare tarfile.ReadError;
    a member named `../../x.meta.json` counted as a sample."""
    import io
    import shutil
    import tarfile

    from finetune.train import shard_metas
    from shards.manifest import Manifest

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = Manifest.read(copy)
    train_shards = manifest.shard_paths(copy, "train")
    expected = sum(e.samples for e in manifest.shards if e.split == "train")
    victim = train_shards[1]
    lost = next(e.samples for e in manifest.shards if e.name == victim.name)
    victim.write_bytes(victim.read_bytes()[:700])                   # truncated inside its first member
    with tarfile.open(train_shards[0], "a") as tf:                  # a path member, as in the report
        data = json.dumps({"fully_sampled": True, "modality": "Cine"}).encode()
        info = tarfile.TarInfo("../../x.meta.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    metas = shard_metas(str(copy), "train")
    assert len(metas) == expected - lost                            # the path member is not a sample
    assert f"skipping shard {victim}" in capsys.readouterr().err


def test_a_crash_while_publishing_an_adapter_leaves_the_previous_pair_whole(backbone: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """Issue 11 item 13: adapter_config.json + adapter_model.safetensors (+ finetune_info.json) are one
    unit. A crash after the new weights were written leaves the old adapter complete and loadable,
    with nothing half-written visible; the next save replaces the entry whole."""
    import finetune.train as T
    from models.adapters import add_adapters

    cfg = config(tmp_path, tmp_path / "shards", backbone)
    entry = Path(cfg.run.adapters) / "cine_ktRadial"

    def adapted(seed: int):
        model = load_backbone(backbone)
        torch.manual_seed(seed)
        add_adapters(model, cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.targets)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        return model

    T.save_result(adapted(1), cfg, {})
    old = {p.name: p.read_bytes() for p in entry.iterdir()}
    real = T.save_adapter

    def dies_half_way(model, directory, info):
        real(model, directory, info)                                 # both files written into staging ...
        (Path(directory) / "adapter_config.json").write_text("{")    # ... then the crash mid-config
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(T, "save_adapter", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        T.save_result(adapted(2), cfg, {})
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == old   # the old pair, untouched
    assert not [p for p in entry.parent.iterdir() if ".partial-" in p.name]
    model = load_backbone(backbone)
    load_adapter(model, entry)                                        # loadable and consistent
    monkeypatch.setattr(T, "save_adapter", real)
    T.save_result(adapted(2), cfg, {})
    assert (entry / "adapter_model.safetensors").read_bytes() != old["adapter_model.safetensors"]
    assert json.loads((entry / "adapter_config.json").read_text())["r"] == cfg.adapter.rank


def test_default_adapter_is_rank_16_lora_on_the_conv_stem_and_head() -> None:
    """The default AdapterSpec (issue 14): LoRA r 16 on every cascade's convolutional stem and head, a
    no-op at init, r (in k k + out) parameters per 3 x 3 conv from the tiny size's layer shapes; a
    backbone without a convolutional stem is refused with the setting to change."""
    from finetune.train import add_configured_adapters
    from models.adapters import adapter_parameters
    from models.sizes import SIZES, build_model

    spec = FinetuneConfig().adapter
    assert (spec.rank, spec.alpha, spec.layers, spec.forms, spec.cascades) == (16, 32.0, ["conv"], ["lora"], [])
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    kspace, mask = _batch()
    with torch.no_grad():
        before = model(kspace, mask, META)["image"]
        names = add_configured_adapters(model, spec)
        assert torch.equal(model(kspace, mask, META)["image"], before)
    tiny = SIZES["tiny"]
    assert names == [f"cascades.{i}.backbone.{m}" for i in range(tiny.cascades)
                     for m in ("stem.0", "stem.2", "conv_head.1", "conv_head.3")]
    c, r = tiny.conv_channels, spec.rank                 # stem 2 -> c -> c, head c -> c -> 2, all 3 x 3
    assert sum(p.numel() for p in adapter_parameters(model)) == tiny.cascades * r * (
        (2 * 9 + c) + (c * 9 + c) + (c * 9 + c) + (c * 9 + 2))
    plain = build_model(dataclasses.replace(tiny, conv_channels=0))
    with pytest.raises(ValueError, match=r"no convolutional stem or head.*set adapter.layers"):
        add_configured_adapters(plain, spec)
