"""models/adapters.py: LoRA no-op at init, merge == unmerged, only adapters train, PEFT file format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from models.adapters import (DEFAULT_TARGETS, LoRALinear, adapter_parameters, adapter_state_dict, add_adapters,
                             layer_regex, load_adapter, lora_layers, merge_adapters, save_adapter, select_targets,
                             targets_for)
from models.sizes import SIZES, build_model

META = [{"modality": "Cine", "pattern": "ktRadial", "R": 16, "vendor": "UIH", "field_T": 3.0}]


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kspace = torch.randn(1, 2, 3, 16, 13, dtype=torch.complex64, generator=g)
    mask = (torch.rand(1, 2, 16, 13, generator=g) < 0.4).float()
    mask[:, :, 6:10] = 1
    return kspace * mask.unsqueeze(2), mask


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny").eval()


def _train_adapters(model: nn.Module, steps: int = 3) -> None:
    kspace, mask = _batch(1)
    target = torch.randn(1, 2, 16, 13, dtype=torch.complex64)
    opt = torch.optim.Adam(adapter_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (model(kspace, mask, META)["image"] - target).abs().mean().backward()
        opt.step()
    model.eval()


def test_targets_are_the_block_linears_only() -> None:
    model = _model()
    names = add_adapters(model, rank=4, alpha=8)
    cfg = SIZES["tiny"]
    assert len(names) == cfg.cascades * cfg.depth * 4
    kinds = {".".join(n.split(".")[-2:]) for n in names}
    assert kinds == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert not any("patch_embed" in n or "head" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_adapter_is_a_no_op_at_init() -> None:
    model = _model()
    kspace, mask = _batch()
    with torch.no_grad():
        before = model(kspace, mask, META)["image"]
        add_adapters(model, rank=4, alpha=8, dropout=0.1)
        after = model(kspace, mask, META)["image"]
    assert torch.equal(before, after)


def test_only_adapter_tensors_get_gradients_and_change() -> None:
    model = _model()
    add_adapters(model, rank=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_adapters(model, steps=2)
    for n, p in model.named_parameters():
        is_adapter = ".lora_A." in n or ".lora_B." in n
        assert (p.grad is not None) == is_adapter, n
        assert torch.equal(p, before[n]) != is_adapter, n  # adapters moved, nothing else did


def test_merged_equals_unmerged_after_training() -> None:
    model = _model()
    add_adapters(model, rank=4, alpha=16)
    _train_adapters(model)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in model.modules() if isinstance(layer, LoRALinear))
    kspace, mask = _batch(2)
    with torch.no_grad():
        unmerged = model(kspace, mask, META)["image"]
        merged_names = merge_adapters(model)
        merged = model(kspace, mask, META)["image"]
    assert merged_names and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.get_submodule(merged_names[0])) is nn.Linear
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5 * unmerged.abs().max().item())


def test_safetensors_round_trip_in_peft_format(tmp_path) -> None:
    model = _model()
    add_adapters(model, rank=4, alpha=8)
    _train_adapters(model)
    out = save_adapter(model, tmp_path / "cine_ktRadial",
                       {"contrast": "cine", "pattern": "ktRadial", "base_model_sha256": "ab12"})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["bias"] == "none" and config["lora_dropout"] == 0.0
    assert config["contrast"] == "cine" and config["base_model_sha256"] == "ab12"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    assert "base_model.model.cascades.0.backbone.blocks.0.attn.qkv.lora_A.weight" in keys
    assert not list(out.glob("*.tmp"))

    fresh = _model()  # same base weights (same seed), no adapters yet
    loaded = load_adapter(fresh, out)
    assert loaded["pattern"] == "ktRadial"
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value)
    kspace, mask = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(kspace, mask, META)["image"], model(kspace, mask, META)["image"])


def test_save_refuses_contradicting_config_and_load_names_missing_files(tmp_path) -> None:
    model = _model()
    add_adapters(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="contradicts"):
        save_adapter(model, tmp_path / "a", {"r": 8})
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(_model(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_adapters(model, rank=2, alpha=4)


# ---- the other forms: scale and shift (SSF), prompt offsets on the conditioning tokens, combinations ----

COMBOS = [("scale_shift",), ("prompt",), ("lora", "scale_shift"), ("lora", "prompt"), ("lora", "scale_shift", "prompt")]


def _perturb(model: nn.Module) -> None:
    """Non-zero values in every adapter tensor (as after training), so merge and round trip are tested."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("forms", COMBOS, ids="+".join)
def test_every_form_is_a_no_op_at_init_and_trains_only_itself(forms) -> None:
    model = _model()
    kspace, mask = _batch()
    with torch.no_grad():
        before = model(kspace, mask, META)["image"]
        add_adapters(model, rank=4, alpha=8, forms=forms)
        after = model(kspace, mask, META)["image"]
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_kinds = {"lora": {"lora_A", "lora_B"}, "scale_shift": {"ssf_scale", "ssf_shift"}, "prompt": {"prompt"}}
    kinds = {n.split(".")[-2] if n.endswith(".weight") else n.split(".")[-1] for n in trainable}
    assert kinds == set().union(*(expected_kinds[f] for f in forms))
    _train_adapters(model, steps=2)
    with torch.no_grad():
        assert not torch.equal(model(kspace, mask, META)["image"], before)


@pytest.mark.parametrize("forms", COMBOS, ids="+".join)
def test_every_form_merges_exactly_and_round_trips(forms, tmp_path) -> None:
    model = _model()
    add_adapters(model, rank=2, alpha=4, forms=forms)
    _perturb(model)
    out = save_adapter(model, tmp_path / "a", {"contrast": "cine", "pattern": "ktRadial"})
    assert json.loads((out / "adapter_config.json").read_text())["cmrfm_forms"] == list(forms)
    kspace, mask = _batch(4)
    fresh = _model()
    load_adapter(fresh, out)
    with torch.no_grad():
        unmerged = model(kspace, mask, META)["image"]
        assert torch.equal(fresh(kspace, mask, META)["image"], unmerged)
        names = merge_adapters(fresh)
        merged = fresh(kspace, mask, META)["image"]
    assert names and not any(isinstance(m, LoRALinear) for m in fresh.modules())
    assert not [n for n, _ in fresh.named_parameters() if "ssf_" in n or "lora_" in n or "prompt" in n]
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5 * unmerged.abs().max().item())


def test_scale_shift_merge_matches_the_formula_on_a_layer_without_bias() -> None:
    base = nn.Linear(5, 3, bias=False)
    layer = LoRALinear(base, 0, 1.0, scale_shift=True)
    with torch.no_grad():
        layer.ssf_scale.copy_(torch.tensor([0.5, -0.2, 0.0]))
        layer.ssf_shift.copy_(torch.tensor([1.0, 0.0, -3.0]))
    x = torch.randn(4, 5)
    expected = (x @ base.weight.T) * torch.tensor([1.5, 0.8, 1.0]) + torch.tensor([1.0, 0.0, -3.0])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.merged()(x), expected)


def test_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="forms"):
        add_adapters(_model(), rank=2, alpha=4, forms=("ia3",))


# ---- LoRA rank and targets: layer groups, cascades, convolutions (the ablation of BENCHMARKS.md) ----

#: (layers, cascades) of the ablation rows, plus the convolutional and embedding groups
TARGET_SETS = [(("attn",), ()), (("mlp",), ()), (("attn", "mlp"), ()), (("attn", "mlp"), (-1,)),
               (("conv",), ()), (("embed", "qkv"), (0,)), (("attn", "mlp", "conv"), (0, -1))]


def _ids(t) -> str:
    return "+".join(t[0]) + (f"@c{','.join(map(str, t[1]))}" if t[1] else "")


def _expected_lora_count(layers: tuple[str, ...], cascades: tuple[int, ...], r: int) -> int:
    """r (in + out) per adapted linear, r (in k k + out) per adapted 3 x 3 conv, from the size's numbers
    (models/backbone.py's layer shapes written out, not read from the model)."""
    cfg = SIZES["tiny"]
    d, hidden, c, p = cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.conv_channels, cfg.patch
    per_cascade = {
        "qkv": cfg.depth * r * (d + 3 * d), "proj": cfg.depth * r * (d + d),
        "fc1": cfg.depth * r * (d + hidden), "fc2": cfg.depth * r * (hidden + d),
        "embed": r * (p * p * c + d) + r * (d + p * p * c),                    # patch_embed, head
        "conv": r * (2 * 9 + c) + r * (c * 9 + c) + r * (c * 9 + c) + r * (c * 9 + 2),  # stem.0/2, conv_head.1/3
    }
    groups = {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")}
    kinds = {k for layer in layers for k in groups.get(layer, (layer,))}
    n_cascades = len({i % cfg.cascades for i in cascades}) if cascades else cfg.cascades
    return n_cascades * sum(per_cascade[k] for k in kinds)


def test_layer_groups_attn_and_mlp_adapt_exactly_the_default_targets() -> None:
    assert select_targets(_model(), layer_regex(["attn", "mlp"])) == select_targets(_model(), DEFAULT_TARGETS)
    assert targets_for(DEFAULT_TARGETS, []) == DEFAULT_TARGETS
    last = select_targets(_model(), layer_regex(["attn"]), [-1])
    assert last and all(n.startswith(f"cascades.{SIZES['tiny'].cascades - 1}.backbone.blocks.") for n in last)


@pytest.mark.parametrize("r", [1, 4, 8, 16])
@pytest.mark.parametrize("target", TARGET_SETS, ids=_ids)
def test_lora_parameter_count_is_r_in_plus_out_per_adapted_layer(target, r) -> None:
    layers, cascades = target
    model = _model()
    names = add_adapters(model, rank=r, alpha=2 * r, targets_regex=layer_regex(layers), cascades=cascades)
    assert sum(p.numel() for p in adapter_parameters(model)) == _expected_lora_count(layers, cascades, r)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _expected_lora_count(layers, cascades, r)
    assert len(names) == len(set(names))


def test_scale_shift_and_prompt_counts_are_two_per_output_channel_and_six_tokens() -> None:
    cfg = SIZES["tiny"]
    model = _model()
    add_adapters(model, rank=4, alpha=8, targets_regex=layer_regex(["attn"]), forms=("lora", "scale_shift", "prompt"),
                 cascades=[-1])
    d = cfg.dim
    lora = _expected_lora_count(("attn",), (-1,), 4)
    ssf = cfg.depth * 2 * (3 * d + d)  # gamma and beta per output channel of qkv (3D) and proj (D)
    assert sum(p.numel() for p in adapter_parameters(model)) == lora + ssf + 6 * d


@pytest.mark.parametrize("forms", [("lora",), ("lora", "scale_shift"), ("scale_shift", "prompt")], ids="+".join)
@pytest.mark.parametrize("target", TARGET_SETS, ids=_ids)
def test_every_target_set_is_a_no_op_at_init_and_reloads_exactly(target, forms, tmp_path) -> None:
    layers, cascades = target
    model = _model()
    kspace, mask = _batch(6)
    with torch.no_grad():
        before = model(kspace, mask, META)["image"]
        names = add_adapters(model, rank=3, alpha=6, targets_regex=layer_regex(layers), forms=forms, cascades=cascades)
        assert torch.equal(model(kspace, mask, META)["image"], before)
    _perturb(model)
    out = save_adapter(model, tmp_path / "a", {"contrast": "cine", "pattern": "ktGaussian"})
    config = json.loads((out / "adapter_config.json").read_text())
    wrapped = [n for n in names if n != "conditioning"]
    assert config["target_modules"] == wrapped  # what was adapted, by name
    fresh = _model()
    load_adapter(fresh, out)
    assert list(lora_layers(fresh)) == wrapped
    assert adapter_state_dict(fresh).keys() == adapter_state_dict(model).keys()
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    with torch.no_grad():
        adapted = model(kspace, mask, META)["image"]
        assert not torch.equal(adapted, before)
        assert torch.equal(fresh(kspace, mask, META)["image"], adapted)
        merge_adapters(fresh)
        torch.testing.assert_close(fresh(kspace, mask, META)["image"], adapted, rtol=1e-4,
                                   atol=1e-5 * adapted.abs().max().item())


def test_conv_lora_is_peft_shaped_and_merges_to_the_formula() -> None:
    base = nn.Conv2d(3, 5, 3, padding=1)
    layer = LoRALinear(base, 2, 4.0, scale_shift=True)
    assert tuple(layer.lora_A.weight.shape) == (2, 3, 3, 3) and tuple(layer.lora_B.weight.shape) == (5, 2, 1, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.lora_B.weight, layer.ssf_scale, layer.ssf_shift):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(2, 3, 7, 6, generator=g)
    # independent: the LoRA update as its own convolution with kernel sum_j B[o, j] A[j], then SSF per channel
    kernel = base.weight + 2.0 * torch.einsum("oj,jikl->oikl", layer.lora_B.weight[:, :, 0, 0], layer.lora_A.weight)
    y = torch.nn.functional.conv2d(x, kernel, base.bias, padding=1)
    expected = y * (1 + layer.ssf_scale)[:, None, None] + layer.ssf_shift[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.merged()(x), expected, rtol=1e-5, atol=1e-5)


def test_target_selection_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="layers.*expected a non-empty subset"):
        layer_regex(["attention"])
    with pytest.raises(ValueError, match=r"cascades \[7\].*out of range"):
        add_adapters(_model(), rank=2, alpha=4, cascades=[7])
    with pytest.raises(ValueError, match="matches"):
        add_adapters(_model(), rank=2, alpha=4, targets_regex=r"nothing\.here")


def test_adapter_config_layers_and_cascades_come_from_set_overrides() -> None:
    from finetune.settings import FinetuneConfig
    from launch.cli import load_config

    cfg = load_config(FinetuneConfig, None, ["adapter.layers=attn,conv", "adapter.cascades=-1", "adapter.rank=2"])
    assert cfg.adapter.layers == ["attn", "conv"] and cfg.adapter.cascades == [-1]
    names = add_adapters(_model(), cfg.adapter.rank, cfg.adapter.alpha, targets_for(cfg.adapter.targets, cfg.adapter.layers),
                         forms=cfg.adapter.forms, cascades=cfg.adapter.cascades)
    last = SIZES["tiny"].cascades - 1
    assert {n.rsplit(".", 1)[0] if n.split(".")[-1].isdigit() else n for n in names} == {
        f"cascades.{last}.backbone.{x}" for x in ("stem", "conv_head")} | {
        f"cascades.{last}.backbone.blocks.{b}.attn.{k}" for b in range(SIZES["tiny"].depth) for k in ("qkv", "proj")}
