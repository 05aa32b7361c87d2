"""The embedding and the head: [vocabulary, hidden] matrices, the largest tensors of a model. A
trainer may route their weights: through `weight_hook` on the way into the forward (ZeRO-3 hands
the gradient over there), or, where no rank holds a matrix whole, as `slices` read one at a time
(training/zero3.py)."""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import nn


class VocabularySlices(Protocol):
    """A [vocabulary, hidden] weight no rank holds whole (ZeRO-3's partitions of it), read as
    `count` equal slices of its rows: each gathered when it is needed and dropped after, its
    gradient handed back. Every rank calls gather and hand_off for every slice, in order."""

    count: int
    rows: int  # rows of a slice: slice i is rows [i * rows, (i + 1) * rows) of this rank's matrix

    def gather(self, index: int) -> torch.Tensor:
        """Slice `index` of the weight, [rows, H]."""

    def hand_off(self, index: int, grad: torch.Tensor) -> None:
        """The fp32 gradient of slice `index` formed from this rank's tokens, [rows, H]."""


class VocabularyMatrix:
    """Mixed into the embedding and the head, whose forwards read the weight through
    forward_weight(), or through `slices` when a trainer sets them."""

    weight: nn.Parameter
    weight_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    slices: Optional[VocabularySlices] = None

    @property
    def backward_reads_weight(self) -> bool:
        return False  # the embedding's gradient is scattered by the ids alone

    def forward_weight(self) -> torch.Tensor:
        return self.weight if self.weight_hook is None else self.weight_hook(self.weight)

    def whole_weight(self) -> torch.Tensor:
        """The weight for a use that reads all of it at once (logits). Held in slices, it is put
        together from them and gets no gradient that way, so only under no_grad."""
        if self.slices is None:
            return self.forward_weight()
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(self).__name__}: a weight held in slices (ZeRO-3) gets no gradient from a "
                               "use that reads it whole; run that use under torch.no_grad()")
        return torch.cat([self.slices.gather(index) for index in range(self.slices.count)])


def sliced_embedding(ids: torch.Tensor, slices: VocabularySlices) -> torch.Tensor:
    """F.embedding(ids, weight) with the weight given as slices: each slice fills the rows of the
    ids it holds, and in the backward each slice's gradient is scattered from those ids alone."""
    # Autograd runs a Function's backward only for an input that needs a gradient: the ids never
    # do, and the weight is read here through the slices, so a placeholder stands for it.
    anchor = torch.empty(0, device=ids.device, requires_grad=torch.is_grad_enabled())
    return _SlicedEmbedding.apply(ids, anchor, slices)


class _SlicedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, anchor, slices):
        out = None
        for index in range(slices.count):
            w = slices.gather(index)
            if out is None:
                out = w.new_zeros(*ids.shape, w.shape[1])
            local = ids - index * slices.rows
            here = (local >= 0) & (local < slices.rows)
            out[here] = w[local[here]]
            del w  # before the next slice is gathered
        ctx.save_for_backward(ids)
        ctx.slices = slices
        return out

    @staticmethod
    def backward(ctx, grad):
        (ids,), slices = ctx.saved_tensors, ctx.slices
        flat_ids, flat_grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).float()
        for index in range(slices.count):
            local = flat_ids - index * slices.rows
            here = torch.nonzero((local >= 0) & (local < slices.rows))[:, 0]
            grad_slice = flat_grad.new_zeros(slices.rows, flat_grad.shape[1])
            slices.hand_off(index, grad_slice.index_add_(0, local[here], flat_grad[here]))
        return None, None, None
