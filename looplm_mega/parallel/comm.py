"""Autograd-aware collectives of tensor and sequence parallelism (Megatron-LM's mappings).

Each function is a collective in the forward whose backward is the matching collective, so a
module written with them gets exact gradients from plain autograd:

    copy_to_group          identity    | all-reduce        (replicated input of a sharded op)
    reduce_from_group      all-reduce  | identity          (partial sums of a row-parallel op)
    gather_along(dim)      all-gather  | reduce-scatter    (sequence shards into a sharded op)
    gather_replicated      all-gather  | keep own slice    (sequence shards into a replicated op)
    reduce_scatter_along   reduce-sc.  | all-gather        (partial sums back to sequence shards)

Every call adds the bytes it sends to COMM_BYTES (per collective), so a benchmark can report
the volume a step issues next to the analytic figure. torch.distributed has no per-call
accounting of its own.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

COMM_BYTES: Counter = Counter()


def _count(kind: str, tensor: torch.Tensor, group) -> None:
    # Ring algorithms send (n - 1) / n of the data per rank for reduce-scatter and all-gather, and
    # twice that for all-reduce; this counts what one rank sends.
    n = dist.get_world_size(group)
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    COMM_BYTES[kind] += int(tensor.numel() * tensor.element_size() * factor)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    _count("all_reduce", x, group)
    dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _count("all_gather", out, group)
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _count("reduce_scatter", moved, group)
    dist.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def _own_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(n, dim=dim)[rank].contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_is_partial):
        ctx.dim, ctx.group, ctx.grad_is_partial = dim, group, grad_is_partial
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _own_slice(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)


def gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather whose consumer is sharded (each rank's gradient is a partial sum)."""
    return _GatherAlong.apply(x, dim, group, True)


def gather_replicated(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather whose consumer is replicated (every rank holds the whole gradient)."""
    return _GatherAlong.apply(x, dim, group, False)


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _ReduceScatterAlong.apply(x, dim, group)
