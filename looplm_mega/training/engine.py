"""What the trainer needs of a training engine, and the rules every engine keeps.

An engine owns this rank's model (its TP shard and pipeline part), the optimizer and the
gradient's way from the loss to the update. Two implement this interface: DeepSpeedEngine
(training/deepspeed_engine.py, ZeRO 0-3, any TP) and PipelineEngine (training/pipeline_engine.py,
the looped pipeline for PP > 1). The trainer picks one when it builds and talks to it only
through these methods, so a new engine (or a parallel dimension inside one) touches no trainer
code.

Rules every engine keeps:
- One optimizer step per `train_batch`: the step's micro-batches in, StepMetrics out (means over
  the micro-batches, the same on every rank of a model replica).
- Non-finite losses and gradients: if the loss of any micro-batch or the gradient norm is not
  finite on any rank, the whole step is skipped on every rank (no update; the step's samples are
  consumed, not replayed) and StepMetrics.skipped says so. The trainer counts skipped steps and
  stops the run after training.max_nonfinite_steps of them in a row.
- Checkpoints: `save` writes this rank's files into the checkpoint's directory and nothing else,
  and says which; `load` reads them back, exactly, at the layout they were written at
  (training/checkpoint.py owns directories, manifests, `latest` and pruning; the trainer converts
  a checkpoint of another layout).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from looplm_mega.model import LoopLM
from looplm_mega.model.losses import Objective
from looplm_mega.parallel.build import Place
from looplm_mega.parallel.state import ParallelState
from looplm_mega.training.config import RunConfig
from looplm_mega.training.metrics import StepMetrics


@dataclass(frozen=True)
class Layout:
    """How a run's ranks are laid out: what a checkpoint's files depend on."""

    dp: int
    tp: int
    pp: int
    zero_stage: int
    sequence_parallel: bool = False
    # ZeRO-3's optimizer sub-group size shapes its optimizer files (None: not ZeRO-3, or a
    # checkpoint from before it was recorded, which is then converted like any other layout).
    sub_group_size: Optional[int] = None

    def __str__(self) -> str:
        sp = " with SP" if self.sequence_parallel else ""
        sub_groups = f" (optimizer sub-groups of {self.sub_group_size:,})" if self.sub_group_size else ""
        return f"TP={self.tp}{sp} x PP={self.pp} x DP={self.dp}, ZeRO-{self.zero_stage}{sub_groups}"


class Engine(ABC):
    module: LoopLM  # this rank's model
    optimizer: torch.optim.Optimizer  # its param_groups are the parameter groups the trainer made
    config: RunConfig
    parallel: ParallelState

    @abstractmethod
    def configure(self, micro_batch_size: int, micro_batches: int, seq_length: int, objective: Objective) -> None:
        """Set the shape of the next steps (a curriculum stage may change any of it, and the model's
        loop count and entropy weight, which the engine reads from module.config)."""

    @abstractmethod
    def train_batch(self, micro_batches: list[dict]) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (input_ids, labels, segment_ids)."""

    @abstractmethod
    def eval_batch(self, micro_batches: list[dict]) -> torch.Tensor:
        """The CE of every loop [T], summed over the micro-batches' means (the same on every rank
        of a model replica), without gradients."""

    @abstractmethod
    def save(self, checkpoint_dir: Path, tag: str) -> list[Path]:
        """Write this rank's model and optimizer files into checkpoint_dir/tag; returns their paths
        (the checkpoint's manifest lists them with their checksums)."""

    @abstractmethod
    def load(self, checkpoint_dir: Path, tag: str) -> None:
        """Read this rank's files of checkpoint_dir/tag back into the model and optimizer."""

    @classmethod
    @abstractmethod
    def layout_for(cls, config: RunConfig, parallel: ParallelState) -> Layout:
        """The layout this engine runs a config at (known before it is built: a checkpoint written
        at another one is converted first)."""

    @classmethod
    def placement(cls, config: RunConfig, parallel: ParallelState, device: torch.device, micro_batch_size: int,
                  micro_batches: int) -> Optional[Place]:
        """What becomes of each module's parameters as soon as the model builder has given them
        their values (parallel/build.py), before the engine exists; None: they stay whole on the
        host until the engine takes the model."""
        return None

    def layout(self) -> Layout:
        return self.layout_for(self.config, self.parallel)

    @property
    @abstractmethod
    def skipped_steps(self) -> int:
        """Optimizer steps skipped since the engine was built."""

    def set_lr(self, lr: float, stage_index: int) -> None:
        """The learning rate of the next step; parameter groups frozen in curriculum stage
        `stage_index` get lr and weight decay 0 (training/optimizer.parameter_groups)."""
        for group in self.optimizer.param_groups:
            frozen = stage_index in group.get("frozen_in", ())
            group["lr"] = 0.0 if frozen else lr
            group["weight_decay"] = 0.0 if frozen else group.get("base_weight_decay", group["weight_decay"])

    def close(self) -> None:
        """Release what the engine holds before another one is built (an upcycle rebuilds it)."""
