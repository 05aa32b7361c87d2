"""A rank's model built tensor by tensor (parallel/build.py) against today's construction,
LoopLM(config) from the same seed: the same values at every layout (TP shards, ZeRO-3 partitions,
weights read from a model directory), and a ZeRO-3 rank never holding the whole model."""

import deepspeed
import torch
import torch.distributed as dist

from looplm_mega.model import LoopLM
from looplm_mega.parallel.build import build_model
from looplm_mega.parallel.state import initialize_parallel
from looplm_mega.parallel.tensor_parallel import TensorParallel
from looplm_mega.training.deepspeed_engine import DeepSpeedEngine
from looplm_mega.training.model_dir import RankWeights, write_model_dir
from looplm_mega.training.optimizer import parameter_groups

from tests.distributed import run_distributed
from tests.helpers import tiny_config
from tests.training.runs import run_config


def test_built_model_equals_eager_construction_and_leaves_the_generator_alike():
    for tied in (False, True):
        config = tiny_config(tie_word_embeddings=tied)
        torch.manual_seed(3)
        eager, after_eager = LoopLM(config), torch.get_rng_state()
        torch.manual_seed(3)
        built, after_built = build_model(config), torch.get_rng_state()
        assert torch.equal(after_eager, after_built)  # what is drawn next is the same too
        expected, got = eager.state_dict(), built.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
        assert torch.equal(built.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)
        assert (built.lm_head.weight is built.model.embed_tokens.weight) == tied


def test_meta_build_allocates_nothing():
    model = build_model(tiny_config(), 1, 2, materialize=False)
    assert all(p.is_meta for p in model.parameters())
    assert not hasattr(model.model, "embed_tokens") and sorted(model.model.layers) == ["1"]  # the last pipeline rank's part


def _decay(model) -> dict[str, float]:
    decay = {id(p): group["weight_decay"] for group in parameter_groups(model, 0.1) for p in group["params"]}
    return {name: decay[id(p)] for name, p in model.named_parameters()}


def _zero3_partitions_equal_eager(tmp: str) -> None:
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    parallel = initialize_parallel(tp=2)
    tp = TensorParallel.from_state(parallel)
    run = run_config("unused", tmp, deepspeed={"zero_stage": 3}, parallel={"tp": 2})
    model_config = run.model_config()
    torch.manual_seed(0)
    eager = LoopLM(model_config, tp)
    expected = eager.state_dict()
    place = DeepSpeedEngine.placement(run, parallel, torch.device("cpu"), 2, 2)
    assert place is not None
    sources = {"seed": None}
    whole = LoopLM(model_config).state_dict()  # other values than eager's: the seed moved on
    if dist.get_rank() == 0:
        write_model_dir(f"{tmp}/model", whole, model_config)
    dist.barrier()
    sources["model directory"] = RankWeights(f"{tmp}/model", tp.rank, 2, model_config)
    for source, weights in sources.items():
        torch.manual_seed(0)
        built = build_model(model_config, tp=tp, weights=weights, place=place)
        params = dict(built.named_parameters())
        assert all(p.ds_tensor.numel() <= -(-p.ds_numel // parallel.dp) for p in params.values()), source
        assert all(p.numel() == 0 for n, p in params.items() if p.ds_numel > 1000), source  # partitioned, not whole
        assert _decay(built) == _decay(eager)  # a partition is 1-D; the parameter may not be
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, param in params.items():
                want = expected[name] if weights is None else eager.tensor_parallel_shard(name, whole[name])
                assert torch.equal(param.data, want), (source, name)
    dist.destroy_process_group()


def test_zero3_partitions_hold_the_eager_values_at_tp2_dp2(tmp_path):
    run_distributed(_zero3_partitions_equal_eager, 4, str(tmp_path), timeout=300)
