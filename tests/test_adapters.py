"""models/adapters.py: LoRA no-op at init, merge == unmerged, only adapters train, PEFT file format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from models.adapters import (LoRALinear, adapter_parameters, adapter_state_dict, add_adapters, load_adapter,
                             merge_adapters, save_adapter)
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
