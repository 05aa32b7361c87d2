import pytest
import torch

from looplm_mega.inference.exit_rules import ExitRule
from looplm_mega.inference.generate import GenerationConfig, _run_chunk, generate, left_pad
from looplm_mega.inference.kv_cache import LoopKVCache
from looplm_mega.model.exit import exit_cdf
from tests.helpers import build_model

PROMPTS = [[5, 17, 3, 40, 2, 9], [11, 7], [60, 61, 62, 63]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(num_key_value_heads=2, sublayer_norm_init=1.0).eval()


def uncached_greedy(model, prompt, new_tokens, num_loops=None):
    """Recompute the whole sequence for every token and read out the last loop (no cache at all)."""
    ids, logits = list(prompt), []
    for _ in range(new_tokens):
        out = model(torch.tensor([ids]), num_loops=num_loops)
        logits.append(model.lm_head(out.hidden_states[-1][0, -1]))
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], logits


def test_cached_batched_decode_equals_the_uncached_forward_of_each_prompt(model):
    result = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6))
    for row, prompt in enumerate(PROMPTS):
        expected, _ = uncached_greedy(model, prompt, 6)
        assert result.tokens[row] == expected
        assert result.exit_loops[row] == [3] * 6
    assert result.loops_per_token == 3


def test_cached_logits_match_uncached_logits(model):
    prompt = PROMPTS[0]
    _, reference = uncached_greedy(model, prompt, 3)
    cache = LoopKVCache(model.config, 3, 1, len(prompt) + 3)
    ids, valid = left_pad([prompt])
    rows = torch.arange(1)
    logits, _ = _run_chunk(model, cache, ids, torch.arange(len(prompt)).unsqueeze(0), valid, rows, ExitRule(), skip=False)
    torch.testing.assert_close(logits[0], reference[0], rtol=1e-5, atol=1e-5)
    for i in range(1, 3):
        token = torch.tensor([[int(logits.argmax())]])
        logits, _ = _run_chunk(model, cache, token, torch.tensor([[len(prompt) + i - 1]]), torch.ones(1, 1, dtype=torch.bool),
                               rows, ExitRule(), skip=True)
        torch.testing.assert_close(logits[0], reference[i], rtol=1e-5, atol=1e-5)


def test_q_exit_with_threshold_one_is_the_full_depth_model(model):
    full = generate(model, PROMPTS, GenerationConfig(max_new_tokens=5))
    q_one = generate(model, PROMPTS, GenerationConfig(max_new_tokens=5, exit=ExitRule("q_exit", threshold=1.0)))
    assert q_one.tokens == full.tokens and q_one.exit_loops == full.exit_loops


def test_static_exit_reads_out_like_a_model_with_fewer_loops(model):
    static = generate(model, PROMPTS, GenerationConfig(max_new_tokens=5, exit=ExitRule("static", loops=2)))
    two_loops = generate(model, PROMPTS, GenerationConfig(max_new_tokens=5, num_loops=2))
    assert static.tokens == two_loops.tokens
    assert static.loops_per_token == 2


def test_q_exit_skips_loops_and_fills_the_skipped_cache_slots(model):
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cdf = exit_cdf(model(ids).gate_logits)[:, 0, -1]
    q = float(cdf[0]) + 1e-4  # the prompt's last token exits after step 2 or later ...
    rule = ExitRule("q_exit", threshold=q)
    config = GenerationConfig(max_new_tokens=8, exit=rule)
    result = generate(model, [prompt], config)
    steps = result.exit_loops[0]
    assert min(steps) < 3 and result.loops_per_token < 3  # ... and some new tokens exit early

    # Replay the decode with our own cache to look at what early-exited tokens left behind.
    cache = LoopKVCache(model.config, 3, 1, len(prompt) + 8)
    rows = torch.arange(1)
    _run_chunk(model, cache, ids, torch.arange(len(prompt)).unsqueeze(0), torch.ones_like(ids, dtype=torch.bool), rows, rule, False)
    for i, (token, step) in enumerate(zip(result.tokens[0][:-1], steps[1:])):
        position = len(prompt) + i
        _, exit_loop = _run_chunk(model, cache, torch.tensor([[token]]), torch.tensor([[position]]),
                                  torch.ones(1, 1, dtype=torch.bool), rows, rule, True)
        assert int(exit_loop) == step
        for later in range(step, 3):
            torch.testing.assert_close(cache.keys[later, :, 0, position], cache.keys[step - 1, :, 0, position], rtol=0, atol=0)
        assert cache.keys[step - 1, :, 0, position].abs().sum() > 0


def test_hidden_difference_exit(model):
    never = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, exit=ExitRule("hidden_diff", eps=0.0)))
    always = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, exit=ExitRule("hidden_diff", eps=1e9)))
    assert never.loops_per_token == 3
    assert always.loops_per_token == 2  # the first step with a previous state to compare to


@pytest.mark.parametrize("sharing", ["last", "mean", "first"])
def test_shared_kv_cache_is_a_full_cache_whose_past_steps_hold_the_shared_keys(model, sharing):
    """Decoding with a shared cache equals decoding with a full cache in which every step's
    entries of the earlier tokens were replaced by the last step's (or the mean over steps, or
    the first step's)."""
    prompt, T = PROMPTS[0], 3
    ids, valid = left_pad([prompt])
    positions, rows = torch.arange(len(prompt)).unsqueeze(0), torch.arange(1)
    shared = LoopKVCache(model.config, T, 1, len(prompt) + 1, sharing)
    full = LoopKVCache(model.config, T, 1, len(prompt) + 1, "full")
    for cache in (shared, full):
        logits, _ = _run_chunk(model, cache, ids, positions, valid, rows, ExitRule(), skip=False)
    for store in (full.keys, full.values):
        replacement = {"last": store[-1], "mean": store.mean(dim=0), "first": store[0]}[sharing]
        store[:] = replacement.unsqueeze(0)
    torch.testing.assert_close(shared.keys[0], full.keys[0], rtol=1e-6, atol=1e-6)
    token = torch.tensor([[int(logits.argmax())]])
    outputs = [_run_chunk(model, cache, token, torch.tensor([[len(prompt)]]), torch.ones(1, 1, dtype=torch.bool), rows,
                          ExitRule(), skip=True)[0] for cache in (shared, full)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert shared.nbytes() * T == full.nbytes()


def test_shared_caches_generate_and_use_one_loop_of_memory(model):
    full = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4))
    for sharing in ("last", "mean", "first"):
        result = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, kv_sharing=sharing))
        assert result.cache_bytes * 3 == full.cache_bytes
        assert [len(t) for t in result.tokens] == [4, 4, 4]


def test_eos_and_stop_callback_end_a_sequence_and_streaming_sees_every_token(model):
    reference = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6))
    eos = reference.tokens[1][2]
    streamed = []
    result = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, eos_token_id=eos),
                      should_stop=lambda row, new: row == 2 and len(new) == 1, on_token=lambda row, t: streamed.append((row, t)))
    assert result.tokens[1] == reference.tokens[1][: reference.tokens[1].index(eos) + 1]
    assert result.tokens[2] == reference.tokens[2][:1]
    assert result.tokens[0] == reference.tokens[0][: len(result.tokens[0])]
    assert sorted(streamed) == sorted((row, t) for row, toks in enumerate(result.tokens) for t in toks)


def test_sampling_is_seeded(model):
    config = dict(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, PROMPTS, GenerationConfig(**config, seed=1))
    b = generate(model, PROMPTS, GenerationConfig(**config, seed=1))
    assert a.tokens == b.tokens


def test_bad_generation_settings_name_the_value(model):
    with pytest.raises(ValueError, match="static exit at 4 loops"):
        generate(model, PROMPTS, GenerationConfig(exit=ExitRule("static", loops=4)))
    with pytest.raises(ValueError, match="kv_sharing='half'"):
        generate(model, PROMPTS, GenerationConfig(kv_sharing="half"))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], GenerationConfig())
