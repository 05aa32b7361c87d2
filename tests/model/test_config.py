import pytest
import torch

from looplm_mega.config import ConfigError, from_dict
from looplm_mega.model import LoopLM, LoopLMConfig

RELEASED_COUNTS = {"ouro_1_4b": 1_434_652_673, "ouro_2_6b": 2_667_974_657}


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "ouro_1_4b", "ouro_2_6b"])
def test_preset_parameter_counts(preset):
    config = LoopLMConfig.from_preset(preset)
    with torch.device("meta"):
        count = LoopLM(config).num_parameters()
    expected = RELEASED_COUNTS.get(preset)
    if expected is not None:
        assert count == expected
    else:
        approx = {"tiny": (2e6, 8e6), "small": (80e6, 130e6), "medium": (350e6, 450e6)}[preset]
        assert approx[0] <= count <= approx[1], count


@pytest.mark.parametrize("changes, fragment", [
    (dict(hidden_size=100, num_attention_heads=16), "hidden_size=100 is not divisible by num_attention_heads=16"),
    (dict(num_attention_heads=16, num_key_value_heads=5), "num_attention_heads=16 is not divisible by num_key_value_heads=5"),
    (dict(total_ut_steps=0), "total_ut_steps=0"),
    (dict(attention_backend="xformers"), "attention_backend: 'xformers' is not one of"),
    (dict(hidden_dim=3), "hidden_dim: unknown field of LoopLMConfig"),
])
def test_validation_names_the_field(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(LoopLMConfig, {"hidden_size": 64, "num_attention_heads": 4, **changes})


def test_unknown_field_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 64\nnum_attention_heads: 4\nloops: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: loops: unknown field"):
        LoopLMConfig.load(str(path))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="model preset 'huge' does not exist"):
        LoopLMConfig.from_preset("huge")


def test_released_fields_match_the_released_config():
    released = LoopLMConfig.from_preset("ouro_1_4b").released_dict()
    assert released["total_ut_steps"] == 4 and released["rope_theta"] == 1_000_000.0
    assert released["head_dim"] == 128 and released["tie_word_embeddings"] is False
