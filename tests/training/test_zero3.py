"""ZeRO-3 for a looped model (training/zero3.py): one copy of the weights, each call's weights
released and each call's weight gradient reduced, the vocabulary matrices read one partition at a
time (never gathered whole), and the per-call linear's arithmetic."""

from collections import Counter
from types import SimpleNamespace

import deepspeed
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from looplm_mega.model import LoopLM, LoopLMConfig
from looplm_mega.parallel.build import build_model
from looplm_mega.parallel.state import initialize_parallel
from looplm_mega.training.deepspeed_engine import DeepSpeedEngine
from looplm_mega.training.optimizer import parameter_groups
from looplm_mega.training.zero3 import _LinearReducedPerCall, hand_gradients_to_zero3
from tests.distributed import run_distributed
from tests.training.runs import run_config


@pytest.mark.parametrize("autocast", [False, True])
def test_per_call_linear_gives_autograds_gradients_and_hands_off_the_weights(autocast):
    """The input's gradient goes back to autograd and the weight's to the hand-off, each equal to
    F.linear's under autograd, in fp32 and under bf16 autocast (the products in bf16 both ways)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(6, 8))
    grad_out = torch.randn(2, 5, 6)
    handed = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = _LinearReducedPerCall.apply(x, weight, lambda param, grad: handed.append((param, grad)))
        reference = F.linear(x, weight)
    assert y.dtype == reference.dtype
    torch.testing.assert_close(y, reference)
    (grad_x,) = torch.autograd.grad(y, x, grad_out.to(y.dtype))
    assert weight.grad is None and len(handed) == 1 and handed[0][0] is weight
    expected_x, expected_weight = torch.autograd.grad(reference, (x, weight), grad_out.to(reference.dtype))
    assert handed[0][1].dtype == weight.dtype and grad_x.dtype == x.dtype
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(handed[0][1], expected_weight, rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5)


def _zero3_one_weight_copy_and_release_after_every_loop(tmp: str) -> None:
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
    reduced = Counter()  # each handed weight's gradient reductions, counted as the backward hands them over
    reduce = engine.handed._reduce
    engine.handed._reduce = lambda param: (reduced.update([id(param)]), reduce(param))
    linears = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    vocabulary = [model.model.embed_tokens.weight, model.lm_head.weight]
    # The vocabulary matrices are read one data-parallel partition at a time, never gathered whole.
    partitioned, status_at_gathers = Counter(), []
    partition = engine.handed.partition
    engine.handed.partition = lambda param, grad: (partitioned.update([id(param)]), partition(param, grad))
    for module, weight in zip((model.model.embed_tokens, model.lm_head), vocabulary):
        slices = module.slices
        assert slices is not None and slices.count == 2 and slices.rows == weight.ds_shape[0] // 2
        slices.gather = lambda index, gather=slices.gather: (
            status_at_gathers.append(tuple(w.ds_status for w in vocabulary)), gather(index))[1]
    engine.configure(2, 2, 16, "stage1")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    for _ in range(2):  # the second step runs on DeepSpeed's recorded trace (and would prefetch by it)
        gathered_at_each_backward.clear()
        reduced.clear()
        engine.train_batch([batch, batch])
        # Each use of a layer in the backward (loops x layers x micro-batches of them) finds at most
        # its own weights gathered: the previous use has released its layer's.
        per_layer = len(list(layers[0].parameters()))
        assert len(gathered_at_each_backward) == 2 * len(layers) * run.model_config().total_ut_steps
        assert max(gathered_at_each_backward) <= per_layer, gathered_at_each_backward
        # Each call's weight gradient was reduced on its own (not summed over the loops first).
        assert [reduced[id(w)] for w in linears] == [2 * run.model_config().total_ut_steps] * len(linears)
        # The embedding's and the head's gradients go straight to this rank's partitions, once a
        # micro-batch (never through DeepSpeed's buckets), and ZeRO-3 never gathers either weight:
        # per micro-batch the embedding reads its two slices once, the head twice (its two passes).
        assert [reduced[id(w)] for w in vocabulary] == [0, 0]
        assert [partitioned[id(w)] for w in vocabulary] == [2, 2]
        unavailable = (ZeroParamStatus.NOT_AVAILABLE,) * 2
        assert status_at_gathers == [unavailable] * 2 * (2 + 4), status_at_gathers
        status_at_gathers.clear()
        partitioned.clear()
    dist.destroy_process_group()


def test_zero3_keeps_one_weight_copy_and_releases_and_reduces_after_each_call(tmp_path):
    run_distributed(_zero3_one_weight_copy_and_release_after_every_loop, 2, str(tmp_path), timeout=300)


@pytest.mark.parametrize("fused", [True, False])
def test_a_tied_vocabulary_weight_is_handed_over_only_if_no_backward_reads_it(fused):
    """The plain head's backward reads its weight (ZeRO-3 must gather it, and autograd accumulate
    its gradient), so an embedding tied to it keeps autograd's path too; the fused head and the
    embedding read none of it, and a tied weight is then handed over by both."""
    config = LoopLMConfig.from_preset("tiny").replace(tie_word_embeddings=True, fused_cross_entropy=fused)
    model = LoopLM(config)
    optimizer = SimpleNamespace(reduce_independent_p_g_buckets_and_remove_grads=None, partition_grads=None,
                                _DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads=None)
    handed = hand_gradients_to_zero3(optimizer, model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (id(model.lm_head.weight) in handed.handed) == fused
    assert [m.weight_hook is not None for m in (model.model.embed_tokens, model.lm_head)] == [fused, fused]
