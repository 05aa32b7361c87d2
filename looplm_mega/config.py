"""Typed configs: dataclasses loaded from YAML, validated on load, overridable by dotted flags.

Every config in the project (model, run, stages ...) is a dataclass. This module turns plain
dicts (from YAML or the command line) into those dataclasses and back, and names the exact
field at fault when something does not fit. We write this ourselves because the libraries that
do it (OmegaConf, Hydra, dacite) either lose the dataclass types or bring a framework with them;
the whole job is a recursive walk over `dataclasses.fields`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that does not fit; the message names the file and field."""


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (ints to floats etc.)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [arg for arg in args if arg is not type(None)]
        if all(typing.get_origin(arg) is Literal for arg in choices):  # one list of allowed values
            return _convert(value, Literal[tuple(v for arg in choices for v in typing.get_args(arg))], where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3.0e12 (no sign in the exponent) as a string
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # YAML reads 1e6 as a float
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field of {cls.__name__} (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(config: Any) -> dict:
    """The plain-dict form of a config, fit for YAML or JSON."""
    return dataclasses.asdict(config)


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load a YAML file into dataclass `cls`; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config as YAML, atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)


def parse_overrides(args: Sequence[str]) -> dict:
    """Turn `--a.b value` / `--a.b=value` flags into a nested dict; values are parsed as YAML
    scalars, so `--model.total_ut_steps 4` gives an int and `--x.y null` gives None."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg!r}: expected a flag of the form --section.field value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing a value")
            raw = args[i + 1]
            i += 1
        i += 1
        value = _parse_scalar(raw)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return nested


def _parse_scalar(raw: str) -> Any:
    """A command-line value as YAML reads it, except that 2e-3 is a number (YAML 1.1 wants 2.0e-3)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def merge(base: dict, updates: dict) -> dict:
    """Recursively merge `updates` into a copy of `base`."""
    out = dict(base)
    for k, v in updates.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(config: T, args: Sequence[str]) -> T:
    """A copy of `config` with dotted command-line flags applied and validated again."""
    return from_dict(type(config), merge(to_dict(config), parse_overrides(args)))
