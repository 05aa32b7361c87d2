"""Megatron-style tensor parallelism for the looped block: which tensors are split along which
dimension, how a full tensor becomes a shard and back, and the collectives around the split
projections (with or without sequence parallelism).

    column-parallel (output dim split, dim 0): q/k/v, gate and up projections
    row-parallel    (input dim split, dim 1):  o and down projections
    vocab-parallel  (vocabulary split, dim 0): embed_tokens, lm_head (padded, see padded_vocab_size)
    replicated:                                norms, the exit gate

A shard keeps the released parameter name: rank r's `model.layers.3.self_attn.q_proj.weight` is
rows [r * n / tp, (r + 1) * n / tp) of that tensor. The rules below work from names alone, so the
checkpoint tools can split and merge without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from looplm_mega.config import ConfigError
from looplm_mega.parallel import comm

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("embed_tokens", "lm_head")


def partition_dim(name: str) -> Optional[int]:
    """The dimension along which parameter `name` is split across TP ranks (None: replicated)."""
    module = name.rsplit(".", 2)[-2] if name.count(".") else name
    if module in COLUMN_PARALLEL or module in VOCAB_PARALLEL:
        return 0
    if module in ROW_PARALLEL:
        return 1
    return None


def shard_shape(param: torch.Tensor) -> torch.Size:
    """The shape of this rank's TP shard of a parameter, also once ZeRO-3 has partitioned it (its
    .shape is then that of an empty placeholder, the shard's shape kept in ds_shape)."""
    return getattr(param, "ds_shape", param.shape)


def is_vocab_parallel(name: str) -> bool:
    return any(name.endswith(f"{module}.weight") for module in VOCAB_PARALLEL)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int) -> int:
    """The vocabulary rounded up to a multiple of `multiple` x TP (Megatron's
    make-vocab-size-divisible-by): equal shards, and matmul shapes that suit the GPU."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def shard(full: torch.Tensor, name: str, rank: int, tp: int, padded_vocab: Optional[int] = None) -> torch.Tensor:
    """This rank's slice of a full tensor; vocab-parallel tensors are first padded with zero rows."""
    if is_vocab_parallel(name) and padded_vocab is not None and padded_vocab > full.shape[0]:
        full = torch.cat((full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])))
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} does not divide by TP={tp}")
    return full.chunk(tp, dim=dim)[rank]


def merge(shards: list[torch.Tensor], name: str, vocab_size: Optional[int] = None) -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order), vocabulary padding removed."""
    dim = partition_dim(name)
    full = shards[0] if dim is None else torch.cat(shards, dim=dim)
    if is_vocab_parallel(name) and vocab_size is not None:
        full = full[:vocab_size]
    return full


def check_tensor_parallel(config, tp: int, seq_length: Optional[int] = None, sequence_parallel: bool = False) -> None:
    """A ConfigError naming the values when the model cannot be split TP ways (before any
    process group exists)."""
    problems = [f"{field}={getattr(config, field)}" for field in
                ("num_attention_heads", "num_key_value_heads", "intermediate_size")
                if getattr(config, field) % tp]
    if problems:
        raise ConfigError(f"parallel.tp={tp} must divide {', '.join(problems)}; choose a TP degree that divides them")
    if sequence_parallel and tp > 1 and seq_length is not None and seq_length % tp:
        raise ConfigError(f"parallel.sequence_parallel needs data.seq_length={seq_length} divisible by parallel.tp={tp}")


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a model is split over, and the collectives its blocks use. With
    size 1 every method is the identity, so the single-device model runs the same code."""

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    @classmethod
    def from_state(cls, state) -> "TensorParallel":
        return cls(state.tp_group, state.tp, state.tp_rank, state.sequence_parallel and state.tp > 1)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def enter(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """Activations into column-parallel projections: replicated (gradient all-reduced), or the
        sequence shards all-gathered (gradient reduce-scattered). Called once per block, not per
        projection: q/k/v (and gate/up) share one collective."""
        if not self.enabled:
            return x
        return comm.gather_along(x, seq_dim, self.group) if self.sequence_parallel else comm.copy_to_group(x, self.group)

    def exit(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """Partial sums out of row-parallel projections (and the vocab-parallel embedding): all-reduced,
        or reduce-scattered to sequence shards."""
        if not self.enabled:
            return x
        return comm.reduce_scatter_along(x, seq_dim, self.group) if self.sequence_parallel else comm.reduce_from_group(x, self.group)

    def replicated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A replicated parameter applied to sequence shards sees only this rank's tokens: its gradient
        is summed over the group inside autograd (before ZeRO takes it), so it stays identical on
        every rank."""
        if not (self.enabled and self.sequence_parallel):
            return weight
        return comm.copy_to_group(weight, self.group)

    def gather_sequence(self, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Sequence shards of a replicated computation to the whole sequence (a no-op without SP)."""
        if not (self.enabled and self.sequence_parallel):
            return x
        return comm.gather_replicated(x, seq_dim, self.group)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits to full-vocabulary logits (inference only)."""
        if not self.enabled:
            return logits
        return comm.gather_replicated(logits, logits.ndim - 1, self.group)


def global_grad_norm(params, tp: TensorParallel, pipeline_group=None) -> float:
    """The L2 norm of the whole model's gradient: split parameters contribute the square sums of
    every shard (summed over the TP group), replicated ones count once; with a pipeline group, the
    disjoint parts of the pipeline ranks are summed too."""
    with_grad = [p for p in params if p.grad is not None]
    split = [p.grad for p in with_grad if getattr(p, "tensor_model_parallel", False)]
    replicated = [p.grad for p in with_grad if not getattr(p, "tensor_model_parallel", False)]
    squares = torch.zeros(2, dtype=torch.float64)
    for i, group in enumerate((split, replicated)):
        if group:
            squares[i] = float(torch.nn.utils.get_total_norm(group)) ** 2
    if tp.enabled:
        squares[1] /= tp.size  # identical on every rank: summed tp times below
        dist.all_reduce(squares, group=tp.group)
    if pipeline_group is not None:
        dist.all_reduce(squares, group=pipeline_group)
    return float(squares.sum().sqrt())
