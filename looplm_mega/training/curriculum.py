"""The stage controller: a run carried through an ordered list of stages (Ouro's curriculum),
each changing the loop count, the entropy weight, the RoPE base and the learning-rate schedule.

Stages are laid out in optimizer steps (a length in tokens is rounded up to whole global batches),
so every rank knows the stage of a step from the step alone: transitions happen at exact
boundaries on every rank together, and a resumed run is in the right stage at the right position.

    curriculum:
      - {name: stable, train_tokens: 1.0e12, loops: 8, entropy_beta: 0.1, rope_theta: 10000}
      - {name: anneal, train_tokens: 2.0e11, loops: 4, entropy_beta: 0.05, rope_theta: 40000,
         rope_anneal_steps: 500, lr: 3.0e-4, min_lr: 3.0e-5, schedule: {kind: cosine}}

A field left out keeps the value in force (the previous stage's, or the run's model and
optimizer for the first stage); `schedule` left out uses the run's schedule for the stage.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass

from looplm_mega.config import ConfigError
from looplm_mega.training.config import OptimizerConfig, ScheduleConfig, StageConfig


@dataclass(frozen=True)
class StageState:
    """What is in force at one optimizer step."""

    index: int
    name: str
    start: int  # the stage's first step
    steps: int  # the stage's length in steps
    loops: int
    entropy_beta: float
    rope_theta: float
    lr: float
    min_lr: float
    schedule: ScheduleConfig
    objective: str
    freeze: tuple[str, ...]  # patterns of the parameters this stage keeps fixed

    def is_frozen(self, name: str) -> bool:
        if self.objective == "stage2" and not name.startswith("model.early_exit_gate."):
            return True  # Stage II trains the gate alone
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.freeze)

    def optimizer(self, base: OptimizerConfig) -> OptimizerConfig:
        return dataclasses.replace(base, lr=self.lr, min_lr=self.min_lr)


class Curriculum:
    def __init__(self, stages: list[StageConfig], tokens_per_step: int, base: dict):
        # base["schedule"] is a ScheduleConfig; a stage's own schedule replaces it for the stage.
        """base: the values before the first stage (loops, entropy_beta, rope_theta, lr, min_lr,
        schedule) from the run's model, optimizer and schedule sections."""
        if not stages:
            raise ConfigError("curriculum: an empty list; leave the section out for a run without stages")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"curriculum: stage names repeat: {names}")
        self.stages = stages
        self.states: list[StageState] = []
        self._anneal_from: list[float] = []  # the RoPE base each stage starts from
        start, current = 0, dict(base)
        for index, stage in enumerate(stages):
            steps = stage.train_steps or math.ceil(stage.train_tokens / tokens_per_step)
            previous_theta = current["rope_theta"]
            for key in ("loops", "entropy_beta", "rope_theta", "lr", "min_lr", "objective"):
                if getattr(stage, key) is not None:
                    current[key] = getattr(stage, key)
            schedule = stage.schedule if stage.schedule is not None else base["schedule"]
            if current["min_lr"] > current["lr"]:
                raise ConfigError(f"curriculum stage {stage.name!r}: min_lr={current['min_lr']} exceeds lr={current['lr']}")
            self.states.append(StageState(index, stage.name, start, steps, current["loops"], current["entropy_beta"],
                                          current["rope_theta"], current["lr"], current["min_lr"], schedule,
                                          current["objective"], tuple(stage.freeze)))
            self._anneal_from.append(previous_theta)
            start += steps
        self.total_steps = start

    def frozen_in(self, name: str) -> tuple[int, ...]:
        """The stages (indices) in which parameter `name` is frozen."""
        return tuple(state.index for state in self.states if state.is_frozen(name))

    def at(self, step: int) -> StageState:
        """The stage in force at optimizer step `step` (0-based); past the end, the last one."""
        for state in self.states:
            if step < state.start + state.steps:
                return state
        return self.states[-1]

    def is_boundary(self, step: int) -> bool:
        """True when `step` steps are done and the next step starts a new stage."""
        return any(step == s.start for s in self.states[1:])

    def rope_theta(self, step: int) -> float:
        """The RoPE base at `step`: the stage's, or on the way there (geometric in the base, so the
        rotary wavelengths move evenly) during its first rope_anneal_steps."""
        state = self.at(step)
        span = self.stages[state.index].rope_anneal_steps
        into = step - state.start
        if span == 0 or into >= span:
            return state.rope_theta
        old = self._anneal_from[state.index]
        return old * (state.rope_theta / old) ** ((into + 1) / span)
