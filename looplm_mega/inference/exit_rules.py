"""When a token stops looping. The same rules serve decoding (loop by loop, inference.generate)
and scoring (all loops computed, each token read out at its exit loop: eval.harness, eval.per_loop).

    none         every token runs all T loops
    static       every token runs exactly `loops` loops
    q_exit       the first loop whose exit CDF reaches `threshold` (Ouro's Q-exit); tested as
                 log S_t <= log(1 - q), where S_t is the probability of running past loop t: the
                 survival keeps its precision where a CDF summed in fp32 rounds to 1, so q = 1.0
                 never exits early, whatever the gates
    hidden_diff  the first loop t >= 2 with ||h_t - h_{t-1}|| < `eps` (L2 over the hidden size of
                 the normed read-out state)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from looplm_mega.model.exit import exit_log_prob

EXIT_KINDS = ("none", "static", "q_exit", "hidden_diff")


@dataclass
class ExitRule:
    kind: Literal["none", "static", "q_exit", "hidden_diff"] = "none"
    loops: int = 0  # static: loops per token
    threshold: float = 1.0  # q_exit: q
    eps: float = 0.0  # hidden_diff: ||h_t - h_{t-1}|| below this exits

    def check(self, num_loops: int) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"exit={self.kind!r}: expected one of {EXIT_KINDS}")
        if self.kind == "static" and not 1 <= self.loops <= num_loops:
            raise ValueError(f"static exit at {self.loops} loops: expected 1..{num_loops} (the model's loop count)")
        if self.kind == "q_exit" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"exit threshold {self.threshold}: expected a value in [0, 1]")
        if self.kind == "hidden_diff" and self.eps < 0:
            raise ValueError(f"exit eps {self.eps}: expected >= 0")

    def read_out_loops(self, gate_logits: torch.Tensor, states: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """The loop (0-based) each token exits at, from every loop's gate logits [T, ...] and, for
        hidden_diff, the read-out states (T x [..., H]) -> [...]."""
        num_loops = gate_logits.shape[0]
        self.check(num_loops)
        tracker = ExitTracker(self, num_loops)
        exit_loop = torch.full(gate_logits.shape[1:], num_loops - 1, dtype=torch.long, device=gate_logits.device)
        done = torch.zeros(gate_logits.shape[1:], dtype=torch.bool, device=gate_logits.device)
        for loop in range(num_loops):
            stop = tracker.exits(loop, gate_logits[loop], states[loop] if states is not None else None) & ~done
            exit_loop[stop] = loop
            done |= stop
        return exit_loop


class ExitTracker:
    """The rule's state for the tokens still looping, fed one loop at a time."""

    def __init__(self, rule: ExitRule, num_loops: int):
        self.rule, self.num_loops = rule, num_loops
        self.log_survival: Optional[torch.Tensor] = None
        self.previous: Optional[torch.Tensor] = None
        self.log_stop = math.log1p(-rule.threshold) if rule.threshold < 1.0 else -math.inf

    def exits(self, loop: int, gate_logit: torch.Tensor, state: Optional[torch.Tensor]) -> torch.Tensor:
        """Which tokens stop after loop `loop` (0-based), given their gate logits [...] and states [..., H]."""
        kind = self.rule.kind
        never = torch.zeros(gate_logit.shape, dtype=torch.bool, device=gate_logit.device)
        if kind == "hidden_diff" and state is None:
            raise ValueError("the hidden_diff exit rule needs the read-out states")
        if loop == self.num_loops - 1:
            stop = ~never
        elif kind == "static":
            stop = never | (loop + 1 >= self.rule.loops)
        elif kind == "q_exit":
            if self.log_survival is None:
                self.log_survival = torch.zeros(gate_logit.shape, dtype=torch.float32, device=gate_logit.device)
            _, self.log_survival = exit_log_prob(gate_logit, self.log_survival, last=False)
            stop = self.log_survival <= self.log_stop
        elif kind == "hidden_diff" and self.previous is not None:
            stop = torch.linalg.vector_norm((state - self.previous).float(), dim=-1) < self.rule.eps
        else:
            stop = never
        self.previous = state
        return stop

    def keep(self, index: torch.Tensor) -> None:
        """Only these tokens (indices along the first dimension) go on to the next loop."""
        if self.log_survival is not None:
            self.log_survival = self.log_survival[index]
        if self.previous is not None:
            self.previous = self.previous[index]
