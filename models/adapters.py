"""Adapters on the frozen backbone, saved in PEFT's file layout (without PEFT).

Three forms, alone or combined (`forms`), every one an exact no-op when added:

    "lora"         W x -> W x + (alpha / r) B A dropout(x)      A (r, in) kaiming-uniform, B (out, r) zeros
    "scale_shift"  y -> y * (1 + gamma) + beta per output channel of the same linear layers
                   (SSF, Lian et al. 2022), gamma = beta = 0 at init
    "prompt"       a learned offset (6, D), zeros at init, added to the six metadata conditioning tokens
                   the transformer reads (prompt tuning on the tokens the backbone already has; one adapter
                   belongs to one contrast and pattern, so these are per contrast and pattern)

All three fold into the base weights (`merge_adapters`): B A into W, (1 + gamma) into W's rows and b,
the prompt offset of field f into every row of f's block of the conditioning table. So inference
runs at backbone speed whatever the form.

`add_adapters` wraps each targeted `nn.Linear` or `nn.Conv2d` (by default the attention qkv/proj and
MLP fc1/fc2 of every timm block, never the patch embedding or head) in a `LoRALinear` in place (rank 0
= scale and shift only) and freezes every other parameter.

Targets (the rank and target ablation of BENCHMARKS.md): a regex on the full module name, or named
layer groups (`layer_regex`: "attn" = qkv + proj, "mlp" = fc1 + fc2, "embed" = the linear patch
embedding and head, "conv" = the convolutional stem and head), optionally restricted to some cascades
(`cascades=[-1]`: the last cascade's backbone only). A Conv2d gets PEFT's convolutional LoRA: A is a
conv of the layer's kernel (in -> r), B a 1 x 1 conv (r -> out), so r (in k_h k_w + out) parameters
against r (in + out) for a linear layer.

Files (what `peft.PeftModel.from_pretrained` reads for the LoRA part):
    <dir>/adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules (the list of the
                                     adapted modules' full names, in model order: exactly what was
                                     adapted, whatever selected it; older folders hold a regex),
                                     lora_dropout, bias "none", + cmrfm fields (contrast, pattern,
                                     cmrfm_forms, ...)
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight / .lora_B.weight,
                                     and for the cmrfm forms .ssf_scale / .ssf_shift and
                                     base_model.model.conditioning.prompt (PEFT ignores neither
                                     silently: only cmrfm reads adapters with cmrfm_forms beyond "lora")

PEFT itself is not a dependency (it pulls in transformers); only its format is kept.
References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; PEFT `tuners/lora`;
Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022;
Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021.
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

from models.conditioning import Conditioning

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
#: named layer groups of a backbone (models.backbone): module paths below `cascades.<i>.backbone.`
LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": (r"blocks\.\d+\.attn\.qkv",), "proj": (r"blocks\.\d+\.attn\.proj",),
    "fc1": (r"blocks\.\d+\.mlp\.fc1",), "fc2": (r"blocks\.\d+\.mlp\.fc2",),
    "attn": (r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.attn\.proj"),
    "mlp": (r"blocks\.\d+\.mlp\.fc1", r"blocks\.\d+\.mlp\.fc2"),
    "embed": (r"patch_embed", r"head"),             # the linear patch embedding and head
    "conv": (r"stem\.\d+", r"conv_head\.\d+"),      # the convolutional stem and head (conv_channels > 0)
}
_PREFIX = "base_model.model."
FORMS = ("lora", "scale_shift", "prompt")
#: parameter-name endings of adapter tensors (everything else is the frozen base)
_ADAPTER_PARAMS = (".lora_A.weight", ".lora_B.weight", ".ssf_scale", ".ssf_shift", "conditioning.prompt")


def layer_regex(layers: list[str] | tuple[str, ...]) -> str:
    """Named layer groups (LAYER_GROUPS keys, e.g. ["attn", "mlp"]) -> a targets regex on full module names.
    ["attn", "mlp"] adapts exactly what DEFAULT_TARGETS does."""
    unknown = sorted(set(layers) - set(LAYER_GROUPS))
    if unknown or not layers:
        raise ValueError(f"adapter layers {list(layers)}: expected a non-empty subset of {sorted(LAYER_GROUPS)}")
    parts = list(dict.fromkeys(p for layer in layers for p in LAYER_GROUPS[layer]))  # ordered, no repeats
    return r".*backbone\.(" + "|".join(parts) + ")"


def targets_for(targets: str, layers: list[str] | tuple[str, ...]) -> str:
    """The targets regex of a config: `layer_regex(layers)` when layer groups are named, else `targets`."""
    return layer_regex(layers) if layers else targets


def resolve_cascades(model: nn.Module, cascades: list[int] | tuple[int, ...]) -> list[int]:
    """Cascade indices (negative from the end, -1 = the last) -> sorted non-negative indices of `model.cascades`.
    With shared weights there is one cascade module: every index names it."""
    stack = getattr(model, "cascades", None)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError("adapter cascades: the model has no .cascades (a models.recon.ReconModel has)")
    n = len(stack)
    bad = [c for c in cascades if not -n <= c < n]
    if bad:
        raise ValueError(f"adapter cascades {list(cascades)}: {bad} out of range for a model with {n} cascade module(s)")
    return sorted({c % n for c in cascades})


def select_targets(model: nn.Module, targets_regex: str = DEFAULT_TARGETS,
                   cascades: list[int] | tuple[int, ...] | None = None) -> list[str]:
    """Full names of the nn.Linear / nn.Conv2d modules that `targets_regex` matches (re.fullmatch), in model
    order, restricted to the backbones of `cascades` when given (None or [] = every cascade)."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and re.fullmatch(targets_regex, name)]
    if cascades:
        prefixes = tuple(f"cascades.{i}." for i in resolve_cascades(model, cascades))
        names = [n for n in names if n.startswith(prefixes)]
    return names


def lora_parameter_count(layer: nn.Linear | nn.Conv2d, rank: int) -> int:
    """LoRA parameters of one adapted layer: r (in + out) for a linear, r (in k_h k_w + out) for a conv."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return rank * (layer.in_channels * kh * kw + layer.out_channels)
    return rank * (layer.in_features + layer.out_features)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter of the model (its full name) belongs to an adapter."""
    return name.endswith(_ADAPTER_PARAMS)


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`, then optionally `* (1 + ssf_scale) + ssf_shift`
    per output channel, with the base layer frozen. The base layer is an nn.Linear or an nn.Conv2d.

    Attribute names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`, `scaling`); for a
    Conv2d, as PEFT's `lora.Conv2d`: lora_A a conv of the base's kernel, stride, padding and dilation
    (in -> r), lora_B a 1 x 1 conv (r -> out). rank 0 means no low-rank update (lora_A = lora_B = None):
    scale and shift only.
    """

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0,
                 targets_regex: str = DEFAULT_TARGETS, scale_shift: bool = False) -> None:
        super().__init__()
        if rank < 0 or (rank == 0 and not scale_shift):
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        dd = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        if self.is_conv and base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported")
        n_out = base_layer.out_channels if self.is_conv else base_layer.out_features
        self.lora_A = self.lora_B = None
        if rank and self.is_conv:
            self.lora_A = nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size, base_layer.stride,
                                    base_layer.padding, base_layer.dilation, bias=False,
                                    padding_mode=base_layer.padding_mode, **dd)
            self.lora_B = nn.Conv2d(rank, n_out, 1, bias=False, **dd)
        elif rank:
            self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **dd)
            self.lora_B = nn.Linear(rank, n_out, bias=False, **dd)
        if rank:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
            nn.init.zeros_(self.lora_B.weight)  # the adapter starts as a no-op
        self.ssf_scale = nn.Parameter(torch.zeros(n_out, **dd)) if scale_shift else None
        self.ssf_shift = nn.Parameter(torch.zeros(n_out, **dd)) if scale_shift else None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.dropout, self.targets_regex = rank, alpha, dropout, targets_regex
        self.scaling = alpha / rank if rank else 0.0

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's tuner layers expose it): code that reads `layer.weight.dtype`,
        like the backbone's patch embedding, works on a wrapped layer."""
        return self.base_layer.weight

    def _channels(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the output: (out,) for a linear's
        (..., out), (out, 1, 1) for a conv's (N, out, H, W)."""
        return v[:, None, None] if self.is_conv else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.lora_A is not None:
            y = y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        if self.ssf_scale is not None:
            y = y * (1 + self._channels(self.ssf_scale)) + self._channels(self.ssf_shift)
        return y

    def merged(self) -> nn.Linear | nn.Conv2d:
        """The base layer with B A * scaling, then the scale and shift, folded in (computed in float32)."""
        base = self.base_layer
        with torch.no_grad():
            weight = base.weight.float()
            if self.lora_A is not None:
                # conv: (out, r) @ (r, in * kh * kw) is the update of the (out, in, kh, kw) kernel
                delta = self.lora_B.weight.float().flatten(1) @ self.lora_A.weight.float().flatten(1)
                weight = weight + delta.reshape(weight.shape) * self.scaling
            if self.ssf_scale is not None:
                gain = 1 + self.ssf_scale.float()
                weight = weight * gain.reshape(-1, *[1] * (weight.ndim - 1))
                bias = (base.bias.float() if base.bias is not None else 0.0) * gain + self.ssf_shift.float()
                if base.bias is None:
                    base.bias = nn.Parameter(torch.empty_like(self.ssf_shift), requires_grad=False)
                base.bias.copy_(bias.to(base.bias.dtype))
            base.weight.copy_(weight.to(base.weight.dtype))
        return base


class PromptedConditioning(nn.Module):
    """The metadata conditioning tokens plus a learned offset per token ("prompt" form), zeros at init."""

    def __init__(self, base: Conditioning) -> None:
        super().__init__()
        self.base = base
        self.prompt = nn.Parameter(torch.zeros(len(base.offsets), base.table.shape[1], device=base.table.device,
                                               dtype=base.table.dtype))

    def forward(self, meta: list[dict]) -> torch.Tensor:
        return self.base(meta) + self.prompt

    def merged(self) -> Conditioning:
        """The conditioning with the offset of field f added to every row of f's block (unknown included)."""
        ends = list(self.base.offsets[1:]) + [self.base.table.shape[0]]
        with torch.no_grad():
            for f, (start, end) in enumerate(zip(self.base.offsets, ends)):
                self.base.table[start:end] += self.prompt[f]
        return self.base


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapter in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_adapters(model: nn.Module, rank: int, alpha: float, targets_regex: str = DEFAULT_TARGETS,
                 dropout: float = 0.0, forms: tuple[str, ...] | list[str] = ("lora",),
                 cascades: list[int] | tuple[int, ...] | None = None) -> list[str]:
    """Add the adapter `forms` (see the module doc) in place: "lora" / "scale_shift" wrap every nn.Linear
    and nn.Conv2d whose full module name matches `targets_regex` (re.fullmatch), in the backbones of
    `cascades` only when given (`select_targets`), in a LoRALinear; "prompt" wraps `model.conditioning`.
    Freezes all other parameters. Returns the wrapped module names."""
    forms = tuple(forms)
    unknown = sorted(set(forms) - set(FORMS))
    if unknown or not forms:
        raise ValueError(f"adapter forms {list(forms)}: expected a non-empty subset of {list(FORMS)}")
    if has_adapters(model):
        raise ValueError("model already has LoRA adapters; merge_adapters() first or load into them")
    names: list[str] = []
    if "lora" in forms or "scale_shift" in forms:
        names = select_targets(model, targets_regex, cascades)
        if not names:
            raise ValueError(f"no nn.Linear / nn.Conv2d module name matches targets_regex {targets_regex!r}"
                             + (f" in cascades {list(cascades)}" if cascades else ""))
        for name in names:
            _replace(model, name, LoRALinear(model.get_submodule(name), rank if "lora" in forms else 0, alpha,
                                             dropout, targets_regex, scale_shift="scale_shift" in forms))
    if "prompt" in forms:
        if not isinstance(getattr(model, "conditioning", None), Conditioning):
            raise ValueError("the prompt form needs a model whose .conditioning is a models.conditioning.Conditioning")
        model.conditioning = PromptedConditioning(model.conditioning)
        names.append("conditioning")
    for pname, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(pname))
    return names


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model)) or isinstance(getattr(model, "conditioning", None), PromptedConditioning)


def adapter_forms(model: nn.Module) -> list[str]:
    """The forms of the adapters in `model`, in FORMS order."""
    layers = list(lora_layers(model).values())
    present = {"lora": any(l.rank for l in layers), "scale_shift": any(l.ssf_scale is not None for l in layers),
               "prompt": isinstance(getattr(model, "conditioning", None), PromptedConditioning)}
    return [f for f in FORMS if present[f]]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter tensors: the only parameters to give the optimizer."""
    return [p for name, p in model.named_parameters() if is_adapter_parameter(name)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors, detached, contiguous, on the CPU:
    `base_model.model.<path>.lora_A.weight` (r, in), `...lora_B.weight` (out, r), `...ssf_scale` (out,),
    `...ssf_shift` (out,), `base_model.model.conditioning.prompt` (6, D)."""
    return {f"{_PREFIX}{name}": p.detach().cpu().contiguous()
            for name, p in model.named_parameters() if is_adapter_parameter(name)}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named adapter tensors into the model's existing adapters (strict)."""
    params = {f"{_PREFIX}{name}": p for name, p in model.named_parameters() if is_adapter_parameter(name)}
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise KeyError(f"adapter state dict does not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
                       f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    with torch.no_grad():
        for key, weight in params.items():
            value = state_dict[key]
            if value.shape != weight.shape:
                raise ValueError(f"{key.removeprefix(_PREFIX)}: adapter shape {tuple(value.shape)} "
                                 f"!= model {tuple(weight.shape)}")
            weight.copy_(value.to(weight.dtype))


def adapter_state_dict_keys(model: nn.Module) -> list[str]:
    """The PEFT key names the model's adapters save under."""
    return [f"{_PREFIX}{name}" for name, _ in model.named_parameters() if is_adapter_parameter(name)]


def merge_adapters(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weights and put the plain modules back. Returns the names.
    The base weights keep the requires_grad that add_adapters gave them (False)."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        _replace(model, name, layer.merged())
    names = list(layers)
    if isinstance(getattr(model, "conditioning", None), PromptedConditioning):
        model.conditioning = model.conditioning.merged()
        names.append("conditioning")
    return names


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: dict | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) into `directory`.

    `config` adds cmrfm fields (contrast, pattern, base_model_sha256, ...) at the top level; it may
    not contradict the LoRA hyper-parameters, which are read from the model.
    """
    if not has_adapters(model):
        raise ValueError("save_adapter: the model has no LoRA adapters")
    wrapped = lora_layers(model)
    layers = list(wrapped.values())
    # target_modules: the adapted modules by full name (PEFT matches a list entry against a module's
    # name or a "."-suffix of it), so a reload adapts exactly these, whatever regex or cascade
    # selection chose them and whatever the architecture it is loaded into
    shape = ({"r": layers[0].rank, "lora_alpha": layers[0].alpha, "lora_dropout": layers[0].dropout,
              "target_modules": list(wrapped)} if layers else  # prompt only: no layer wrapped
             {"r": 0, "lora_alpha": 0.0, "lora_dropout": 0.0, "target_modules": ""})
    lora = {"peft_type": "LORA", **shape, "bias": "none", "cmrfm_forms": adapter_forms(model)}
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
    if not has_adapters(model):
        add_adapters(model, int(config["r"]), float(config["lora_alpha"]), _targets_regex(config["target_modules"]),
                     float(config.get("lora_dropout", 0.0)), config.get("cmrfm_forms", ["lora"]))
    try:
        load_adapter_state_dict(model, load_file(str(weights_path)))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{weights_path}: {exc}") from None
    return config
