"""Generation with a per-loop KV cache and per-token early exit.

Each new token runs the shared stack loop by loop; after each loop its exit rule is checked, and
a token that exits skips the remaining loops (its rows leave the batch for them) and is read out
from the loop it exited at. The prompt runs every loop (prefill), and its last position's read-out
loop is chosen by the same rule.

The exit rules are those of inference.exit_rules; a static exit at loop k gives the tokens of the
model run with num_loops = k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from looplm_mega.inference.exit_rules import ExitRule, ExitTracker
from looplm_mega.inference.kv_cache import KVSharing, LoopKVCache
from looplm_mega.inference.sampling import sample_next
from looplm_mega.model import LoopLM
from looplm_mega.model.attention import AttentionMask


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    eos_token_id: Optional[int] = None
    num_loops: Optional[int] = None  # loop count T (default: the model's)
    kv_sharing: KVSharing = "full"
    exit: ExitRule = field(default_factory=ExitRule)
    seed: int = 0


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each sequence (up to and including EOS)
    exit_loops: list[list[int]]  # the loop each new token was read out at (1-based)
    seconds: float
    cache_bytes: int

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def loops_per_token(self) -> float:
        loops = [loop for row in self.exit_loops for loop in row]
        return sum(loops) / max(1, len(loops))

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


@torch.inference_mode()
def _run_chunk(model: LoopLM, cache: LoopKVCache, input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
               rows: torch.Tensor, rule: ExitRule, skip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run tokens [R, q] of `rows` through the loops (LoopLM.loop_step, one loop at a time); the
    logits of each row's last position at its exit loop [R, V] and that loop (1-based) [R].
    skip=False (prefill) runs every loop for every row and only picks the read-out loop."""
    num_loops = cache.num_loops
    cache.open_chunk(valid)
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.model.rotary_emb(positions)
    tracker = ExitTracker(rule, num_loops)
    logits = torch.empty(len(rows), model.config.vocab_size, dtype=x.dtype, device=x.device)
    exit_loop = torch.zeros(len(rows), dtype=torch.long, device=x.device)
    looping = torch.arange(len(rows), device=x.device)  # indices into `rows` still running
    for loop in range(num_loops):
        batch_rows = rows[looping]
        caches = [cache.slot(loop, layer, batch_rows) for layer in range(model.config.num_hidden_layers)]
        x, gate_logits = model.loop_step(x, loop, num_loops, (cos, sin), AttentionMask(allowed=cache.mask(batch_rows)), caches)
        last = x[:, -1]
        stop = tracker.exits(loop, gate_logits[:, -1], last)
        stop &= exit_loop[looping] == 0  # without skipping, a row keeps looping after its exit
        if stop.any():
            leaving = looping[stop]
            logits[leaving] = model.lm_head(last[stop])
            exit_loop[leaving] = loop + 1
            if skip:
                cache.exit(rows[leaving], loop)
        if skip and not stop.all():
            going_on = (~stop).nonzero().squeeze(1)
            looping, x, cos, sin = looping[going_on], x[going_on], cos[going_on], sin[going_on]
            tracker.keep(going_on)
        elif skip:
            break
    if not skip:
        cache.exit(rows, num_loops - 1)  # every row ran every loop
    cache.commit()
    return logits, exit_loop


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, S] with the prompts right-aligned, and the mask of real tokens [B, S]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return ids, valid


def generate(model: LoopLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             should_stop: Optional[Callable[[int, list[int]], bool]] = None,
             on_token: Optional[Callable[[int, int], None]] = None) -> GenerationResult:
    """Continue each prompt (token ids) by up to max_new_tokens. A sequence ends at EOS or when
    should_stop(row, new_tokens) says so (stop strings); on_token(row, token) streams."""
    if model.tp.enabled:
        raise ValueError("generation runs on one process: load the model at TP = 1 (inference.loading.load_model)")
    num_loops = config.num_loops or model.config.total_ut_steps
    config.exit.check(num_loops)
    device = next(model.parameters()).device
    ids, valid = left_pad(prompts)
    ids, valid = ids.to(device), valid.to(device)
    batch, width = ids.shape
    cache = LoopKVCache(model.config, num_loops, batch, width + config.max_new_tokens, config.kv_sharing,
                        dtype=next(model.parameters()).dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    exit_loops: list[list[int]] = [[] for _ in range(batch)]
    start = time.perf_counter()

    rows = torch.arange(batch, device=device)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    logits, loops = _run_chunk(model, cache, ids, positions, valid, rows, config.exit, skip=False)
    next_position = positions[:, -1] + 1
    for produced in range(1, config.max_new_tokens + 1):
        chosen = sample_next(logits, config.temperature, config.top_k, config.top_p, generator)
        going_on = []
        for i, (row, token, loop) in enumerate(zip(rows.tolist(), chosen.tolist(), loops.tolist())):
            tokens[row].append(token)
            exit_loops[row].append(loop)
            if on_token is not None:
                on_token(row, token)
            ended = token == config.eos_token_id or (should_stop is not None and should_stop(row, tokens[row]))
            if not ended:
                going_on.append(i)
        if not going_on or produced == config.max_new_tokens:
            break
        keep = torch.tensor(going_on, device=device)
        rows, chosen = rows[keep], chosen[keep]
        new_valid = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        new_valid[rows] = True
        logits, loops = _run_chunk(model, cache, chosen.unsqueeze(1), next_position[rows].unsqueeze(1), new_valid,
                                   rows, config.exit, skip=True)
        next_position[rows] += 1
    return GenerationResult(tokens, exit_loops, time.perf_counter() - start, cache.nbytes())
