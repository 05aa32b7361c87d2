"""Typed configs: dataclasses loaded from YAML, validated on load, overridable by dotted flags.

Every config in the project (model, run, stages ...) is a dataclass. This module turns plain
dicts (from YAML or the command line) into those dataclasses and back, and names the exact
field at fault when something does not fit. We write this ourselves because the libraries that
do it (OmegaConf, Hydra, dacite) either lose the dataclass types or bring a framework with them;
the whole job is a recursive walk over `dataclasses.fields`.

A field's meaning is written once, as the comment on its line or the comment lines right above
it; `format_fields` reads those comments back from the source for `--help`, so the text the next
engineer reads and the text a user reads are the same. (tyro and draccus also make a command line
out of dataclasses, but they would replace the YAML loading, the dotted overrides and the error
messages of this module instead of adding a help page to them.)
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
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
        text = path.read_text()
    except OSError as e:  # missing, a directory, unreadable
        raise ConfigError(f"{path}: {e.strerror.lower()}") from None
    try:
        data = yaml.safe_load(text) or {}
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


# -- help: every field with its type, default and meaning ----------------------------------------

_RULER = re.compile(r"-{3,}.*-{3,}")  # `# --- title ---` heads a group of fields; it is no meaning


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The meaning of each field of dataclass `cls`: the comment on its line, else the comment
    lines right above it (joined). Fields of base classes included; {} where there is no source."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        source = textwrap.dedent("".join(lines))
        on_line = {tok.start[0]: tok.string.lstrip("#").strip()
                   for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        names = set(klass.__dict__.get("__annotations__", {}))
        above: list[str] = []
        for number, line in enumerate(source.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("#"):
                if not _RULER.fullmatch(on_line[number]):
                    above.append(on_line[number])
                continue
            match = re.match(r"    (\w+)\s*:", line)
            if match and match.group(1) in names and match.group(1) not in comments:
                text = on_line.get(number) or " ".join(above)
                if text:
                    comments[match.group(1)] = text
            above = []
    return comments


def _show_type(tp: Any) -> str:
    """An annotation as a user writes the value: `int | null`, `fp32 | bf16`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _show_type(a) for a in args)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"list[{_show_type(args[0])}]" if args else "list"
    if tp is dict or origin is dict:
        return "mapping"
    return _type_name(tp)


def _show_value(value: Any) -> str:
    """A default as YAML writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return repr(value)


def _nested_dataclass(tp: Any) -> Any:
    """The dataclass a field holds (directly, optionally, or as list items), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return _nested_dataclass(args[0])
    if typing.get_origin(tp) in (list, collections.abc.Sequence) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def format_fields(cls: type, prefix: str = "--", expand: dict[str, tuple[type, str]] | None = None,
                  indent: str = "  ", width: int = 100) -> str:
    """Every field of dataclass `cls` and of the dataclasses inside it, one entry each:

        --training.micro_batch_size  int  (default: 1)
              samples per device per forward

    A nested dataclass is a section with its own entries (`--section.field`); a list of them is
    written in YAML only and its entries read `section[].field`. `expand` describes fields typed
    as a plain mapping: {name: (dataclass whose fields the mapping takes, note on their defaults)}."""
    expand = expand or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    wrap = functools.partial(textwrap.fill, width=width, initial_indent=indent + "      ",
                             subsequent_indent=indent + "      ", break_on_hyphens=False)
    blocks = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name, tp = f"{prefix}{f.name}", hints[f.name]
        nested = _nested_dataclass(tp)
        if f.default is not dataclasses.MISSING:
            default = f"default: {_show_value(f.default)}"
        elif f.default_factory is not dataclasses.MISSING and not nested:
            default = f"default: {_show_value(f.default_factory())}"
        elif f.default_factory is not dataclasses.MISSING:
            default = "a section; the fields it leaves out take the defaults below"
        else:
            default = "required"
        extra_keys = {}
        if f.name in expand:  # a mapping that takes a dataclass's fields, and keys of its own
            nested, note = expand[f.name]
            extra_keys = {k: v for k, v in f.default_factory().items() if k not in {g.name for g in dataclasses.fields(nested)}}
            default += f"; {note}"
        if nested and typing.get_origin(tp) in (list, collections.abc.Sequence):
            header = f"{indent}{prefix.lstrip('-')}{f.name}  list[{nested.__name__}]  (default: [], set in the YAML only)"
            inner_prefix = f"{prefix.lstrip('-')}{f.name}[]."
        elif nested:
            kind = "mapping" if f.name in expand else nested.__name__ + (" | null" if type(None) in typing.get_args(tp) else "")
            header, inner_prefix = f"{indent}{name}  {kind}  ({default})", f"{name}."
        else:
            header, inner_prefix = f"{indent}{name}  {_show_type(tp)}  ({default})", None
        lines = [header]
        meaning = comments.get(f.name) or _class_doc(nested)
        if meaning:
            lines.append(wrap(meaning))
        lines += [f"{indent}  {inner_prefix}{key}  {_type_name(type(value))}  (default: {_show_value(value)})"
                  for key, value in extra_keys.items()]
        if nested:
            lines.append(format_fields(nested, inner_prefix, None, indent + "  ", width))
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _class_doc(cls: Any) -> str:
    """A dataclass's own docstring, not the signature that @dataclass makes up without one."""
    doc = inspect.getdoc(cls) if cls is not None else None
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split())
