import json

import torch

from looplm_mega.config import from_dict, to_dict
from looplm_mega.training.config import RunConfig
from looplm_mega.training.deepspeed_engine import deepspeed_config


def _config(**deepspeed) -> RunConfig:
    return from_dict(RunConfig, {"data": {"prefixes": ["unused"]}, "model": {"preset": "ouro_1_4b"},
                                 "training": {"global_batch_size": 8, "train_steps": 1}, "deepspeed": deepspeed})


def test_zero_buckets_are_sized_from_the_model_unless_deepspeed_json_or_keys_say(tmp_path):
    zero = deepspeed_config(_config(zero_stage=3), 1, 8, torch.device("cpu"))["zero_optimization"]
    hidden = 2048
    assert zero["reduce_bucket_size"] == hidden**2 and zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert zero["stage3_max_reuse_distance"] == zero["sub_group_size"] == hidden**2
    assert zero["stage3_prefetch_bucket_size"] == 0  # the model loops: see zero_sizes
    unlooped = from_dict(RunConfig, {**to_dict(_config(zero_stage=3)), "model": {"preset": "ouro_1_4b", "total_ut_steps": 1}})
    zero = deepspeed_config(unlooped, 1, 8, torch.device("cpu"))["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden**2)
    zero = deepspeed_config(_config(zero_stage=2), 1, 8, torch.device("cpu"))["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == hidden**2 and "stage3_prefetch_bucket_size" not in zero
    assert "reduce_bucket_size" not in deepspeed_config(_config(zero_stage=0), 1, 8, torch.device("cpu"))["zero_optimization"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    zero = deepspeed_config(_config(config_file=str(path)), 1, 8, torch.device("cpu"))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000 and "stage3_prefetch_bucket_size" not in zero  # the JSON's own
    inline = _config(zero_stage=3, extra={"zero_optimization": {"reduce_bucket_size": 7}})
    assert deepspeed_config(inline, 1, 8, torch.device("cpu"))["zero_optimization"]["reduce_bucket_size"] == 7
