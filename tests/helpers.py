import pytest
import torch

from looplm_mega.model import LoopLM, LoopLMConfig

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_config(**overrides) -> LoopLMConfig:
    """A model small enough for fp32 gradient comparisons in milliseconds."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                rope_theta=10000.0, total_ut_steps=3, cross_entropy_chunk_tokens=7)
    return LoopLMConfig(**{**base, **overrides})


def build_model(seed: int = 0, **overrides) -> LoopLM:
    torch.manual_seed(seed)
    model = LoopLM(tiny_config(**overrides))
    # Gate weights large enough that the exit distribution is far from uniform.
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 0.5)
        model.model.early_exit_gate.bias.fill_(-0.3)
    return model


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
