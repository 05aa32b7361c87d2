import pytest

from looplm_mega.config import ConfigError, apply_overrides, from_dict, load_yaml
from looplm_mega.data.config import DataConfig


def test_a_blend_loads_from_yaml_with_megatron_split(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("prefixes: [web_text_document, code_text_document]\nweights: [3, 1]\n"
                    "split: '969,30,1'\nseq_length: 8192\neod_token_id: 0\ncache_dir: /tmp/cache\n")
    config = load_yaml(DataConfig, path)
    assert config.weights == [3.0, 1.0] and config.seq_length == 8192 and config.reset_attention_mask
    assert config.split_ratios == pytest.approx((0.969, 0.03, 0.001))


@pytest.mark.parametrize("split,ratios", [("98,2", (0.98, 0.02, 0.0)), ("1", (1.0, 0.0, 0.0)),
                                          ("8/1/1", (0.8, 0.1, 0.1)), ([90, 5, 5], (0.9, 0.05, 0.05))])
def test_split_forms(split, ratios):
    assert DataConfig(prefixes=["a"], split=split).split_ratios == pytest.approx(ratios)


@pytest.mark.parametrize("fields,message", [
    ({}, "prefixes: at least one dataset prefix is needed"),
    ({"prefixes": ["a", ""]}, r"prefixes\[1\]: empty dataset prefix"),
    ({"prefixes": ["a.bin"]}, r"prefixes\[0\]: 'a.bin' should be the prefix without .bin/.idx"),
    ({"prefixes": ["a", "b"], "weights": [1.0]}, "weights: 1 weights for 2 prefixes"),
    ({"prefixes": ["a", "b"], "weights": [1.0, -0.5]}, r"weights\[1\]: -0.5 must be a finite number >= 0"),
    ({"prefixes": ["a", "b"], "weights": [0, 0]}, "weights: .* must not all be 0"),
    ({"prefixes": ["a"], "split": "9,x,1"}, "split: '9,x,1' is not a list of numbers"),
    ({"prefixes": ["a"], "split": "1,1,1,1"}, "split: '1,1,1,1' needs 1 to 3 parts"),
    ({"prefixes": ["a"], "split": [0, 0, 0]}, "split: .* must be >= 0 and not all 0"),
    ({"prefixes": ["a"], "split": "5,-1,1"}, "split: .* must be >= 0"),
    ({"prefixes": ["a"], "seq_length": 0}, "seq_length: 0 must be at least 1"),
    ({"prefixes": ["a"], "seed": -1}, r"seed: -1 must be in \[0, 2\*\*32\)"),
    ({"prefixes": ["a"], "seed": 2**32}, "seed: 4294967296 must be in"),
    ({"prefixes": ["a"], "eod_token_id": -2}, "eod_token_id: -2 must be >= 0"),
    ({"prefixes": ["a"], "seq_lenght": 5}, "seq_lenght: unknown field of DataConfig"),
    ({"prefixes": ["a"], "seq_length": "long"}, "seq_length: expected an integer"),
    ({"prefixes": "a"}, "prefixes: expected a list"),
])
def test_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, fields)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prefixes: [a]\nweights: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: weights: 2 weights for 1 prefixes"):
        load_yaml(DataConfig, path)


def test_command_line_overrides_are_validated():
    config = apply_overrides(DataConfig(prefixes=["a"]), ["--seq_length", "2048", "--split", "99,1"])
    assert config.seq_length == 2048 and config.split_ratios == pytest.approx((0.99, 0.01, 0.0))
    with pytest.raises(ConfigError, match="seq_length: 0 must be at least 1"):
        apply_overrides(config, ["--seq_length", "0"])
