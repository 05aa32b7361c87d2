"""The two Ouro training objectives, each defined once, over any run of consecutive loops.

Stage I (LM and gate jointly), per valid token, averaged:
    L = sum_t p(t|x) CE_t - beta * H(p(.|x))
Stage II (gate only, LM detached): with I_t = max(0, CE_{t-1} - CE_t),
    w_t = sigmoid(k (I_t - gamma)),  L_t = -mean_i[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t],
    L = (1/T) sum_{t=2..T} L_t

Both are sums over loops of a term that needs only that loop's read-out (and, for Stage II, the
previous loop's per-token CE): `objective_terms` computes the terms of the loops it is given. The model
gives it all T loops of a micro-batch at once (one fused cross-entropy over every read-out); a
pipeline gives it one loop at a time, as each loop ends on the last rank. The terms add up to the
same objective (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from looplm_mega.model.cross_entropy import IGNORE_INDEX
from looplm_mega.model.exit import entropy_terms, exit_loop_terms

# (hidden [M, H], labels [M], token_weights [M]) -> (sum_i w_i CE_i, per-token CE [M] detached):
# the read-out head's weighted cross-entropy (LMHead.forward, or cross_entropy.linear_cross_entropy).
WeightedCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Objective = Literal["stage1", "stage2"]

STAGE2_K = 50.0
STAGE2_GAMMA = 0.005


@dataclass
class LoopTerms:
    """The objective and its statistics over some consecutive loops of one micro-batch. Terms of
    different loops add up (`+`): the loss, the entropy and the mean exit loop are sums over
    loops; the per-loop values are concatenated."""

    loss: torch.Tensor  # the objective's share of these loops, scalar (with gradient)
    ce_per_loop: torch.Tensor  # [L] mean CE of each loop over valid tokens (detached)
    token_ce: torch.Tensor  # [L, N] per-token CE (detached): Stage II's next loop needs the last row
    exit_entropy: torch.Tensor  # these loops' share of the mean H(p) over valid tokens (detached)
    mean_exit_loop: torch.Tensor  # these loops' share of the mean E[t] over valid tokens (detached)
    gate_mean_per_loop: torch.Tensor  # [L] mean lambda_t over all tokens (detached)

    def __add__(self, later: "LoopTerms") -> "LoopTerms":
        return LoopTerms(self.loss + later.loss, torch.cat((self.ce_per_loop, later.ce_per_loop)),
                         torch.cat((self.token_ce, later.token_ce)), self.exit_entropy + later.exit_entropy,
                         self.mean_exit_loop + later.mean_exit_loop,
                         torch.cat((self.gate_mean_per_loop, later.gate_mean_per_loop)))


def objective_terms(
    name: Objective,
    hidden: torch.Tensor,
    gate_logits: torch.Tensor,
    log_p: torch.Tensor,
    labels: torch.Tensor,
    cross_entropy: WeightedCrossEntropy,
    first_loop: int,
    num_loops: int,
    beta: float = 0.0,
    previous_ce: Optional[torch.Tensor] = None,
) -> LoopTerms:
    """The terms of loops first_loop + 1 .. first_loop + L (of num_loops) of objective `name`.
    hidden [L, N, H]: the normed read-out states; gate_logits [L, N]; log_p [L, N]: log p(t|x) of
    these loops (exit.exit_log_prob); labels [N]. previous_ce [N]: the per-token CE of the loop
    before first_loop (Stage II's improvement needs it; None at the first loop). For Stage II the
    caller gives the gate a detached state: only the gate trains."""
    loops, tokens, _ = hidden.shape
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    per_valid = valid / count  # each valid token's weight in a mean over valid tokens
    p = log_p.exp()
    flat_hidden, flat_labels = hidden.reshape(loops * tokens, -1), labels.repeat(loops)
    if name == "stage1":
        weighted_ce, ce = cross_entropy(flat_hidden, flat_labels, (p * per_valid).reshape(-1))
        entropy = (entropy_terms(log_p) * per_valid).sum()
        loss = weighted_ce - beta * entropy
        ce = ce.view(loops, tokens)
    elif name == "stage2":
        with torch.no_grad():
            _, ce = cross_entropy(flat_hidden.detach(), flat_labels, torch.zeros(loops * tokens, device=hidden.device))
        ce = ce.view(loops, tokens).float()
        # I_t for the loops that have a previous one; the first loop of the model has none.
        before = ce[:-1] if previous_ce is None else torch.cat((previous_ce.view(1, -1).float(), ce[:-1]))
        z = gate_logits[1:] if previous_ce is None else gate_logits
        target_continue = torch.sigmoid(STAGE2_K * ((before - ce[loops - len(z):]).clamp(min=0) - STAGE2_GAMMA))
        z = z.float()
        per_token = -(target_continue * F.logsigmoid(-z) + (1 - target_continue) * F.logsigmoid(z))
        loss = (per_token * per_valid).sum() / num_loops
        entropy = (entropy_terms(log_p.detach()) * per_valid).sum()
    else:
        raise ValueError(f"objective={name!r}: expected 'stage1' or 'stage2'")
    log_p = log_p.detach()
    return LoopTerms(
        loss=loss,
        ce_per_loop=(ce * per_valid).sum(dim=1).detach(),
        token_ce=ce.detach(),
        exit_entropy=entropy.detach(),
        mean_exit_loop=(exit_loop_terms(log_p, first_loop) * per_valid).sum(),
        gate_mean_per_loop=torch.sigmoid(gate_logits.detach().float()).mean(dim=1),
    )
