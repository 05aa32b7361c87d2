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


def _zero3_one_weight_copy_and_release_after_every_loop(tmp: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from looplm_mega.parallel.build import build_model
    from looplm_mega.parallel.state import initialize_parallel
    from looplm_mega.training.deepspeed_engine import DeepSpeedEngine
    from looplm_mega.training.optimizer import parameter_groups
    from tests.training.runs import run_config

    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    parallel, cpu = initialize_parallel(), torch.device("cpu")
    run = run_config("unused", tmp, deepspeed={"zero_stage": 3, "extra": {"zero_optimization": {
        "stage3_param_persistence_threshold": 0}}})
    model = build_model(run.model_config(), place=DeepSpeedEngine.placement(run, parallel, cpu, 2, 2))
    engine = DeepSpeedEngine(model, parameter_groups(model, 0.1), run, parallel, cpu, 2, 2)
    optimizer = engine.optimizer  # an fp32 run: the master weights are the partitions themselves
    assert all(master.data_ptr() == weights.data_ptr()
               for weights, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat))
    layers = list(model.model.layers)
    gathered_at_each_backward = []

    def count(*_):
        gathered_at_each_backward.append(sum(p.ds_status == ZeroParamStatus.AVAILABLE for layer in layers for p in layer.parameters()))

    for layer in layers:
        layer.register_full_backward_hook(count)
    engine.configure(2, 2, 16, "stage1")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    for _ in range(2):  # the second step runs on DeepSpeed's recorded trace (and would prefetch by it)
        gathered_at_each_backward.clear()
        engine.train_batch([batch, batch])
        # Each use of a layer in the backward (loops x layers x micro-batches of them) finds at most
        # its own weights gathered: the previous use has released its layer's.
        per_layer = len(list(layers[0].parameters()))
        assert len(gathered_at_each_backward) == 2 * len(layers) * run.model_config().total_ut_steps
        assert max(gathered_at_each_backward) <= per_layer, gathered_at_each_backward
    dist.destroy_process_group()


def test_zero3_keeps_one_weight_copy_and_releases_each_loops_weights(tmp_path):
    from tests.distributed import run_distributed

    run_distributed(_zero3_one_weight_copy_and_release_after_every_loop, 2, str(tmp_path), timeout=300)
