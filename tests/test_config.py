from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from looplm_mega.config import (ConfigError, apply_overrides, field_comments, format_fields, from_dict, load_yaml,
                                parse_overrides, save_yaml)


@dataclass
class Inner:
    rate: float = 1.0
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 3
    limit: Optional[int] = None
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_nested_from_dict_converts_and_validates():
    cfg = from_dict(Outer, {"steps": 2.0, "inner": {"rate": 3}, "tags": ["p"]})
    assert cfg.steps == 2 and isinstance(cfg.inner.rate, float) and cfg.tags == ["p"]


@pytest.mark.parametrize("data, fragment", [
    ({"stepz": 1}, "stepz: unknown field of Outer"),
    ({"steps": "many"}, "steps: expected an integer"),
    ({"steps": True}, "steps: expected an integer"),
    ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of"),
    ({"inner": {"rat": 1}}, "inner.rat: unknown field of Inner"),
    ({"tags": [1]}, "tags[0]: expected a string"),
    ({"limit": "x"}, "limit: expected an integer"),
])
def test_errors_name_the_field(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_dotted_overrides():
    assert parse_overrides(["--inner.rate", "2e-3", "--limit=null", "--name", "run"]) == {
        "inner": {"rate": 0.002}, "limit": None, "name": "run"}
    cfg = apply_overrides(Outer(), ["--inner.mode", "b", "--steps", "7"])
    assert cfg.inner.mode == "b" and cfg.steps == 7
    with pytest.raises(ConfigError, match="inner.nope"):
        apply_overrides(Outer(), ["--inner.nope", "1"])
    with pytest.raises(ConfigError, match="missing a value"):
        parse_overrides(["--steps"])


def test_yaml_round_trip_and_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    save_yaml(Outer(steps=5, inner=Inner(rate=0.5)), path)
    assert load_yaml(Outer, path) == Outer(steps=5, inner=Inner(rate=0.5))
    path.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_yaml(Outer, path)
    path.write_text("inner:\n  rate: fast\n")
    with pytest.raises(ConfigError, match=f"{path}: inner.rate: expected a number"):
        load_yaml(Outer, path)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'missing.yaml'}: no such file"):
        load_yaml(Outer, tmp_path / "missing.yaml")


@dataclass
class Documented:
    """A section with a docstring."""

    # --- a heading, not a meaning ---
    plain: int = 1
    rate: float = 0.5  # on its line
    # above it,
    # on two lines
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)  # a list of sections
    need: Optional[str] = None


def test_field_comments_read_the_comment_on_or_above_each_field():
    assert field_comments(Documented) == {"rate": "on its line", "mode": "above it, on two lines",
                                          "items": "a list of sections"}


def test_format_fields_lists_every_field_with_type_default_and_meaning():
    text = format_fields(Documented)
    lines = text.splitlines()
    assert "  --plain  int  (default: 1)" in lines
    assert lines[lines.index("  --rate  float  (default: 0.5)") + 1].strip() == "on its line"
    assert "  --mode  a | b  (default: a)" in lines
    assert "  --need  str | null  (default: null)" in lines
    assert "    --inner.rate  float  (default: 1.0)" in lines
    assert "    items[].mode  a | b  (default: a)" in lines
    assert "heading" not in text
