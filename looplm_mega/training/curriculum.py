"""The stage controller: a run carried through an ordered list of stages (Ouro's curriculum),
each changing loops, entropy weight, RoPE base, learning-rate schedule, sequence length, batch
size, data blend, objective, frozen parameters, or growing the layer stack (upcycling).

Stages are laid out in optimizer steps up front (a length in tokens is rounded up to whole
global batches, a batch ramp included), so every rank knows the stage and batch of a step from
the step alone: transitions happen at exact boundaries on every rank together, and a resumed run
is in the right stage at the right position.

    curriculum:
      - {name: stable, train_tokens: 1.0e12, loops: 8, entropy_beta: 0.1, rope_theta: 10000,
         batch_ramp: {start_tokens: 4194304, increment_tokens: 1048576, ramp_tokens: 1.0e11}}
      - {name: anneal, train_tokens: 2.0e11, loops: 4, entropy_beta: 0.05, rope_theta: 40000,
         rope_anneal_tokens: 4.0e9, seq_length: 16384, micro_batch_size: 1,
         lr: 3.0e-4, min_lr: 3.0e-5, schedule: {kind: cosine}, data: {prefixes: [...], weights: [...]}}

A field left out keeps the value in force (the previous stage's, or the run's model, data,
training and optimizer sections for the first stage); `schedule` left out uses the run's schedule
for the stage. A run without a curriculum is one implicit stage.

Consecutive stages with the same sequence length and blend read one dataset on (a "data
segment"); a stage that changes either starts a new segment, whose indices are built for its
samples with the seed data.seed + segment, so it does not replay the previous segment's order.
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Optional

from looplm_mega.config import ConfigError
from looplm_mega.data.config import DataConfig
from looplm_mega.model.losses import Objective
from looplm_mega.training.config import BatchRamp, OptimizerConfig, ScheduleConfig, StageConfig, UpcycleAction


@dataclass(frozen=True, eq=False)
class StageState:
    """What is in force during one stage."""

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
    objective: Objective
    freeze: tuple[str, ...]  # patterns of the parameters this stage keeps fixed
    seq_length: int
    micro_batch_size: int
    global_batch_tokens: int  # after the ramp, if any
    data: DataConfig  # the blend at this sequence length, with this segment's seed
    segment: int  # data segment (see the module docstring)
    num_layers: int
    upcycle: Optional[UpcycleAction]  # set when this stage grows the layer stack at its start

    def is_frozen(self, name: str) -> bool:
        if self.objective == "stage2" and not name.startswith("model.early_exit_gate."):
            return True  # Stage II trains the gate alone
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.freeze)

    def optimizer(self, base: OptimizerConfig) -> OptimizerConfig:
        return dataclasses.replace(base, lr=self.lr, min_lr=self.min_lr)


def batch_phases(where: str, batch_tokens: int, ramp: Optional[BatchRamp], seq_length: int,
                 train_steps: Optional[int], train_tokens: Optional[int]) -> list[tuple[int, int]]:
    """The stage as (steps, samples per step) phases. With a ramp, Megatron's rule in tokens: the
    batch is start + k * increment while fewer than (k + 1) / n of ramp_tokens are consumed
    (n = (end - start) / increment increments), then the stage's batch to its end."""
    for name, value in (("global_batch_tokens", batch_tokens),) + (
            (("batch_ramp.start_tokens", ramp.start_tokens), ("batch_ramp.increment_tokens", ramp.increment_tokens))
            if ramp else ()):
        if value % seq_length:
            raise ConfigError(f"{where}: {name}={value} is not a multiple of seq_length={seq_length}")
    phases: list[tuple[int, int]] = []
    done_steps = done_tokens = 0

    def add(batch: int, steps: Optional[int] = None) -> None:
        nonlocal done_steps, done_tokens
        left = train_steps - done_steps if train_steps is not None else -(-(train_tokens - done_tokens) // batch)
        steps = left if steps is None else min(steps, left)
        if steps > 0:
            phases.append((steps, batch // seq_length))
            done_steps += steps
            done_tokens += steps * batch

    if ramp is not None:
        span = batch_tokens - ramp.start_tokens
        if span <= 0 or span % ramp.increment_tokens:
            raise ConfigError(f"{where}: batch_ramp from {ramp.start_tokens} to global_batch_tokens={batch_tokens} tokens "
                              f"must grow by whole increments of {ramp.increment_tokens}")
        increments = span // ramp.increment_tokens
        for k in range(increments):
            batch = ramp.start_tokens + k * ramp.increment_tokens
            short = (k + 1) * ramp.ramp_tokens - done_tokens * increments  # (tokens to the phase's end) x n
            add(batch, -(-short // (batch * increments)) if short > 0 else 0)
    add(batch_tokens)
    return phases


def _steps_to_read(phases: list[tuple[int, int]], tokens: int, seq_length: int) -> int:
    """The number of steps from a stage's start that read at least `tokens` tokens."""
    steps = 0
    for phase_steps, samples in phases:
        batch = samples * seq_length
        if tokens <= phase_steps * batch:
            return steps + -(-tokens // batch)
        steps, tokens = steps + phase_steps, tokens - phase_steps * batch
    return steps


class Curriculum:
    def __init__(self, stages: list[StageConfig], base: dict, implicit: bool = False):
        """base: the values before the first stage, from the run's sections: loops, entropy_beta,
        rope_theta, lr, min_lr, schedule (ScheduleConfig), objective, seq_length, micro_batch_size,
        global_batch_tokens, data (DataConfig), num_layers. implicit: the one stage of a run
        without a curriculum (nothing to announce)."""
        if not stages:
            raise ConfigError("curriculum: an empty list; leave the section out for a run without stages")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"curriculum: stage names repeat: {names}")
        self.stages, self.implicit = stages, implicit
        self.states: list[StageState] = []
        self._anneal_from: list[float] = []  # the RoPE base each stage starts from
        self._anneal_steps: list[int] = []  # over how many steps it moves to the stage's
        self._phase_starts: list[int] = []  # first step of every batch phase
        self._phase_samples: list[int] = []
        start, segment, data_key = 0, 0, None
        current = {**base, "prefixes": base["data"].prefixes, "weights": base["data"].weights}
        for index, stage in enumerate(stages):
            where = f"curriculum stage {stage.name!r}"
            previous_theta = current["rope_theta"]
            for key in ("loops", "entropy_beta", "rope_theta", "lr", "min_lr", "objective", "seq_length",
                        "micro_batch_size", "global_batch_tokens"):
                if getattr(stage, key) is not None:
                    current[key] = getattr(stage, key)
            if stage.data is not None:
                current["prefixes"], current["weights"] = stage.data.prefixes, stage.data.weights
            if current["min_lr"] > current["lr"]:
                raise ConfigError(f"{where}: min_lr={current['min_lr']} exceeds lr={current['lr']}")
            if stage.upcycle is not None:
                layers, grown = current["num_layers"], stage.upcycle.to_layers
                if grown <= layers or grown % layers:
                    raise ConfigError(f"{where}: upcycle.to_layers={grown} must be a multiple of the {layers} layers "
                                      "in force, larger than them")
                current["num_layers"] = grown
            key = (current["seq_length"], tuple(current["prefixes"]), tuple(current["weights"] or ()))
            if data_key is not None and key != data_key:
                segment += 1
            data_key = key
            try:
                data = dataclasses.replace(base["data"], prefixes=list(current["prefixes"]), weights=current["weights"],
                                           seq_length=current["seq_length"], seed=base["data"].seed + segment)
            except ConfigError as e:
                raise ConfigError(f"{where}: data.{e}") from None
            phases = batch_phases(where, current["global_batch_tokens"], stage.batch_ramp, current["seq_length"],
                                  stage.train_steps, stage.train_tokens)
            steps = 0
            for phase_steps, samples in phases:
                self._phase_starts.append(start + steps)
                self._phase_samples.append(samples)
                steps += phase_steps
            schedule = stage.schedule if stage.schedule is not None else base["schedule"]
            self.states.append(StageState(
                index, stage.name, start, steps, current["loops"], current["entropy_beta"], current["rope_theta"],
                current["lr"], current["min_lr"], schedule, current["objective"], tuple(stage.freeze),
                current["seq_length"], current["micro_batch_size"], current["global_batch_tokens"], data, segment,
                current["num_layers"], stage.upcycle))
            self._anneal_from.append(previous_theta)
            self._anneal_steps.append(stage.rope_anneal_steps if stage.rope_anneal_tokens is None else
                                      _steps_to_read(phases, stage.rope_anneal_tokens, current["seq_length"]))
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

    def batch_samples(self, step: int) -> int:
        """Samples in the global batch of optimizer step `step`."""
        return self._phase_samples[bisect.bisect_right(self._phase_starts, step) - 1]

    def samples(self, first: int, end: int) -> int:
        """Samples read by the steps [first, end)."""
        total = 0
        for i, begin in enumerate(self._phase_starts):
            stop = self._phase_starts[i + 1] if i + 1 < len(self._phase_starts) else self.total_steps
            total += max(0, min(stop, end) - max(begin, first)) * self._phase_samples[i]
        return total

    def tokens(self, first: int, end: int) -> int:
        """Tokens read by the steps [first, end) (samples times each stage's sequence length)."""
        total = 0
        for i, begin in enumerate(self._phase_starts):
            stop = self._phase_starts[i + 1] if i + 1 < len(self._phase_starts) else self.total_steps
            total += max(0, min(stop, end) - max(begin, first)) * self._phase_samples[i] * self.at(begin).seq_length
        return total

    def segment_steps(self, segment: int) -> range:
        """The steps of a data segment."""
        states = [s for s in self.states if s.segment == segment]
        return range(states[0].start, states[-1].start + states[-1].steps)

    def batch_sizes(self) -> set[tuple[int, int, int]]:
        """Every (stage index, micro-batch size, global batch in samples) the run will use."""
        return {(self.at(begin).index, self.at(begin).micro_batch_size, samples)
                for begin, samples in zip(self._phase_starts, self._phase_samples)}

    def rope_theta(self, step: int) -> float:
        """The RoPE base at `step`: the stage's, or on the way there (geometric in the base, so the
        rotary wavelengths move evenly) during its first rope_anneal_steps."""
        state = self.at(step)
        span = self._anneal_steps[state.index]
        into = step - state.start
        if span == 0 or into >= span:
            return state.rope_theta
        old = self._anneal_from[state.index]
        return old * (state.rope_theta / old) ** ((into + 1) / span)
