"""Tensor parallelism against the single-device model: two gloo processes each hold a TP=2 shard
and, as the reference, the whole TP=1 model built from the same seed."""

import pytest
import torch
import torch.distributed as dist

from looplm_mega.config import ConfigError
from looplm_mega.model import LoopLM
from looplm_mega.model.attention import segment_ids_from_eod
from looplm_mega.parallel.build import build_model
from looplm_mega.parallel.state import check_parallel_sizes, initialize_parallel
from looplm_mega.parallel.tensor_parallel import (
    TensorParallel, check_tensor_parallel, global_grad_norm, merge, padded_vocab_size, partition_dim, shard,
)

from looplm_mega.training.model_dir import RankWeights, read_full_state, write_model_dir

from tests.distributed import run_distributed
from tests.helpers import tiny_config


def _gather_full(name: str, tensor: torch.Tensor, tp: TensorParallel, vocab_size: int) -> torch.Tensor:
    if partition_dim(name) is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp.size)]
    dist.all_gather(parts, tensor.contiguous(), group=tp.group)
    return merge(parts, name, vocab_size)


def _train_side_by_side(sequence_parallel: bool, objective: str) -> None:
    """Three AdamW steps of the TP=2 model and of the TP=1 model on the same batches: the losses,
    the gathered gradients and the gathered weights agree to 1e-5."""
    dist.init_process_group("gloo")
    state = initialize_parallel(tp=2, sequence_parallel=sequence_parallel)
    tp = TensorParallel.from_state(state)
    # GQA with kv heads split across TP, a vocabulary that needs padding (97 -> 256 rows at TP=2).
    config = tiny_config(num_key_value_heads=2, vocab_size=97, cross_entropy_chunk_tokens=5)
    torch.manual_seed(0)
    reference = LoopLM(config)
    torch.manual_seed(0)
    sharded = LoopLM(config, tp)
    assert sharded.model.embed_tokens.weight.shape[0] == padded_vocab_size(97, 2, 128) // 2 == 128
    assert sharded.model.layers[0].self_attn.k_proj.weight.shape[0] == 2 * config.head_dim // 2
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (reference, sharded)]
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.randint(0, 97, (2, 12), generator=generator)
        ids[:, 5] = 0  # an end of document in every row: document masking across TP
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        outputs = [m(ids, labels=labels, segment_ids=segment_ids_from_eod(ids, 0), objective=objective)
                   for m in (reference, sharded)]
        for out in outputs:
            out.loss.backward()
        torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs[1].ce_per_loop, outputs[0].ce_per_loop, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs[1].exit_probs, outputs[0].exit_probs, rtol=1e-5, atol=1e-6)
        ref_params = dict(reference.named_parameters())
        for name, param in sharded.named_parameters():
            if param.grad is None:  # stage2 trains the gate alone
                assert ref_params[name].grad is None and objective == "stage2" and "early_exit_gate" not in name, name
                continue
            grad = _gather_full(name, param.grad, tp, 97)
            expected = ref_params[name].grad
            expected = expected[:97] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else expected
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=f"step {step}: gradient of {name}")
            if partition_dim(name) is None:  # replicated: the same gradient on both ranks
                other = param.grad.clone()
                dist.broadcast(other, src=0, group=tp.group)
                assert torch.equal(other, param.grad), name
        norms = [global_grad_norm(list(m.parameters()), t) for m, t in ((reference, TensorParallel()), (sharded, tp))]
        assert abs(norms[0] - norms[1]) < 1e-5 * norms[0]
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    full = {n: _gather_full(n, p.detach(), tp, 97) for n, p in sharded.named_parameters()}
    for name, param in reference.named_parameters():
        expected = param[:97] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else param
        # Adam divides by sqrt(v): where a gradient is ~0 its 1e-7 rounding differences move a weight
        # by a good fraction of lr, hence the looser bound on the weights than on losses and gradients.
        torch.testing.assert_close(full[name], expected, rtol=0, atol=2e-4, msg=name)
    dist.destroy_process_group()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_tp2_trains_like_tp1(sequence_parallel):
    run_distributed(_train_side_by_side, 2, sequence_parallel, "stage1", timeout=300)


def test_tp2_stage2_gate_objective_like_tp1():
    run_distributed(_train_side_by_side, 2, True, "stage2", timeout=300)


def _load_and_infer(model_dir: str) -> None:
    """A model directory written whole and split in two loads into TP=2 shards either way (the
    split one rank by rank); the logits are the full vocabulary's, as at TP=1."""
    dist.init_process_group("gloo")
    tp = TensorParallel.from_state(initialize_parallel(tp=2))
    config = tiny_config(vocab_size=97)
    torch.manual_seed(0)
    reference = LoopLM(config)
    full = {n: t[:97] if n.endswith(("embed_tokens.weight", "lm_head.weight")) else t for n, t in reference.state_dict().items()}
    if dist.get_rank() == 0:
        write_model_dir(f"{model_dir}/whole", full, config)
        write_model_dir(f"{model_dir}/split", full, config, tp=2)
    dist.barrier()
    whole, split = (RankWeights(f"{model_dir}/{name}", tp.rank, 2, config) for name in ("whole", "split"))
    assert split.own and not whole.own  # the split directory's own file is read as it is
    from_whole, from_split = (build_model(config, tp=tp, weights=weights) for weights in (whole, split))
    assert torch.equal(read_full_state(f"{model_dir}/split")["lm_head.weight"], full["lm_head.weight"])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits = [m.lm_head(m(ids).hidden_states[-1]) for m in (reference, from_whole, from_split)]
    assert logits[1].shape == (2, 9, 97)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[2], logits[0], rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


def test_model_directories_load_into_tp2_and_give_full_vocabulary_logits(tmp_path):
    run_distributed(_load_and_infer, 2, str(tmp_path), timeout=300)


def test_shard_and_merge_are_inverse_with_vocabulary_padding():
    full = torch.randn(97, 8)
    shards = [shard(full, "lm_head.weight", r, 2, padded_vocab=256) for r in range(2)]
    assert [s.shape[0] for s in shards] == [128, 128]
    assert torch.count_nonzero(shards[1][97 - 128:]) == 0  # the padding rows are zero
    assert torch.equal(merge(shards, "lm_head.weight", 97), full)
    o_proj = torch.randn(8, 6)
    parts = [shard(o_proj, "model.layers.1.self_attn.o_proj.weight", r, 2) for r in range(2)]
    assert parts[0].shape == (8, 3)
    assert torch.equal(merge(parts, "model.layers.1.self_attn.o_proj.weight"), o_proj)
    assert partition_dim("model.layers.0.mlp.gate_proj.weight") == 0
    assert partition_dim("model.layers.0.input_layernorm_2.weight") is None
    assert partition_dim("model.early_exit_gate.bias") is None


def test_padded_vocabulary_is_a_multiple_of_128_times_tp():
    assert padded_vocab_size(49152, 8, 128) == 49152
    assert padded_vocab_size(50257, 1, 128) == 50304
    assert padded_vocab_size(50257, 4, 128) == 50688


def test_sizes_that_do_not_divide_are_config_errors():
    with pytest.raises(ConfigError, match=r"parallel.tp=3 must divide num_attention_heads=4, num_key_value_heads=4"):
        check_tensor_parallel(tiny_config(), 3)
    with pytest.raises(ConfigError, match=r"intermediate_size=66"):
        check_tensor_parallel(tiny_config(intermediate_size=66), 4)
    with pytest.raises(ConfigError, match=r"seq_length=9 divisible by parallel.tp=2"):
        check_tensor_parallel(tiny_config(), 2, seq_length=9, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"parallel.tp=2 x parallel.pp=2 = 4 does not divide the world of 6"):
        check_parallel_sizes(6, 2, 2)
    assert check_parallel_sizes(8, 2, 2) == 2
