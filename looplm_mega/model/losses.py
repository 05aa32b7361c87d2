"""The two Ouro training objectives.

Stage I (LM and gate jointly), per valid token, averaged:
    L = sum_t p(t|x) CE_t - beta * H(p(.|x))
Stage II (gate only, LM detached): with I_t = max(0, CE_{t-1} - CE_t),
    w_t = sigmoid(k (I_t - gamma)),  L_t = -mean_i[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t],
    L = (1/T) sum_{t=2..T} L_t
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from looplm_mega.model.cross_entropy import IGNORE_INDEX

# (hidden [M, H], labels [M], token_weights [M]) -> (sum_i w_i CE_i, per-token CE [M] detached):
# the read-out head's weighted cross-entropy (LMHead.forward, or cross_entropy.linear_cross_entropy).
WeightedCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
from looplm_mega.model.exit import exit_entropy, exit_log_probs, expected_exit_loop

STAGE2_K = 50.0
STAGE2_GAMMA = 0.005


@dataclass
class LossOutput:
    loss: torch.Tensor  # the objective, scalar
    ce_per_loop: torch.Tensor  # [T] mean CE of each loop step over valid tokens (detached)
    exit_entropy: torch.Tensor  # mean H(p) over valid tokens (detached)
    mean_exit_loop: torch.Tensor  # mean E[t] over valid tokens (detached)


def _mean_over_valid(per_token: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens of the last dimension."""
    return (per_token * valid).sum(dim=-1) / count


def stage1_loss(
    hidden: torch.Tensor,
    log_p: torch.Tensor,
    labels: torch.Tensor,
    cross_entropy: WeightedCrossEntropy,
    beta: float,
) -> LossOutput:
    """hidden [T, N, H] (normed read-out of each step), log_p [T, N] (exit.exit_log_probs of the
    gate logits), labels [N]."""
    num_loops, num_tokens, _ = hidden.shape
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    p = log_p.exp()
    token_weights = (p * valid / count).reshape(-1)
    weighted_ce, ce = cross_entropy(hidden.reshape(num_loops * num_tokens, -1), labels.repeat(num_loops), token_weights)
    entropy = _mean_over_valid(exit_entropy(log_p), valid, count)
    return LossOutput(
        loss=weighted_ce - beta * entropy,
        ce_per_loop=_mean_over_valid(ce.view(num_loops, num_tokens), valid, count),
        exit_entropy=entropy.detach(),
        mean_exit_loop=_mean_over_valid(expected_exit_loop(log_p.detach()), valid, count),
    )


def stage2_gate_loss(
    ce: torch.Tensor, gate_logits: torch.Tensor, labels: torch.Tensor,
    k: float = STAGE2_K, gamma: float = STAGE2_GAMMA,
) -> torch.Tensor:
    """ce [T, N] per-token CE of each step (detached from the LM), gate_logits [T, N], labels [N]."""
    num_loops = ce.shape[0]
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    ce = ce.detach().float()
    improvement = (ce[:-1] - ce[1:]).clamp(min=0)  # I_t for t = 2..T
    target_continue = torch.sigmoid(k * (improvement - gamma))
    z = gate_logits[1:].float()
    per_token = -(target_continue * F.logsigmoid(-z) + (1 - target_continue) * F.logsigmoid(z))
    return _mean_over_valid(per_token, valid, count).sum() / num_loops  # (1/T) sum_t L_t


def stage2_loss(
    hidden: torch.Tensor, gate_logits: torch.Tensor, labels: torch.Tensor, cross_entropy: WeightedCrossEntropy,
) -> LossOutput:
    """Stage II from the read-out: the per-step CE is computed without any gradient."""
    num_loops, num_tokens, _ = hidden.shape
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    with torch.no_grad():
        no_weights = torch.zeros(num_loops * num_tokens, device=hidden.device)
        _, ce = cross_entropy(hidden.reshape(num_loops * num_tokens, -1), labels.repeat(num_loops), no_weights)
    ce = ce.view(num_loops, num_tokens)
    log_p = exit_log_probs(gate_logits.detach())
    return LossOutput(
        loss=stage2_gate_loss(ce, gate_logits, labels),
        ce_per_loop=_mean_over_valid(ce, valid, count),
        exit_entropy=_mean_over_valid(exit_entropy(log_p), valid, count),
        mean_exit_loop=_mean_over_valid(expected_exit_loop(log_p), valid, count),
    )


@dataclass
class LoopReadout:
    """The Stage I objective one loop at a time, for a pipeline whose read-out of loop t happens
    before loop t + 1 exists. Exact, because p(t|x) depends on the gates of loops 1..t only (the
    last loop takes the remaining mass): the carried survival log S_{t-1} is all that is needed.
    Summed over t, `loss` equals stage1_loss's (tested)."""

    loss: torch.Tensor  # this loop's share of the objective
    log_survival: torch.Tensor  # [N] log S_t, to carry into the next loop
    token_ce: torch.Tensor  # [N] this loop's per-token CE (detached), to carry (Stage II needs it)
    ce: torch.Tensor  # mean CE of this loop over valid tokens (detached)
    entropy: torch.Tensor  # this loop's share of mean H(p) (detached)
    exit_loop: torch.Tensor  # this loop's share of mean E[t] (detached)


def stage1_loop_readout(
    hidden: torch.Tensor, gate_logits: torch.Tensor, log_survival: torch.Tensor, labels: torch.Tensor,
    cross_entropy: WeightedCrossEntropy, beta: float, step: int, num_loops: int,
) -> LoopReadout:
    """hidden [N, H] (normed read-out of loop `step`, counted from 0), gate_logits [N], log_survival
    [N] (log S_{step-1}; zeros before the first loop), labels [N]."""
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    z = gate_logits.float()
    last = step == num_loops - 1
    log_p = log_survival if last else F.logsigmoid(z) + log_survival
    p = log_p.exp()
    weighted_ce, ce = cross_entropy(hidden, labels, p * valid / count)
    entropy = -(p * log_p * valid).sum() / count
    return LoopReadout(
        loss=weighted_ce - beta * entropy,
        log_survival=log_survival + F.logsigmoid(-z),
        token_ce=ce,
        ce=(ce * valid).sum() / count,
        entropy=entropy.detach(),
        exit_loop=((step + 1) * p.detach() * valid).sum() / count,
    )


def stage2_loop_readout(
    hidden: torch.Tensor, gate_logits: torch.Tensor, log_survival: torch.Tensor, previous_ce: torch.Tensor,
    labels: torch.Tensor, cross_entropy: WeightedCrossEntropy, step: int, num_loops: int,
) -> LoopReadout:
    """Stage II one loop at a time: this loop's term of stage2_gate_loss (from loop 2 on, it needs the
    previous loop's per-token CE, carried as previous_ce). The CE runs without gradient; the caller
    gives the gate a detached hidden state."""
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    with torch.no_grad():
        _, ce = cross_entropy(hidden.detach(), labels, torch.zeros(labels.shape, device=hidden.device))
    z = gate_logits.float()
    log_z = log_survival.detach() if step == num_loops - 1 else F.logsigmoid(z.detach()) + log_survival.detach()
    p = log_z.exp()
    loss = z.new_zeros(())
    if step > 0:
        target_continue = torch.sigmoid(STAGE2_K * ((previous_ce - ce).clamp(min=0) - STAGE2_GAMMA))
        per_token = -(target_continue * F.logsigmoid(-z) + (1 - target_continue) * F.logsigmoid(z))
        loss = (per_token * valid).sum() / count / num_loops
    return LoopReadout(
        loss=loss,
        log_survival=(log_survival + F.logsigmoid(-z)).detach(),
        token_ce=ce,
        ce=(ce * valid).sum() / count,
        entropy=-(p * log_z * valid).sum() / count,
        exit_loop=((step + 1) * p * valid).sum() / count,
    )
