import torch
from torch.utils.flop_counter import FlopCounterMode

from looplm_mega.model.flops import forward_flops_per_token, training_flops_per_token

from tests.helpers import build_model


def test_flop_count_matches_the_executed_matmuls():
    """Every matmul of a forward and backward is counted; SDPA is added analytically because
    the counter does not see torch's CPU attention kernel."""
    # No vocabulary padding: the padded head columns run but are not model FLOPs.
    model = build_model(fused_cross_entropy=False, num_key_value_heads=2, make_vocab_size_divisible_by=1)
    config, (batch, seq) = model.config, (2, 24)
    ids = torch.randint(0, 97, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, labels=ids)
    attention = config.total_ut_steps * config.num_hidden_layers * 4 * seq * config.num_attention_heads * config.head_dim
    tokens = batch * seq
    forward = counter.get_total_flops() + attention * tokens
    assert forward == forward_flops_per_token(config, seq) * tokens
    with FlopCounterMode(display=False) as counter:
        out.loss.backward()
    # The backward of the embedding lookup is no matmul; everything else costs twice the forward.
    assert counter.get_total_flops() + 2 * attention * tokens == 2 * forward
    assert training_flops_per_token(config, seq) == 3 * forward_flops_per_token(config, seq)


def test_more_loops_cost_proportionally_more():
    config = build_model().config
    assert forward_flops_per_token(config, 128, num_loops=6) == 2 * forward_flops_per_token(config, 128, num_loops=3)
