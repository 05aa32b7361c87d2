"""Model FLOPs of a LoopLM, the numerator of every MFU figure in this project.

Counted per token, as matrix-multiply FLOPs (2 per multiply-add), for the forward pass:
- every loop applies every layer: q/k/v/o and the SwiGLU projections, plus attention scores and
  the weighted sum over values (2 * 2 * S * heads * head_dim per token, the full S x S square as
  Megatron and PaLM count it, whatever the causal kernel skips);
- every loop reads out through the head (2 * H * V) and the exit gate (2 * H);
- the embedding is a lookup (0 FLOPs).
Training = 3 x forward (backward is twice the forward). Recomputation by activation checkpointing
is not counted: MFU measures useful model work.
"""

from __future__ import annotations

from typing import Optional

from looplm_mega.model.config import LoopLMConfig


def forward_flops_per_token(config: LoopLMConfig, seq_len: int, num_loops: Optional[int] = None) -> float:
    steps = num_loops or config.total_ut_steps
    hidden, ffn = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    projections = 2 * hidden * (2 * q_dim + 2 * kv_dim) + 2 * 3 * hidden * ffn
    attention = 2 * 2 * seq_len * q_dim
    per_loop = config.num_hidden_layers * (projections + attention)
    readout = 2 * hidden * config.vocab_size + 2 * hidden
    return float(steps * (per_loop + readout))


def training_flops_per_token(config: LoopLMConfig, seq_len: int, num_loops: Optional[int] = None) -> float:
    return 3.0 * forward_flops_per_token(config, seq_len, num_loops)


# Dense peak FLOP/s per device from the vendors' data sheets (SXM parts, no sparsity), used for
# MFU when a run config does not set its own peak.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def device_peak_flops(device_name: str, dtype: str) -> float | None:
    """The data-sheet peak of a CUDA device by its name (torch.cuda.get_device_name), or None."""
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name.upper():
            return peaks.get(dtype)
    return None
