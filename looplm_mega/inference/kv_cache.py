"""The KV cache of a looped model: keys and values per loop step and layer, for a batch of
left-padded sequences, preallocated to the longest sequence the generation can reach.

Sharing (the paper's decode-time KV sharing; the prompt is always processed with full per-step
attention, since sharing during prefill costs accuracy):

    full   one slot per (loop step, layer): step t of a new token attends to step t's keys
    last   one slot per layer: every step attends to the keys of the last step each earlier token ran
    mean   one slot per layer: ... to the mean of the keys over the steps each earlier token ran
    first  one slot per layer: ... to the keys of the first step (the paper's negative control,
           Table 14: GSM8K 18.73 where the others keep about 78.8)

so the shared variants hold 1/T of the full cache. Within the token being decoded, step t always
attends to its own step-t key.

A chunk of tokens (the prompt, or one new token per sequence) is written in three moves: the
model's attention calls `KVCacheSlot.extend` for each layer and step it runs; `exit` marks rows
that leave the loop early (full: the skipped steps' slots get a copy of the exit step's keys, so
later tokens have something to attend to at every step); `commit` closes the chunk.
"""

from __future__ import annotations

from typing import Literal

import torch

from looplm_mega.model.config import LoopLMConfig

KVSharing = Literal["full", "last", "mean", "first"]
SHARING_MODES = ("full", "last", "mean", "first")


class LoopKVCache:
    def __init__(self, config: LoopLMConfig, num_loops: int, batch: int, max_length: int, sharing: KVSharing = "full",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if sharing not in SHARING_MODES:
            raise ValueError(f"kv_sharing={sharing!r}: expected one of {SHARING_MODES}")
        self.sharing, self.num_loops = sharing, num_loops
        slots = num_loops if sharing == "full" else 1
        shape = (slots, config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)  # False: padding, or not yet written
        self.length = 0  # positions [0, length) are committed
        self._chunk = 0  # length of the open chunk
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared modes: layer -> keys, values
        self._steps_run = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def open_chunk(self, valid: torch.Tensor) -> None:
        """Start writing positions [length, length + q); valid [B, q] marks the real tokens."""
        q = valid.shape[1]
        if self.length + q > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {self.length} used, {q} more asked")
        self._chunk = q
        self.valid[:, self.length:self.length + q] = valid
        self._pending.clear()
        self._steps_run.zero_()

    def mask(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, 1, q, length + q] boolean: causal over the cache and the open chunk, no padding keys.
        A padding query may see itself, so that no row of the softmax is empty."""
        start, q = self.length, self._chunk
        keys = torch.arange(start + q, device=self.valid.device)
        queries = torch.arange(start, start + q, device=self.valid.device).unsqueeze(1)
        allowed = (keys <= queries) & self.valid[rows, None, : start + q]
        return (allowed | (keys == queries)).unsqueeze(1)

    def slot(self, step: int, layer: int, rows: torch.Tensor) -> "KVCacheSlot":
        return KVCacheSlot(self, step, layer, rows)

    def exit(self, rows: torch.Tensor, step: int) -> None:
        """Rows that stop after `step` (0-based): fill their skipped steps' slots (full sharing)."""
        self._steps_run[rows] = step + 1
        if self.sharing == "full" and step + 1 < self.num_loops:
            span = slice(self.length, self.length + self._chunk)
            for store in (self.keys, self.values):
                store[step + 1:][:, :, rows, span] = store[step][:, rows, span].unsqueeze(0)

    def commit(self) -> None:
        """Close the chunk; the shared modes write their slot from the steps each row ran."""
        span = slice(self.length, self.length + self._chunk)
        if self.sharing != "full":
            runs = self._steps_run.clamp(min=1).view(-1, 1, 1, 1).to(self.keys.dtype)
            for layer, (k, v) in self._pending.items():
                if self.sharing == "mean":
                    k, v = k / runs, v / runs
                self.keys[0, layer, :, span], self.values[0, layer, :, span] = k, v
        self.length += self._chunk
        self._chunk = 0
        self._pending.clear()

    def _record(self, step: int, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys of the open chunk; return the keys to attend to."""
        start, end = self.length, self.length + self._chunk
        if self.sharing == "full":
            keys, values = self.keys[step, layer], self.values[step, layer]  # views [B, max_length, Hkv, D]
            keys[rows, start:end], values[rows, start:end] = k, v
            return keys[rows, :end], values[rows, :end]
        if layer not in self._pending:
            self._pending[layer] = (torch.zeros_like(self.keys[0, layer, :, start:end]),
                                    torch.zeros_like(self.values[0, layer, :, start:end]))
        pending_k, pending_v = self._pending[layer]
        if self.sharing == "mean":
            pending_k[rows] += k
            pending_v[rows] += v
        elif self.sharing == "last" or step == 0:  # every row runs step 0: "first" keeps it
            pending_k[rows], pending_v[rows] = k, v
        past_k, past_v = self.keys[0, layer][rows, :start], self.values[0, layer][rows, :start]
        return torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)


class KVCacheSlot:
    """What one layer's attention sees at one loop step: the cache of the rows being computed."""

    def __init__(self, cache: LoopKVCache, step: int, layer: int, rows: torch.Tensor):
        self.cache, self.step, self.layer, self.rows = cache, step, layer, rows

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [R, q, Hkv, D] of the open chunk -> the keys and values to attend to [R, length + q, Hkv, D]."""
        return self.cache._record(self.step, self.layer, self.rows, k, v)
