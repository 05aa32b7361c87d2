"""Weighted per-token cross-entropy of a linear head, without materialising all logits.

A looped model reads out every loop step through the full-vocabulary head, so a naive loss holds
T x tokens x vocab logits (4 x 8K x 49K x 4 bytes = 6.4 GB for one small micro-batch), plus
their softmax and gradient. The fused path walks over token chunks, and for each chunk forms the
logits, the cross-entropy, and right away the gradients with respect to the hidden states, the
head weight and the token weights (the fused linear + cross-entropy technique of Liger-Kernel),
then drops the chunk. Peak memory grows with the chunk, not with T.

That is possible because the objective is linear in the per-token cross-entropies:
    loss = sum_i w_i * CE_i
so d loss / d logits_i = w_i * (softmax_i - onehot(y_i)) is known in the forward pass, given w.
The caller passes w (for Stage I, the exit probabilities over the number of valid tokens); its
gradient d loss / d w_i = CE_i flows back to the exit gate through autograd as usual.

Where no rank may hold the head weight whole (ZeRO-3), sliced_linear_cross_entropy reads it one
slice of rows at a time (model/vocabulary.VocabularySlices).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from looplm_mega.model.vocabulary import VocabularySlices
from looplm_mega.parallel import comm

IGNORE_INDEX = -100


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    chunk_tokens: int = 1024,
    fused: bool = True,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i token_weights_i * CE(hidden_i @ weight.T, labels_i) and the per-token CE (detached).

    hidden [M, H], weight [V_local, H], labels [M] (IGNORE_INDEX: CE 0), token_weights [M].
    Vocabulary parallelism: with a process group, `weight` holds this rank's contiguous slice of
    the (padded) vocabulary, rows [rank * V_local, (rank + 1) * V_local); maxima and softmax sums
    are all-reduced per chunk, so no rank ever holds full-vocabulary logits. The gradient of
    `hidden` is then this rank's partial sum: the caller reduces it (parallel.comm).
    Columns at or beyond `vocab_size` (padding) are masked out: they never win and get no gradient.
    Under autocast the matmuls run in the autocast dtype; softmax and CE are always fp32.
    """
    rank = dist.get_rank(group) if group is not None else 0
    vocab_start = rank * weight.shape[0]
    valid_columns = weight.shape[0] if vocab_size is None else max(0, min(weight.shape[0], vocab_size - vocab_start))
    if not fused:
        return _naive(hidden, weight, labels, token_weights, vocab_start, valid_columns, group)
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weight, token_weights))
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, chunk_tokens, compute_dtype,
                                              needs_grad, vocab_start, valid_columns, group)


def _naive(hidden, weight, labels, token_weights, vocab_start, valid_columns, group):
    """The straightforward formulation: every logit materialised (reference and benchmark baseline)."""
    logits = F.linear(hidden, weight).float()
    if valid_columns < weight.shape[0]:
        logits = logits.masked_fill(torch.arange(weight.shape[0], device=logits.device) >= valid_columns, float("-inf"))
    if group is not None:
        logits = comm.gather_replicated(logits, -1, group)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * token_weights).sum(), ce.detach()


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    return x if group is None else comm.all_reduce(x, group, op)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_tokens, compute_dtype, needs_grad,
                vocab_start, valid_columns, group):
        w = weight.to(compute_dtype)
        num_tokens, local_vocab = hidden.shape[0], weight.shape[0]
        chunk_tokens = min(chunk_tokens, num_tokens)
        device = hidden.device
        # Two chunk-sized buffers reused by every chunk: a fresh allocation of this size per chunk
        # would be page-faulted in anew each time (it is far above malloc's mmap threshold).
        logits_buf = torch.empty(chunk_tokens, local_vocab, dtype=compute_dtype, device=device)
        # Softmax statistics are fp32: in place on the logits when they are fp32 already.
        fp32_logits = compute_dtype == torch.float32
        shifted_buf = logits_buf if fp32_logits else torch.empty(chunk_tokens, local_vocab, dtype=torch.float32, device=device)
        ce = torch.empty(num_tokens, dtype=torch.float32, device=device)
        if needs_grad:
            grad_hidden = torch.empty(num_tokens, hidden.shape[1], dtype=compute_dtype, device=device)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
            # Low-precision products are formed here, then accumulated into grad_weight in fp32.
            partial_weight = None if compute_dtype == torch.float32 else torch.empty_like(w)
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            rows = torch.arange(end - start, device=device)
            h = hidden[start:end].to(compute_dtype)
            y = labels[start:end] - vocab_start
            here = (y >= 0) & (y < valid_columns)  # the label's logit lives on this rank
            y_here = torch.where(here, y, 0)
            logits = torch.mm(h, w.T, out=logits_buf[: end - start])
            shifted = shifted_buf[: end - start]
            if not fp32_logits:
                shifted.copy_(logits)
            if valid_columns < local_vocab:
                shifted[:, valid_columns:] = float("-inf")
            # Softmax over the whole vocabulary: a global max, then one all-reduce carrying both
            # the sum of exponentials and the label's (shifted) logit.
            row_max = _all_reduce(shifted.max(dim=-1).values, group, dist.ReduceOp.MAX)
            shifted.sub_(row_max.unsqueeze(1))
            sums = torch.stack((torch.where(here, shifted[rows, y_here], 0.0), shifted.exp_().sum(dim=-1)))
            label_logit, sum_exp = _all_reduce(sums, group)
            valid = labels[start:end] != IGNORE_INDEX
            ce[start:end] = torch.where(valid, sum_exp.log() - label_logit, 0.0)
            if not needs_grad:
                continue
            # d(sum_i w_i CE_i)/d logits_i = w_i (softmax_i - onehot_i). The factor w_i is applied
            # to the [chunk, hidden] operands and results rather than to the [chunk, vocab] matrix.
            grad_logits = shifted.div_(sum_exp.unsqueeze(1))
            grad_logits[rows[here], y_here[here]] -= 1.0
            g = grad_logits if fp32_logits else logits.copy_(grad_logits)
            scale = (token_weights[start:end].float() * valid).unsqueeze(1)
            torch.mm(g, w, out=grad_hidden[start:end]).mul_(scale.to(compute_dtype))
            scaled_h = h * scale.to(compute_dtype)
            if partial_weight is None:
                grad_weight.addmm_(g.T, scaled_h)
            else:
                grad_weight.add_(torch.mm(g.T, scaled_h, out=partial_weight))
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, ce)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce * token_weights.float()).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grad_hidden, grad_weight, ce = ctx.saved_tensors
        # Scaled in place: the head's gradient is a full [vocab, hidden] fp32 tensor, and a scaled
        # copy would hold it twice at the backward's peak. The graph is run backward once.
        grad_h = grad_hidden.mul_(grad_loss).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        grad_tw = ce * grad_loss if ctx.needs_input_grad[3] else None
        return grad_h, grad_w, None, grad_tw, None, None, None, None, None, None


def sliced_linear_cross_entropy(
    hidden: torch.Tensor,
    slices: VocabularySlices,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    chunk_tokens: int = 1024,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_cross_entropy with the weight given as slices, so that at most one slice of it and of
    its gradient is ever held. The forward walks the slices for the softmax statistics (a running
    maximum and sum of exponentials per token); the backward walks them again, recomputing each
    slice's logits, and hands each slice's gradient over as it is formed. A slice's gradient must
    be final when it is handed over, and only the backward knows the loss's scale (the fused path
    forms its gradients in the forward and scales them whole in the backward); the price is a
    second pass over the weight and one more [tokens, vocabulary] product. Equal to the fused path
    (tests/model/test_cross_entropy.py)."""
    rank = dist.get_rank(group) if group is not None else 0
    local_vocab = slices.count * slices.rows
    vocab_start = rank * local_vocab
    valid_columns = local_vocab if vocab_size is None else max(0, min(local_vocab, vocab_size - vocab_start))
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return _SlicedLinearCrossEntropy.apply(hidden, token_weights, labels, slices, chunk_tokens, compute_dtype,
                                               vocab_start, valid_columns, group)


def _slice_logits(h, w, first_column, valid_columns):
    """fp32 logits of a token chunk against one slice, columns beyond the vocabulary at -inf."""
    logits = torch.mm(h, w.T).float()
    padding = valid_columns - first_column
    if padding < w.shape[0]:
        logits[:, max(0, padding):] = float("-inf")
    return logits


class _SlicedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, token_weights, labels, slices, chunk_tokens, compute_dtype, vocab_start, valid_columns,
                group):
        num_tokens, device = hidden.shape[0], hidden.device
        chunk_tokens = min(chunk_tokens, num_tokens)
        running_max = torch.full((num_tokens,), float("-inf"), device=device)
        sum_exp = torch.zeros(num_tokens, device=device)
        label_logit = torch.zeros(num_tokens, device=device)
        for index in range(slices.count):
            first = index * slices.rows
            w = slices.gather(index).to(compute_dtype)  # every rank takes part, also for a slice of padding
            for start in range(0, num_tokens if first < valid_columns else 0, chunk_tokens):
                end = min(start + chunk_tokens, num_tokens)
                logits = _slice_logits(hidden[start:end].to(compute_dtype), w, first, valid_columns)
                y = labels[start:end] - vocab_start - first
                here = (y >= 0) & (y < slices.rows)
                label_logit[start:end] += torch.where(here, logits.gather(1, torch.where(here, y, 0)[:, None])[:, 0], 0.0)
                new_max = torch.maximum(running_max[start:end], logits.max(dim=-1).values)
                sum_exp[start:end] = (sum_exp[start:end] * (running_max[start:end] - new_max).exp()
                                      + logits.sub_(new_max[:, None]).exp_().sum(dim=-1))
                running_max[start:end] = new_max
            del w  # before the next slice is gathered
        if group is not None:  # vocabulary parallel: combine the ranks' statistics
            global_max = _all_reduce(running_max.clone(), group, dist.ReduceOp.MAX)  # in place: a copy
            sum_exp, label_logit = _all_reduce(torch.stack((sum_exp * (running_max - global_max).exp(), label_logit)), group)
            running_max = global_max
        log_sum_exp = running_max + sum_exp.log()
        valid = labels != IGNORE_INDEX
        ce = torch.where(valid, log_sum_exp - label_logit, 0.0)
        ctx.save_for_backward(hidden, token_weights, labels, log_sum_exp, ce)
        ctx.slices, ctx.chunk_tokens, ctx.compute_dtype = slices, chunk_tokens, compute_dtype
        ctx.vocab_start, ctx.valid_columns = vocab_start, valid_columns
        ctx.mark_non_differentiable(ce)
        return (ce * token_weights.float()).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        hidden, token_weights, labels, log_sum_exp, ce = ctx.saved_tensors
        slices, chunk_tokens, compute_dtype = ctx.slices, ctx.chunk_tokens, ctx.compute_dtype
        num_tokens = hidden.shape[0]
        # d loss / d logits_i = grad_loss * w_i * (softmax_i - onehot_i), formed one slice at a time.
        scale = (token_weights.float() * (labels != IGNORE_INDEX)) * grad_loss
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # summed over slices
        for index in range(slices.count):
            first = index * slices.rows
            w = slices.gather(index).to(compute_dtype)
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for start in range(0, num_tokens if first < ctx.valid_columns else 0, chunk_tokens):
                end = min(start + chunk_tokens, num_tokens)
                h = hidden[start:end].to(compute_dtype)
                grad_logits = _slice_logits(h, w, first, ctx.valid_columns).sub_(log_sum_exp[start:end, None]).exp_()
                y = labels[start:end] - ctx.vocab_start - first
                here = torch.nonzero((y >= 0) & (y < slices.rows))[:, 0]
                grad_logits[here, y[here]] -= 1.0
                g = grad_logits.mul_(scale[start:end, None]).to(compute_dtype)
                grad_hidden[start:end] += torch.mm(g, w)
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(g.T, h)
                else:  # the low-precision product first, accumulated in fp32
                    grad_weight += torch.mm(g.T, h)
            slices.hand_off(index, grad_weight)
            del w, grad_weight  # before the next slice's are made: one slice at a time
        grad_tw = ce * grad_loss if ctx.needs_input_grad[1] else None
        return grad_hidden.to(hidden.dtype), grad_tw, None, None, None, None, None, None, None
