"""Imports flow one way, as the data does (docs/style.md §11.2), checked with `ast`.

    launch.cli, launch.outputs, launch.trees : stdlib (+ tomli_w): every stage may import them
    shards.fft  : numpy only (the FFT convention, a leaf every package may use)
    challenge   -> shards.fft, launch.trees            the organisers' definitions: nothing else of ours
    shards      -> launch.cli, launch.outputs, launch.trees, challenge    never models / pretrain / finetune / deepspeed / torch.distributed
    models      -> torch, timm, einops, numpy          never shards / pretrain / finetune / deepspeed / torch.distributed
    pretrain    -> shards, models, launch.cli          only pretrain/engine.py imports deepspeed
    finetune    -> shards, models, challenge, pretrain.checkpoint, pretrain.dist_env, pretrain.objective, launch.cli    never deepspeed
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"shards", "models", "pretrain", "finetune", "launch", "challenge"}
SHARED = {"cli.py", "outputs.py", "trees.py"}   # launch/ modules every stage may import
_SHARED_MODULES = {"launch.cli", "launch.outputs", "launch.trees"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name imported by `path` (relative imports resolved to the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.parent.name
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else ""
                module = f"{base}.{node.module}" if node.module else base
                out += [(node.lineno, f"{module}.{a.name}" if not node.module else module) for a in node.names]
            else:
                out += [(node.lineno, node.module)]
                # `from torch import distributed` is torch.distributed too
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def forbidden(package: str, file: Path, module: str) -> str | None:
    top = module.split(".")[0]
    if top in {"pickle", "dill", "cloudpickle", "_pickle"}:
        return "pickle is not allowed anywhere (data and weights are .npy/.json/safetensors)"
    if package == "launch" and file.name in SHARED:
        if top not in sys.stdlib_module_names and top not in {"tomli_w", "__future__"} \
                and not any(module == m or module.startswith(m + ".") for m in _SHARED_MODULES):
            return f"launch/{file.name} is stdlib-only so that every stage can import it"
    if package == "shards" and file.name == "fft.py" and top in PROJECT:
        return "shards/fft.py is a leaf (numpy only): challenge/ imports it"
    if package in {"shards", "models", "finetune", "challenge"} and top == "deepspeed":
        return f"{package}/ must not import deepspeed (only pretrain/engine.py does)"
    if package in {"shards", "models", "challenge"} and (module == "torch.distributed" or module.startswith("torch.distributed.")):
        return f"{package}/ must not import torch.distributed"
    if package == "pretrain" and top == "deepspeed" and file.name != "engine.py":
        return "only pretrain/engine.py imports deepspeed"
    if top in PROJECT and top != package:
        allowed = {
            "launch": set(),
            "shards": {"challenge"} | _SHARED_MODULES,
            "challenge": {"shards.fft", "launch.trees"},
            "models": set(),
            "pretrain": {"shards", "models"} | _SHARED_MODULES,
            # pretrain.objective is pure torch (the SSDU split): test-time adaptation reuses it
            "finetune": {"shards", "models", "challenge", "pretrain.checkpoint", "pretrain.dist_env",
                         "pretrain.objective"} | _SHARED_MODULES,
        }[package]
        if not any(module == a or module.startswith(a + ".") for a in allowed):
            return f"{package}/ may import only {sorted(allowed) or 'no other project package'}"
    return None


def python_files() -> list[Path]:
    return sorted(p for pkg in sorted(PROJECT) for p in (ROOT / pkg).glob("*.py"))


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    problems = [f"{path.relative_to(ROOT)}:{line}: imports {mod}: {why}"
                for line, mod in imports_of(path)
                if (why := forbidden(path.parent.name, path, mod))]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    """The rule is not vacuous: a models/ file importing shards, or a shards/ file importing
    torch.distributed, is reported."""
    bad = tmp_path / "models" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import shards.loader\nfrom torch import distributed\nimport pickle\n")
    found = [forbidden("models", bad, m) for _, m in imports_of(bad)]
    assert any(f and "models/ may import only" in f for f in found)
    assert any(f and "torch.distributed" in f for f in found)
    assert any(f and "pickle" in f for f in found)
    ok = tmp_path / "pretrain" / "run.py"
    ok.parent.mkdir()
    ok.write_text("import deepspeed\n")
    assert forbidden("pretrain", ok, "deepspeed") == "only pretrain/engine.py imports deepspeed"
    rules = tmp_path / "challenge" / "metrics.py"
    rules.parent.mkdir()
    assert forbidden("challenge", rules, "shards.fft") is None
    assert "challenge/ may import only" in (forbidden("challenge", rules, "shards.matfile") or "")
    assert "challenge/ may import only" in (forbidden("challenge", rules, "finetune.evaluate") or "")
    leaf = tmp_path / "shards" / "fft.py"
    leaf.parent.mkdir()
    assert "leaf" in (forbidden("shards", leaf, "challenge.masks") or "")


def test_script_folders_do_not_shadow_modules() -> None:
    """`deepspeed pretrain/run.py` puts pretrain/ first on sys.path: a pretrain/ssl.py would replace
    the stdlib ssl for the whole process (docs/style.md §10.2). finetune/ and shards/ entry points run in
    module mode (`python -m`, `accelerate launch -m`), where the trap does not apply."""
    risky = set(sys.stdlib_module_names) | {"deepspeed", "torch", "models", "shards", "config", "distributed",
                                             "numpy", "timm", "einops", "accelerate", "webdataset", "h5py",
                                             "scipy", "evaluate", "safetensors", "tqdm", "launch"}
    names = {p.stem for p in (ROOT / "pretrain").glob("*.py")} - {"__init__"}
    assert names, "pretrain/ has no modules"
    assert not names & risky, f"pretrain/ shadows {sorted(names & risky)}"
