"""Host memory per rank under ZeRO-3, measured by tools/benchmark_memory.py on gloo processes.

The model is shaped like the Ouro models (the layer stack holds most of the parameters: 14% of
ouro_1_4b is the embedding and head, 86% here) with the activation checkpointing their configs
use, so that what ZeRO-3 must hold is what dominates, as on a real run; with two loops, not
Ouro's four: a second loop is what needs each call's weights released and gradient reduced, and
the further loops cost time in gloo collectives, not memory (2026-12-04, DP 4, from build to
save: 110 s at four loops, 54 s at two; 1.41x and 1.38x; at DP 2 1.20x and 1.19x). The ceiling
is issue 18's target, 1.5x at DP 2 and 4, save included (README, "Memory per rank"); what holds it
there is what has been won (meta-device construction, each loop's weights released and each
call's weight gradient reduced, the vocabulary matrices read one partition at a time, no
whole-stack prefetch, freed memory returned, windowed checksums): losing the per-call reduction
alone puts DP 4 at 2.05x."""

import pytest

from tools.benchmark_memory import measure

SHAPE = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 16, "vocab_size": 8192,
         "num_attention_heads": 8, "num_key_value_heads": 8, "activation_checkpointing": "layer", "total_ut_steps": 2}
CEILING = 1.5


@pytest.mark.parametrize("processes", [2, 4])
def test_zero3_peak_memory_per_rank_against_what_zero3_must_hold(tmp_path, processes):
    result = measure("small", SHAPE, 3, processes, 2, tmp_path)
    full_model_mib = 4 * result["parameters"] / 2**20
    assert result["ratio"] <= CEILING, result
    # Before the engine exists a rank holds its partition, not the model: what the built phase adds
    # is DeepSpeed's own set-up (flat buffers, the gradient partitions), smaller than the model by
    # DP 4 and always below the training peak.
    assert result["built_mib"] < result["trained_mib"], result
    if processes == 4:
        assert result["built_mib"] - result["runtime_mib"] < 1.5 * full_model_mib, result
