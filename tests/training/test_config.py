from pathlib import Path

import pytest

from looplm_mega.config import ConfigError, from_dict
from looplm_mega.training.config import RunConfig, load_run_config

BASE = {"data": {"prefixes": ["d/x"], "seq_length": 64},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 10}}


def _config(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(RunConfig, data)


def test_batch_plan_and_token_budgets():
    config = _config(training={"global_batch_size": None, "global_batch_tokens": 1024, "train_steps": None, "train_tokens": 10_000})
    assert config.global_batch_size == 16 and config.train_steps == 10  # ceil(10000 / 1024)
    config.check_batches(data_parallel_size=2)
    with pytest.raises(ConfigError, match="16 samples is not a multiple of micro_batch_size=2 x 3 data-parallel ranks"):
        config.check_batches(data_parallel_size=3)


@pytest.mark.parametrize("sections, fragment", [
    ({"training": {"global_batch_tokens": 100}}, "set exactly one of the two"),
    ({"training": {"global_batch_size": None, "global_batch_tokens": 100}}, "global_batch_tokens=100 is not a multiple of data.seq_length=64"),
    ({"training": {"precision": "fp16"}}, r"training.precision: 'fp16' is not one of"),
    ({"training": {"micro_batch_sise": 3}}, "training.micro_batch_sise: unknown field of TrainingConfig"),
    ({"model": {"preset": "tiny", "total_ut_steps": 0}}, "model.total_ut_steps=0"),
    ({"model": {"preset": "tiny", "loops": 2}}, "model.loops: unknown field of LoopLMConfig"),
    ({"deepspeed": {"zero_stage": 4}}, r"deepspeed.zero_stage: 4 is not one of"),
    ({"deepspeed": {"zero_stage": 2, "offload_param": True}}, "offload_param needs ZeRO stage 3"),
    ({"schedule": {"warmup_steps": 50}}, "warmup_steps=50 exceeds the 10 training steps"),
    ({"optimizer": {"lr": 1e-4, "min_lr": 1e-3}}, "min_lr"),
    ({"data": {"seq_length": 4096}}, "data.seq_length=4096 exceeds model.max_position_embeddings=2048"),
    ({"training": {"train_steps": None}, "curriculum": [
        {"name": "short", "train_steps": 5},
        {"name": "long", "train_steps": 5, "seq_length": 4096, "global_batch_tokens": 8192, "micro_batch_size": 1}]},
     "curriculum stage 'long': seq_length=4096 exceeds model.max_position_embeddings=2048"),
])
def test_errors_name_the_field(sections, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(**sections)


def test_zero_stage_comes_from_the_deepspeed_json_unless_set(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": true}}')
    assert _config(deepspeed={"config_file": str(path)}).deepspeed.resolved_zero_stage() == 2
    assert _config(deepspeed={"config_file": str(path), "zero_stage": 3}).deepspeed.resolved_zero_stage() == 3
    assert _config().deepspeed.resolved_zero_stage() == 0
    path.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="deepspeed.config_file: .*not valid JSON"):
        _config(deepspeed={"config_file": str(path)})


def test_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {prefixes: [d/x], seq_length: 64}\n"
                    "training: {micro_batch_size: 2, global_batch_size: 8, train_steps: 10}\n")
    config = load_run_config(path, ["--training.train_steps", "20", "--model.total_ut_steps", "2", "--deepspeed.zero_stage", "3"])
    assert config.train_steps == 20 and config.model_config().total_ut_steps == 2 and config.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match=rf"{path} with command-line overrides: training.train_steps"):
        load_run_config(path, ["--training.train_steps", "many"])


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted([*(CONFIGS / "run").glob("*.yaml"), *(CONFIGS / "curriculum").glob("*.yaml")]),
                         ids=lambda path: f"{path.parent.name}/{path.name}")
def test_ready_run_configs_load(path, monkeypatch):
    monkeypatch.chdir(path.parents[2])  # they name configs/deepspeed/*.json relative to the repository
    config = load_run_config(path)
    assert config.train_steps >= 1 and config.model_config().num_hidden_layers >= 1
    config.check_batches(2)
