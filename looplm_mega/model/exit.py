"""The exit distribution over loop steps, computed in log space from the gate logits.

    lambda_t = sigmoid(z_t),  S_t = prod_{j<=t} (1 - lambda_j),  S_0 = 1
    p(t) = lambda_t * S_{t-1}  (t < T),   p(T) = S_{T-1}

log(lambda) = logsigmoid(z) and log(1 - lambda) = logsigmoid(-z) stay finite for any z, so the
entropy and the losses never see log(0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """log p(t|x) for gate logits [T, ...] (step first); sums (in prob space) to 1 over dim 0."""
    z = gate_logits.float()
    log_continue = F.logsigmoid(-z)  # log(1 - lambda_t)
    # log S_{t-1}: survival before step t, 0 for t = 1.
    log_survival_before = torch.cumsum(log_continue, dim=0) - log_continue
    log_exit = F.logsigmoid(z) + log_survival_before
    # The last step takes all the remaining mass: its own gate is not used.
    return torch.cat((log_exit[:-1], log_survival_before[-1:]), dim=0)


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """CDF(n) = 1 - S_n for n < T and 1 at T; shape [T, ...]. Q-exit stops at CDF >= q."""
    return torch.cumsum(exit_log_probs(gate_logits).exp(), dim=0).clamp(max=1.0)


def exit_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) over dim 0, per token."""
    return -(log_probs.exp() * log_probs).sum(dim=0)


def expected_exit_loop(log_probs: torch.Tensor) -> torch.Tensor:
    """E[t] with steps counted from 1, per token."""
    steps = torch.arange(1, log_probs.shape[0] + 1, device=log_probs.device, dtype=log_probs.dtype)
    return (log_probs.exp() * steps.view(-1, *[1] * (log_probs.dim() - 1))).sum(dim=0)
