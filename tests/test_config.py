from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from looplm_mega.config import ConfigError, apply_overrides, from_dict, load_yaml, parse_overrides, save_yaml


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
