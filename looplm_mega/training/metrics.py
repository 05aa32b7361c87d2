"""Metrics of a run: what one optimizer step measured (StepMetrics, from the engine), and where the
records go. Each record is written, the same, to four places: a progress line on the console, a
JSONL file in the run directory (one JSON object per logged step), TensorBoard event files
(run_dir/tensorboard) and Weights & Biases (offline unless told otherwise, since compute nodes
often have no network; `wandb sync` uploads later).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from looplm_mega.model.losses import LoopTerms
from looplm_mega.training.config import WandbConfig


@dataclass
class StepMetrics:
    """One optimizer step, from the engine to the log line, the JSONL file, TensorBoard and wandb.
    The engine fills the first block with this rank's means over the step's micro-batches; a log
    window averages steps and ranks (`merge`) and the trainer adds the run's context."""

    loss: float
    ce_per_loop: list[float]  # mean CE of each loop's read-out
    exit_entropy: float  # mean H(p) of the exit distribution
    mean_exit_loop: float  # mean E[t], loops counted from 1
    gate_mean_per_loop: list[float]  # mean lambda_t of each loop
    grad_norm: float = math.nan  # before clipping; NaN or inf when the step was skipped
    skipped: bool = False  # no update: the loss or the gradient was not finite
    micro_batches: int = 1  # of this rank in the step
    tokens: int = 0  # of this rank in the step
    pipeline_bubble: Optional[float] = None  # the schedule's analytic idle fraction (pipelined runs)
    # Filled by the trainer for the log line.
    lr: Optional[float] = None
    step_seconds: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops_per_device: Optional[float] = None
    mfu: Optional[float] = None
    memory_gb: Optional[float] = None
    skipped_steps: Optional[int] = None  # in the whole run
    consumed_samples: Optional[int] = None
    consumed_tokens: Optional[int] = None
    stage: Optional[dict] = None  # the curriculum stage's settings in force (runs with a curriculum)

    @classmethod
    def from_readouts(cls, readouts: Sequence[tuple[int, LoopTerms]], num_loops: int, micro_batches: int,
                      **measured) -> "StepMetrics":
        """Means over `micro_batches` of the read-outs (first loop, terms) of a step: each micro-batch's
        loops once, whole (the model's forward) or one loop at a time (a pipeline)."""
        ce, gates = torch.zeros(num_loops, dtype=torch.float64), torch.zeros(num_loops, dtype=torch.float64)
        scalars = torch.zeros(3, dtype=torch.float64)  # loss, entropy, exit loop
        for first, terms in readouts:
            loops = slice(first, first + len(terms.ce_per_loop))
            ce[loops] += terms.ce_per_loop.detach().double().cpu()
            gates[loops] += terms.gate_mean_per_loop.double().cpu()
            scalars += torch.stack([terms.loss.detach(), terms.exit_entropy, terms.mean_exit_loop]).double().cpu()
        ce, gates, scalars = ce / micro_batches, gates / micro_batches, scalars / micro_batches
        return cls(loss=scalars[0].item(), ce_per_loop=ce.tolist(), exit_entropy=scalars[1].item(),
                   mean_exit_loop=scalars[2].item(), gate_mean_per_loop=gates.tolist(), micro_batches=micro_batches,
                   **measured)

    @classmethod
    def merge(cls, steps: Sequence["StepMetrics"], group=None) -> "StepMetrics":
        """The window's steps on every rank of `group`: the measured values averaged over all their
        micro-batches (a skipped step's non-finite loss shows), the gradient norm over the steps
        (the same on every rank), micro-batches summed over the ranks, tokens over this rank's steps."""
        num_loops = len(steps[-1].ce_per_loop)
        values = torch.zeros(4 + 2 * num_loops, dtype=torch.float64)
        for s in steps:
            values[:3] += torch.tensor([s.loss, s.exit_entropy, s.mean_exit_loop]) * s.micro_batches
            values[3] += s.micro_batches
            values[4:4 + num_loops] += torch.tensor(s.ce_per_loop) * s.micro_batches
            values[4 + num_loops:] += torch.tensor(s.gate_mean_per_loop) * s.micro_batches
        if dist.is_initialized():
            dist.all_reduce(values, group=group)
        mean = values / values[3]
        return cls(loss=mean[0].item(), exit_entropy=mean[1].item(), mean_exit_loop=mean[2].item(),
                   ce_per_loop=mean[4:4 + num_loops].tolist(), gate_mean_per_loop=mean[4 + num_loops:].tolist(),
                   grad_norm=sum(s.grad_norm for s in steps) / len(steps), skipped=all(s.skipped for s in steps),
                   micro_batches=int(values[3].item()), tokens=sum(s.tokens for s in steps),
                   pipeline_bubble=steps[-1].pipeline_bubble)

    def record(self) -> dict:
        """The logged form: every field that is set, the stage's settings inline."""
        record = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("skipped", "micro_batches", "tokens", "stage") and getattr(self, f.name) is not None}
        return {**(self.stage or {}), **record}


@dataclass
class ValidationMetrics:
    ce_per_loop: list[float]  # mean validation CE of each loop's read-out
    consumed_tokens: Optional[int] = None  # the run's training tokens so far
    stage: Optional[str] = None  # the curriculum stage it was measured in (runs with a curriculum)
    loss: float = field(init=False)  # the last loop's CE

    def __post_init__(self):
        self.loss = self.ce_per_loop[-1]

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Only the main process writes; every process may call `log` (others do nothing)."""

    def __init__(self, run_dir: str | Path, total_steps: int, is_main: bool, wandb: WandbConfig,
                 config: Optional[dict] = None, start_step: int = 0, tensorboard: bool = True):
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._tensorboard = self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _forget_steps_after(self.path, start_step)
        self._file = self.path.open("a", encoding="utf-8")
        # A metrics sink must never stop training: one that cannot start is reported and left out.
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except Exception as e:
                warnings.warn(f"TensorBoard could not start ({e}); metrics go to the other sinks")
        if wandb.mode != "disabled":
            try:
                import wandb as wandb_lib

                # One wandb run for the whole run directory, across restarts and requeues.
                run_id = Path(run_dir) / "wandb_run_id"
                if not run_id.exists():
                    _write_atomically(run_id, wandb_lib.util.generate_id())
                self._wandb = wandb_lib.init(project=wandb.project, name=wandb.name, mode=wandb.mode, dir=str(run_dir),
                                             config=config, id=run_id.read_text().strip(), resume="allow")
            except Exception as e:
                warnings.warn(f"wandb could not start ({e}); metrics go to the other sinks")

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("inf")
        return (time.perf_counter() - self.start_time) / done * (self.total_steps - step)

    def log(self, step: int, metrics: StepMetrics | ValidationMetrics | dict, prefix: str = "train") -> None:
        if not self.is_main:
            return
        values = metrics if isinstance(metrics, dict) else metrics.record()
        self._file.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **values}) + "\n")
        self._file.flush()
        scalars = {f"{prefix}/{k}": v for k, v in _flatten(values).items() if isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        print(self.console_line(step, values, prefix), flush=True)

    def console_line(self, step: int, metrics: dict, prefix: str) -> str:
        parts = [f"[{prefix}] step {step}/{self.total_steps}"]
        for key, value in metrics.items():
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            elif isinstance(value, list):
                parts.append(f"{key} " + "/".join(f"{v:.3f}" for v in value))
            else:
                parts.append(f"{key} {value}")
        if prefix == "train":
            parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _forget_steps_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (the resumed one), which an attempt that was lost
    after its last checkpoint logged: every step appears once, as after a clean run."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
        _write_atomically(path, "".join(kept))


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: dropped with the lost steps


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _flatten(metrics: dict) -> dict:
    """Lists (per-loop values) become one scalar each, loops counted from 1: ce_per_loop -> ce_per_loop/1, /2, ..."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}/{i + 1}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat
