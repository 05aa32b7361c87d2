"""The exit distribution over loops, computed in log space from the gate logits.

    lambda_t = sigmoid(z_t),  S_t = prod_{j<=t} (1 - lambda_j),  S_0 = 1
    p(t) = lambda_t * S_{t-1}  (t < T),   p(T) = S_{T-1}

p(t) needs the gates of loops 1..t only, so the distribution is built one loop at a time
(`exit_log_prob`, carrying the log-survival log S_t): the whole-sequence form stacks those loops,
a pipeline reads loop t out before loop t + 1 exists, and generation stops a token once its
survival is small enough. log(lambda) = logsigmoid(z) and log(1 - lambda) = logsigmoid(-z) stay
finite for any z, so the entropy and the losses never see log(0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exit_log_prob(gate_logit: torch.Tensor, log_survival: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(t), log S_t) of loop t from its gate logits [...] and log S_{t-1} [...] (zeros before
    the first loop). The last loop takes the remaining mass: its own gate is not used."""
    z = gate_logit.float()
    log_p = log_survival if last else F.logsigmoid(z) + log_survival
    return log_p, log_survival + F.logsigmoid(-z)


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """log p(t|x) for gate logits [T, ...] (loop first); sums (in prob space) to 1 over dim 0."""
    num_loops = gate_logits.shape[0]
    log_survival = torch.zeros(gate_logits.shape[1:], dtype=torch.float32, device=gate_logits.device)
    log_probs = []
    for loop in range(num_loops):
        log_p, log_survival = exit_log_prob(gate_logits[loop], log_survival, loop == num_loops - 1)
        log_probs.append(log_p)
    return torch.stack(log_probs)


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """CDF(n) = 1 - S_n for n < T and 1 at T; shape [T, ...]. Q-exit stops at CDF >= q."""
    return torch.cumsum(exit_log_probs(gate_logits).exp(), dim=0).clamp(max=1.0)


def entropy_terms(log_probs: torch.Tensor) -> torch.Tensor:
    """-p log p of each loop (same shape): summed over all loops, the entropy H(p)."""
    return -(log_probs.exp() * log_probs)


def exit_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) over dim 0 (the loops), per token."""
    return entropy_terms(log_probs).sum(dim=0)


def exit_loop_terms(log_probs: torch.Tensor, first_loop: int = 0) -> torch.Tensor:
    """t p(t) of each loop (loops counted from 1; log_probs [L, ...] of loops first_loop + 1 ..):
    summed over all loops, E[t]."""
    loops = torch.arange(first_loop + 1, first_loop + log_probs.shape[0] + 1, device=log_probs.device, dtype=log_probs.dtype)
    return log_probs.exp() * loops.view(-1, *[1] * (log_probs.dim() - 1))


def expected_exit_loop(log_probs: torch.Tensor) -> torch.Tensor:
    """E[t] with loops counted from 1, per token."""
    return exit_loop_terms(log_probs).sum(dim=0)
