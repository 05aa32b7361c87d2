"""Causal attention with two backends, flash-attn (CUDA, fp16/bf16) and torch SDPA, and optional
document masking: no attention across end-of-document tokens (Megatron's reset-attention-mask).

The mask is described once per forward by an AttentionMask and reused by every layer and loop,
so the dense SDPA mask or flash-attn's cumulative sequence lengths are built only once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


# An optional extra (pip install .[gpu]). Imported with this module rather than at the first
# attention call: torch.compile cannot trace a failing import, and would run every layer eagerly.
try:
    import flash_attn as _flash_attn
except ImportError:
    _flash_attn = None


def flash_attn_module():
    """The flash_attn package, or None when it is not installed."""
    return _flash_attn


def segment_ids_from_eod(input_ids: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """Document index of every token [B, S]: a new document starts after each EOD token
    (the EOD token closes the document it ends)."""
    is_eod = (input_ids == eod_token_id).long()
    return torch.cumsum(is_eod, dim=1) - is_eod


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at the start of every document [B, S] (reset-position-ids)."""
    b, s = segment_ids.shape
    index = torch.arange(s, device=segment_ids.device).expand(b, s)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.cummax(torch.where(is_start, index, torch.zeros_like(index)), dim=1).values
    return index - start_index


@dataclass
class AttentionMask:
    """Causal attention, optionally restricted to tokens of the same document (segment); or,
    when decoding with a KV cache (queries fewer than keys, padded rows), an explicit mask."""

    segment_ids: Optional[torch.Tensor] = None  # [B, S] non-decreasing along S, or None
    allowed: Optional[torch.Tensor] = None  # [B, 1, S_query, S_key] boolean, or None
    _cache: dict = field(default_factory=dict, repr=False)

    def dense(self) -> torch.Tensor:
        """Boolean [B, 1, S, S] mask for SDPA: True where a query may attend to a key."""
        if self.allowed is not None:
            return self.allowed
        if "dense" not in self._cache:
            seg = self.segment_ids
            s = seg.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
            same_doc = seg.unsqueeze(2) == seg.unsqueeze(1)
            self._cache["dense"] = (causal & same_doc).unsqueeze(1)
        return self._cache["dense"]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """cu_seqlens (int32) and max_seqlen over the flattened batch for flash-attn's varlen kernel."""
        if "varlen" not in self._cache:
            seg = self.segment_ids
            b, s = seg.shape
            # Offset each row so that documents never merge across rows.
            global_ids = (seg - seg[:, :1] + torch.arange(b, device=seg.device).unsqueeze(1) * (s + 1)).flatten()
            _, counts = torch.unique_consecutive(global_ids, return_counts=True)
            cu = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
            self._cache["varlen"] = (cu, int(counts.max()))
        return self._cache["varlen"]


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "sdpa":
        return "sdpa"
    usable = flash_attn_module() is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash":
        if not usable:
            raise RuntimeError(
                "attention_backend='flash' needs the flash-attn package (pip install .[gpu]), a CUDA "
                f"device and fp16/bf16 activations; got device={q.device}, dtype={q.dtype}, "
                f"flash_attn installed={flash_attn_module() is not None}"
            )
        return "flash"
    return "flash" if usable else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str = "auto") -> torch.Tensor:
    """q: [B, S, Hq, D], k/v: [B, S_key, Hkv, D] (Hq a multiple of Hkv) -> [B, S, Hq, D]. An explicit
    mask (cached decoding) always goes through SDPA, whose CUDA kernels take arbitrary masks."""
    if mask.allowed is None and resolve_backend(backend, q) == "flash":
        return _flash(q, k, v, mask)
    return _sdpa(q, k, v, mask)


def _sdpa(q, k, v, mask: AttentionMask):
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask.segment_ids is None and mask.allowed is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
    return out.transpose(1, 2)


def _flash(q, k, v, mask: AttentionMask):
    fa = flash_attn_module()
    if mask.segment_ids is None:
        return fa.flash_attn_func(q, k, v, causal=True)
    b, s = q.shape[:2]
    cu, max_len = mask.varlen()
    out = fa.flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True,
    )
    return out.view(b, s, *out.shape[1:])
