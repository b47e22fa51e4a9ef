"""LoRA adapters on the backbone's linear layers, saved in PEFT's file format (without PEFT).

    W x  ->  W x + (alpha / r) * B A dropout(x)      A (r, in) kaiming-uniform, B (out, r) zeros

B starts at zero, so a freshly added adapter is an exact no-op. `add_adapters` wraps each targeted
`nn.Linear` (by default the attention qkv/proj and MLP fc1/fc2 of every timm block, never the patch
embedding or head) in a `LoRALinear` in place and freezes every other parameter.

Files (what `peft.PeftModel.from_pretrained` reads):
    <dir>/adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules (a regex that
                                     must match a module's full name, as PEFT does for a string),
                                     lora_dropout, bias "none", + cmrfm fields (contrast, pattern, ...)
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight / .lora_B.weight

PEFT itself is not a dependency (it pulls in transformers); only its format is kept.
References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; PEFT `tuners/lora`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`, with the base layer frozen.

    Attribute names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`, `scaling`).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 targets_regex: str = DEFAULT_TARGETS) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        dd = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **dd)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **dd)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts as a no-op
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.dropout, self.targets_regex = rank, alpha, dropout, targets_regex
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with B A * scaling folded into its weight (computed in float32)."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            self.base_layer.weight.copy_((self.base_layer.weight.float() + delta).to(self.base_layer.weight.dtype))
        return self.base_layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapter in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_adapters(model: nn.Module, rank: int, alpha: float, targets_regex: str = DEFAULT_TARGETS,
                 dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose full module name matches `targets_regex` (re.fullmatch) in a
    LoRALinear, in place; freeze all other parameters. Returns the wrapped module names."""
    if lora_layers(model):
        raise ValueError("model already has LoRA adapters; merge_adapters() first or load into them")
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.fullmatch(targets_regex, name)]
    if not names:
        raise ValueError(f"no nn.Linear module name matches targets_regex {targets_regex!r}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, targets_regex))
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return names


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B weights: the only parameters to give the optimizer."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors, detached, contiguous, on the CPU:
    `base_model.model.<path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named adapter tensors into the model's existing LoRALinear layers (strict)."""
    expected = set(adapter_state_dict_keys(model))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise KeyError(f"adapter state dict does not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
                       f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part).weight
                value = state_dict[f"{_PREFIX}{name}.{part}.weight"]
                if value.shape != weight.shape:
                    raise ValueError(f"{name}.{part}: adapter shape {tuple(value.shape)} "
                                     f"!= model {tuple(weight.shape)}")
                weight.copy_(value.to(weight.dtype))


def adapter_state_dict_keys(model: nn.Module) -> list[str]:
    """The PEFT key names the model's adapters save under."""
    return [f"{_PREFIX}{name}.{part}.weight" for name in lora_layers(model) for part in ("lora_A", "lora_B")]


def merge_adapters(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put the plain nn.Linear back. Returns the names.
    The base weights keep the requires_grad that add_adapters gave them (False)."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        _replace(model, name, layer.merged())
    return list(layers)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: dict | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) into `directory`.

    `config` adds cmrfm fields (contrast, pattern, base_model_sha256, ...) at the top level; it may
    not contradict the LoRA hyper-parameters, which are read from the model.
    """
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    first = layers[0]
    lora = {"peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
            "target_modules": first.targets_regex, "bias": "none"}
    for key, value in (config or {}).items():
        if key in lora and value != lora[key]:
            raise ValueError(f"save_adapter: config {key}={value!r} contradicts the model's adapters ({lora[key]!r})")
    full = {"task_type": None, "base_model_name_or_path": None, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
            **(config or {}), **lora}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    _write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _write_atomic(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n"))
    return directory


def _targets_regex(target_modules: str | list[str]) -> str:
    # PEFT: a string is a regex on the full name; a list matches a name or a ".<suffix>" of it
    if isinstance(target_modules, str):
        return target_modules
    return r"(.*\.)?(" + "|".join(re.escape(t) for t in target_modules) + ")"


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Read a PEFT LoRA adapter from `directory` into `model` (adding the adapters if it has none).
    Returns the adapter_config.json contents."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path}: adapter config not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path}: adapter weights not found")
    if not lora_layers(model):
        add_adapters(model, int(config["r"]), float(config["lora_alpha"]), _targets_regex(config["target_modules"]),
                     float(config.get("lora_dropout", 0.0)))
    try:
        load_adapter_state_dict(model, load_file(str(weights_path)))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{weights_path}: {exc}") from None
    return config
