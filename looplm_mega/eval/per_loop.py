"""Validation metrics per loop step and of the exit distribution, over a stream of batches.

For every loop step t (the read-out lm_head(h_t)) the token-weighted mean cross-entropy and
next-token accuracy over the valid labels; for the exit gate the mean p(t|x), the mean expected
exit step E[t], and Q-exit as inference runs it: a token stops at the first step whose exit CDF
reaches q (the last step when none does, and always for q = 1), giving a histogram of exit steps
and the CE / accuracy of reading each token out at its own exit step (the adaptive loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from looplm_mega.inference.exit_rules import ExitRule
from looplm_mega.model import LoopLM
from looplm_mega.model.cross_entropy import IGNORE_INDEX
from looplm_mega.model.exit import exit_log_probs, expected_exit_loop

# A batch as data.gpt_dataset.collate_batch gives it (input_ids, labels, optional segment_ids),
# or the same tensors as a tuple (input_ids, labels[, segment_ids]).
Batch = Union[Mapping[str, torch.Tensor], Sequence[Optional[torch.Tensor]]]


@dataclass
class PerLoopMetrics:
    num_tokens: int  # valid labels evaluated
    num_loops: int  # loop steps T
    exit_threshold: float  # q of the Q-exit
    ce_per_loop: list[float]  # [T] mean CE of each step's read-out
    accuracy_per_loop: list[float]  # [T] next-token accuracy of each step's read-out
    exit_prob_per_loop: list[float]  # [T] mean p(t|x)
    exit_loop_counts: list[int]  # [T] tokens whose Q-exit step is t (sums to num_tokens)
    mean_expected_exit_loop: float  # mean E[t] (steps counted from 1)
    mean_exit_loop: float  # mean Q-exit step (from 1)
    adaptive_ce: float  # mean CE with each token read out at its Q-exit step
    adaptive_accuracy: float  # the same for the accuracy

    def to_dict(self) -> dict:
        return asdict(self)


def _unpack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch["labels"], batch.get("segment_ids")
    input_ids, labels, *rest = batch
    return input_ids, labels, rest[0] if rest else None


@torch.no_grad()
def evaluate_per_loop(
    model: LoopLM,
    batches: Iterable[Batch],
    num_loops: Optional[int] = None,
    exit_threshold: Optional[float] = None,
    chunk_tokens: Optional[int] = None,
) -> PerLoopMetrics:
    """Metrics over all valid labels (!= -100) of `batches`, every token weighing the same.
    num_loops overrides the model's loop count T; exit_threshold defaults to the model's
    early_exit_threshold. Logits are formed chunk_tokens tokens at a time (default: the model's
    cross_entropy_chunk_tokens), so memory never holds T x tokens x vocab of them."""
    config = model.config
    steps = config.total_ut_steps if num_loops is None else num_loops
    q = config.early_exit_threshold if exit_threshold is None else exit_threshold
    if steps < 1:
        raise ValueError(f"num_loops={steps} must be at least 1")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit_threshold={q} must be in [0, 1]")
    chunk = chunk_tokens or config.cross_entropy_chunk_tokens
    device = next(model.parameters()).device

    # Sums in float64 on the CPU: exact enough over millions of tokens.
    ce_sum = torch.zeros(steps, dtype=torch.float64)
    correct = torch.zeros(steps, dtype=torch.float64)
    p_sum = torch.zeros(steps, dtype=torch.float64)
    counts = torch.zeros(steps, dtype=torch.long)
    expected_sum = exit_loop_sum = adaptive_ce_sum = adaptive_correct = 0.0
    num_tokens = 0
    for batch in batches:
        input_ids, labels, segment_ids = (t.to(device) if t is not None else None for t in _unpack(batch))
        too_large = max(int(input_ids.max()), int(labels.max()))
        if too_large >= config.vocab_size:
            raise ValueError(f"token id {too_large} in the data is outside the model's vocabulary "
                             f"(vocab_size={config.vocab_size}): data and model do not match")
        out = model(input_ids, num_loops=steps, segment_ids=segment_ids)
        valid = labels != IGNORE_INDEX
        targets = labels[valid]  # [N]
        n = targets.numel()
        if n == 0:
            continue
        # Per-token CE and correctness of every step's read-out, valid tokens only.
        ce = torch.empty(steps, n, device=device)
        hit = torch.empty(steps, n, dtype=torch.bool, device=device)
        for t, hidden in enumerate(out.hidden_states):
            hidden = hidden[valid]
            for start in range(0, n, chunk):
                logits = model.lm_head(hidden[start:start + chunk]).float()
                ce[t, start:start + chunk] = F.cross_entropy(logits, targets[start:start + chunk], reduction="none")
                hit[t, start:start + chunk] = logits.argmax(dim=-1) == targets[start:start + chunk]
        gate_logits = out.gate_logits[:, valid]  # [T, N]
        log_p = exit_log_probs(gate_logits)
        exit_at = ExitRule("q_exit", threshold=q).read_out_loops(gate_logits)  # [N]

        ce_sum += ce.sum(dim=1).double().cpu()
        correct += hit.sum(dim=1).double().cpu()
        p_sum += log_p.exp().sum(dim=1).double().cpu()
        counts += torch.bincount(exit_at, minlength=steps).cpu()
        expected_sum += expected_exit_loop(log_p).double().sum().item()
        exit_loop_sum += (exit_at + 1).sum().item()
        adaptive_ce_sum += ce.gather(0, exit_at[None]).double().sum().item()
        adaptive_correct += hit.gather(0, exit_at[None]).sum().item()
        num_tokens += n

    if num_tokens == 0:
        raise ValueError("no valid labels in the batches: nothing to evaluate")
    return PerLoopMetrics(
        num_tokens=num_tokens,
        num_loops=steps,
        exit_threshold=q,
        ce_per_loop=(ce_sum / num_tokens).tolist(),
        accuracy_per_loop=(correct / num_tokens).tolist(),
        exit_prob_per_loop=(p_sum / num_tokens).tolist(),
        exit_loop_counts=counts.tolist(),
        mean_expected_exit_loop=expected_sum / num_tokens,
        mean_exit_loop=exit_loop_sum / num_tokens,
        adaptive_ce=adaptive_ce_sum / num_tokens,
        adaptive_accuracy=adaptive_correct / num_tokens,
    )
