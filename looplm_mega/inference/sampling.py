"""Choosing the next token from the logits: greedy, or sampling with temperature, top-k and top-p
(nucleus). Written here rather than taken from transformers' logits processors: it is a few lines,
and transformers is not a dependency of the project."""

from __future__ import annotations

from typing import Optional

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [B, V] with the tokens outside the top k, and outside the smallest set whose
    probability reaches top_p, set to -inf (the most likely token always stays)."""
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k={top_k}, top_p={top_p}: expected top_k >= 0 and 0 < top_p <= 1")
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row of logits [B, V]; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (filter_logits(logits, top_k, top_p) / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
