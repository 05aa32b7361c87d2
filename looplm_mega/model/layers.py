"""The building blocks of one LoopLM layer: RMSNorm, rotary embeddings, attention, SwiGLU MLP,
and the four-norm "sandwich" decoder layer of the released Ouro models.

Every block takes a TensorParallel (parallel.tensor_parallel): with TP > 1 the projections hold
this rank's shard (column-parallel q/k/v, gate, up; row-parallel o, down) and the block wraps them
in one collective on the way in and one on the way out. With TP = 1 those are the identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from looplm_mega.model.attention import AttentionMask, attention
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.parallel.tensor_parallel import TensorParallel

if TYPE_CHECKING:
    from looplm_mega.inference.kv_cache import KVCacheSlot

SINGLE = TensorParallel()


def mark_tensor_parallel(linear: nn.Module, dim: int, tp: TensorParallel) -> None:
    """Tag a split weight the way DeepSpeed and Megatron do, so that ZeRO's gradient norm sums
    its square over the TP group instead of counting it once."""
    if tp.enabled:
        linear.weight.tensor_model_parallel = True
        linear.weight.partition_dim = dim


def _split(n: int, tp: TensorParallel) -> int:
    return n // tp.size


class RMSNorm(nn.Module):
    """RMSNorm through torch's fused kernel (statistics in fp32 for low-precision inputs); the
    weight is applied inside the kernel, so autograd keeps only the input, not a second copy."""

    def __init__(self, dim: int, eps: float, tp: TensorParallel = SINGLE):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.tp.replicated_weight(self.weight).to(x.dtype), self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE. The base can change on a live model (RoPE annealing between stages);
    inv_freq is a non-persistent buffer so the state dict keeps the released names only."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", self._inv_freq(theta), persistent=False)
        self.theta = theta

    def _inv_freq(self, theta: float, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        return (1.0 / theta**exponents).float()

    def materialize(self) -> None:
        """The buffer of a model built on the meta device (parallel/build.py), on the host."""
        if self.inv_freq.is_meta:
            self.inv_freq = self._inv_freq(self.theta)

    def set_theta(self, theta: float) -> None:
        self.theta = theta
        self.inv_freq.copy_(self._inv_freq(theta, self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, S, head_dim] in fp32 for integer positions [B, S]."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, D]; cos/sin: [B, S, D]. Rotation in fp32, result in x's dtype."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; under TP each rank owns num_heads / TP query heads and
    num_kv_heads / TP key/value heads (column-parallel q/k/v, row-parallel o)."""

    def __init__(self, config: LoopLMConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.num_heads = _split(config.num_attention_heads, tp)
        self.num_kv_heads = _split(config.num_key_value_heads, tp)
        self.head_dim = config.head_dim
        self.backend = config.attention_backend
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        for column in (self.q_proj, self.k_proj, self.v_proj):
            mark_tensor_parallel(column, 0, tp)
        mark_tensor_parallel(self.o_proj, 1, tp)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: Optional["KVCacheSlot"] = None) -> torch.Tensor:
        """With a cache (decoding: inference.kv_cache), this call's keys and values are stored in it
        and the queries attend to everything it holds for this layer and loop step."""
        x = self.tp.enter(x)
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attention(q, k, v, mask, backend=self.backend)
        return self.tp.exit(self.o_proj(out.reshape(b, s, -1)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); under TP each rank owns intermediate_size / TP of the hidden units."""

    def __init__(self, config: LoopLMConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        intermediate = _split(config.intermediate_size, tp)
        self.gate_proj = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, config.hidden_size, bias=False)
        mark_tensor_parallel(self.gate_proj, 0, tp)
        mark_tensor_parallel(self.up_proj, 0, tp)
        mark_tensor_parallel(self.down_proj, 1, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)
        return self.tp.exit(self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x))))


class _SiluMul(torch.autograd.Function):
    """silu(a) * b that keeps only a and b for the backward and recomputes silu there. Autograd
    of the plain expression keeps four [tokens, intermediate] tensors per layer and loop, the
    largest activations of the model (Liger-Kernel's SwiGLU does the same on GPU in Triton)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a.float())
        silu = a.float() * sig
        grad_b = grad.float() * silu
        grad_a = grad.float() * b.float() * sig * (1 + a.float() * (1 - sig))
        return grad_a.to(a.dtype), grad_b.to(b.dtype)


class DecoderLayer(nn.Module):
    """h = x + norm2(attn(norm1(x))); out = h + norm4(mlp(norm3(h)))  (Ouro's sandwich layer)."""

    def __init__(self, config: LoopLMConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = Attention(config, tp)
        self.mlp = SwiGLU(config, tp)
        self.input_layernorm = RMSNorm(hidden, eps, tp)
        self.input_layernorm_2 = RMSNorm(hidden, eps, tp)
        self.post_attention_layernorm = RMSNorm(hidden, eps, tp)
        self.post_attention_layernorm_2 = RMSNorm(hidden, eps, tp)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: Optional["KVCacheSlot"] = None) -> torch.Tensor:
        h = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
