import pytest
import torch
import torch.nn.functional as F

from looplm_mega.model import LoopLM
from looplm_mega.model.attention import AttentionMask, segment_ids_from_eod
from looplm_mega.model.exit import exit_log_probs
from looplm_mega.model.losses import objective_terms

from tests.helpers import build_model, grads, tiny_config

EOD = 0


def _ids(batch=2, seq=16, seed=1):
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_distribution():
    model = build_model()
    ids = _ids()
    out = model(ids, labels=ids)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 16, 32)
    assert out.exit_gates.shape == out.exit_probs.shape == (3, 2, 16)
    torch.testing.assert_close(out.exit_probs.sum(0), torch.ones(2, 16))
    assert out.ce_per_loop.shape == (3,) and out.loss.ndim == 0
    assert model(ids, num_loops=5).exit_probs.shape == (5, 2, 16)


def test_state_dict_names_are_the_released_names():
    model = build_model()
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "input_layernorm_2",
             "post_attention_layernorm", "post_attention_layernorm_2"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.weight",
                "model.early_exit_gate.bias", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{name}.weight" for i in range(2) for name in layer}
    state = model.state_dict()
    assert set(state) == expected
    assert state["model.early_exit_gate.weight"].shape == (1, 32) and state["model.early_exit_gate.bias"].shape == (1,)


def test_causality():
    model = build_model()
    ids = _ids()
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 5) % 97
    a, b = model(ids), model(changed)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha[:, :9], hb[:, :9], rtol=0, atol=0)
        assert not torch.allclose(ha[:, 9:], hb[:, 9:])
    torch.testing.assert_close(a.exit_probs[:, :, :9], b.exit_probs[:, :, :9], rtol=0, atol=0)


def test_one_loop_is_a_plain_causal_lm():
    model = build_model()
    ids = _ids()
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    out = model(ids, labels=labels, num_loops=1)
    out.loss.backward()
    got = grads(model)
    model.zero_grad()

    # The same network written as an ordinary transformer LM.
    x = model.model.embed_tokens(ids)
    rope = model.model.rotary_emb(torch.arange(16).expand(2, 16))
    for layer in model.model.layers:
        x = layer(x, rope, AttentionMask())
    logits = model.lm_head(model.model.norm(x))
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.exit_probs, torch.ones(1, 2, 16))
    want = grads(model)
    assert set(got) == set(want)  # with one loop the gate decides nothing: no gradient
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_equals_mha_with_repeated_kv():
    gqa = build_model(num_key_value_heads=2)
    mha = build_model(num_key_value_heads=4)
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[key].view(2, 8, 32)  # [kv_heads, head_dim, hidden]
            state[key] = heads.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = _ids()
    for a, b in zip(gqa(ids).hidden_states, mha(ids).hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)


def test_document_masking_equals_running_each_document_alone():
    model = build_model()
    docs = [_ids(1, 5, seed=2), _ids(1, 7, seed=3), _ids(1, 4, seed=4)]
    for d in docs[:-1]:
        d[0, -1] = EOD  # each document but the last ends with EOD
    packed = torch.cat(docs, dim=1)
    segments = segment_ids_from_eod(packed, EOD)
    assert segments.tolist() == [[0] * 5 + [1] * 7 + [2] * 4]
    out = model(packed, segment_ids=segments)
    start = 0
    for doc in docs:
        alone = model(doc)
        end = start + doc.shape[1]
        for packed_h, alone_h in zip(out.hidden_states, alone.hidden_states):
            torch.testing.assert_close(packed_h[:, start:end], alone_h, rtol=1e-5, atol=1e-5)
        start = end


@pytest.mark.parametrize("mode", ["layer", "loop"])
def test_activation_checkpointing_gives_equal_gradients(mode):
    ids = _ids()
    results = []
    for checkpointing in ("none", mode):
        model = build_model(activation_checkpointing=checkpointing)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss, grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-6, atol=1e-7)


def test_truncated_loops_backpropagate_through_the_last_k_only():
    ids = _ids()
    full = build_model()
    truncated = build_model(truncated_loops=1)
    out_full, out_trunc = full(ids, labels=ids), truncated(ids, labels=ids)
    torch.testing.assert_close(out_full.loss, out_trunc.loss)
    out_trunc.loss.backward()
    assert truncated.model.embed_tokens.weight.grad is None  # loop 1 had no graph
    layer_grad = truncated.model.layers[0].mlp.up_proj.weight.grad
    assert layer_grad is not None and layer_grad.abs().sum() > 0
    # Equal to a loss whose inputs to the last loop were detached by hand.
    model = build_model()
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        rope = model.model.rotary_emb(torch.arange(16).expand(2, 16))
        states = []
        for loop in range(2):
            x = model._stack(x, rope, AttentionMask())
            states.append(x)
    states.append(model._stack(x, rope, AttentionMask()))
    gates = torch.stack([model.model.early_exit_gate(h).squeeze(-1) for h in states]).flatten(1)
    objective_terms("stage1", torch.stack(states).flatten(1, 2), gates, exit_log_probs(gates), ids.flatten(), model.lm_head,
                    0, 3, beta=0.1).loss.backward()
    torch.testing.assert_close(layer_grad, model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-5, atol=1e-7)


def test_set_rope_theta_on_a_live_model():
    model = build_model()
    ids = _ids()
    before = model(ids).hidden_states[-1]
    model.set_rope_theta(40000.0)
    after = model(ids).hidden_states[-1]
    assert not torch.allclose(before, after)
    fresh = LoopLM(tiny_config(rope_theta=40000.0))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids).hidden_states[-1], after, rtol=0, atol=0)
    assert model.config.rope_theta == 40000.0


def test_fewer_loops_are_a_prefix_of_more_loops():
    model = build_model()
    ids = _ids()
    short, long = model(ids, num_loops=2), model(ids, num_loops=5)
    for a, b in zip(short.hidden_states, long.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tied_embeddings_share_one_tensor():
    tied = build_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.num_parameters() == build_model().num_parameters() - 97 * 32
    ids = _ids()
    tied(ids, labels=ids).loss.backward()
    assert tied.model.embed_tokens.weight.grad is not None


def test_fused_and_naive_model_losses_and_gradients_agree():
    ids = _ids()
    results = []
    for fused in (True, False):
        model = build_model(fused_cross_entropy=fused)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss, out.ce_per_loop, grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    for name, g in results[1][2].items():
        torch.testing.assert_close(results[0][2][name], g, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward_is_close_to_fp32():
    model = build_model()
    ids = _ids()
    reference = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids, labels=ids)
    mixed.loss.backward()
    torch.testing.assert_close(mixed.loss, reference, rtol=2e-2, atol=2e-2)


def test_sublayer_output_norms_start_small_and_the_others_at_one():
    model = LoopLM(tiny_config(sublayer_norm_init=0.05))
    layer = model.model.layers[0]
    assert torch.all(layer.input_layernorm_2.weight == 0.05) and torch.all(layer.post_attention_layernorm_2.weight == 0.05)
    assert torch.all(layer.input_layernorm.weight == 1.0) and torch.all(model.model.norm.weight == 1.0)
