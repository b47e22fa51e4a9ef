"""launch.cli: TOML -> nested dataclasses, typed --set overrides, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from launch.cli import ConfigError, dump_config, load_config, parse_args


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    warm: bool = False


@dataclasses.dataclass
class Job:
    name: str = "run"
    out: str | None = None
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_defaults_without_a_file() -> None:
    assert load_config(Job) == Job()


def test_file_then_overrides_coerced_to_field_types(tmp_path: Path) -> None:
    f = tmp_path / "job.toml"
    f.write_text('name = "a"\n[optim]\nlr = 0.5\nsteps = 3\n')
    cfg = load_config(Job, f, ["optim.steps=7", "optim.warm=true", "optim.betas=0.8,0.9", "out=/x"])
    assert cfg.name == "a" and cfg.optim.lr == 0.5
    assert cfg.optim.steps == 7 and isinstance(cfg.optim.steps, int)
    assert cfg.optim.warm is True and cfg.optim.betas == [0.8, 0.9] and cfg.out == "/x"
    assert load_config(Job, None, ["out=none"]).out is None


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "typo.toml"
    f.write_text("[optim]\nlrr = 1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, f)
    assert str(f) in str(err.value) and "'lrr'" in str(err.value)


def test_unknown_or_mistyped_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'optim.nope'"):
        load_config(Job, None, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Job, None, ["optim.steps=2.5"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(Job, None, ["optim.warm=maybe"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(Job, None, ["optim.steps"])


def test_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(Job, bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(Job, None, ["optim.lr=0.25", "name=b"])
    path = dump_config(cfg, tmp_path / "run" / "config.toml")
    assert tomllib.loads(path.read_text())["optim"]["lr"] == 0.25
    assert load_config(Job, path) == cfg
    assert not list(path.parent.glob("*.tmp"))


def test_parse_args_accepts_deepspeed_local_rank() -> None:
    cfg = parse_args(Job, ["--local_rank=1", "--set", "optim.steps=4"])
    assert cfg.optim.steps == 4


def test_parse_args_exits_with_message_on_bad_key() -> None:
    code = ("import dataclasses\nfrom launch.cli import parse_args\n"
            "@dataclasses.dataclass\nclass C:\n    a: int = 1\nparse_args(C, ['--set', 'b=2'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "'b'" in proc.stderr
