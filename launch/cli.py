"""Typed stage configs: TOML file -> nested dataclasses, `--set section.key=value` overrides.

Every entry point of cmrfm takes the same flags::

    --config FILE.toml          optional; the dataclass defaults are used without it
    --set section.key=value     repeatable; coerced to the field's declared type
    --local_rank N              tolerated (the DeepSpeed launcher appends it)

An unknown key, in the file or in a `--set`, is an error that names the file (or `--set`) and the
key: a typo must never be silently ignored. The resolved config is written next to the outputs
with `dump_config`, so every run records exactly what it ran with.

This module is stdlib-only (plus tomli_w for writing, and launch.outputs, itself stdlib-only) so that
every stage may import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from launch.outputs import write_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the stage's dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert `value` (from TOML or a `--set` string) to the declared type `typ`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], where)
    if origin is dict:
        # a table: TOML `{modality = ["cine"]}`, or the same inline table as a --set string
        if isinstance(value, str):
            try:
                value = tomllib.loads(f"v = {value}")["v"] if value.strip() else {}
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{where}: expected an inline table like {{a = [\"x\"]}}, got {value!r} ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, inner = typing.get_args(typ) or (str, Any)
        return {str(k): _coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(typ) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, where) for v in value]
        return items if origin is list else tuple(items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a [table], got {value!r}")
        return _build(typ, value, where)
    return value


def _build(cls: type[T], table: dict[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(table) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for [{cls.__name__}]; known: {sorted(types_)}")
    default = cls()
    kwargs = {}
    for name, typ in types_.items():
        if name in table:
            kwargs[name] = _coerce(table[name], typ, f"{where}: {name}")
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def _set(cfg: Any, dotted: str, raw: str, where: str, full: str | None = None) -> Any:
    """Return a copy of `cfg` with `dotted` (e.g. 'optim.lr') replaced by `raw` coerced to its type."""
    full = full or dotted
    head, _, rest = dotted.partition(".")
    types_ = _field_types(type(cfg))
    if head not in types_:
        raise ConfigError(f"{where}: unknown key {full!r} for [{type(cfg).__name__}]; known: {sorted(types_)}")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}: {head!r} is not a section, cannot set {full!r}")
        return dataclasses.replace(cfg, **{head: _set(current, rest, raw, where, full)})
    return dataclasses.replace(cfg, **{head: _coerce(raw, types_[head], f"{where}: {full}")})


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from its defaults, then the TOML file at `path`, then each `key=value` override."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        cfg = _build(cls, table, str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        cfg = _set(cfg, key.strip(), raw.strip(), f"--set {item!r}")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain TOML-serialisable data (None values dropped: TOML has no null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(dataclasses.asdict(cfg))


def config_differences(recorded: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = (),
                       prefix: str = "") -> list[str]:
    """'key: recorded -> wanted' for every (dotted) key whose value differs; keys in `ignore` (dotted)
    are skipped. Used before reusing an output: reuse only what the same config made."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as TOML (launch.outputs.write_atomic) and return the path."""
    return write_atomic(path, tomli_w.dumps(config_to_dict(cfg)))


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `--config` / `--set` / `--local_rank` from argv into a `cls` instance."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", default=None, help="TOML file; the built-in defaults are used without it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="appended by the DeepSpeed launcher; the rank is read from the environment")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
