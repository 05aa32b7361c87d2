"""The building blocks of one LoopLM layer: RMSNorm, rotary embeddings, attention, SwiGLU MLP,
and the four-norm "sandwich" decoder layer of the released Ouro models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from looplm_mega.model.attention import AttentionMask, attention
from looplm_mega.model.config import LoopLMConfig


class RMSNorm(nn.Module):
    """RMSNorm through torch's fused kernel (statistics in fp32 for low-precision inputs); the
    weight is applied inside the kernel, so autograd keeps only the input, not a second copy."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


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
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.backend = config.attention_backend
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attention(q, k, v, mask, backend=self.backend)
        return self.o_proj(out.reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


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

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = SwiGLU(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask) -> torch.Tensor:
        h = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), rope, mask))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
