"""Metrics of a run, to three places: a progress line on the console, a JSONL file in the run
directory (one JSON object per logged step), and Weights & Biases (offline unless told otherwise,
since compute nodes often have no network; `wandb sync` uploads later)."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Optional

from looplm_mega.training.config import WandbConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Only the main process writes; every process may call `log` (others do nothing)."""

    def __init__(self, run_dir: str | Path, total_steps: int, is_main: bool, wandb: WandbConfig,
                 config: Optional[dict] = None, start_step: int = 0):
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if wandb.mode != "disabled":
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=wandb.project, name=wandb.name, mode=wandb.mode,
                                             dir=str(run_dir), config=config, resume="allow")
            except Exception as e:  # a metrics sink must never stop training
                warnings.warn(f"wandb could not start ({e}); metrics go to the console and {self.path} only")

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("inf")
        return (time.perf_counter() - self.start_time) / done * (self.total_steps - step)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.is_main:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in _flatten(metrics).items()}, step=step)
        print(self.console_line(step, metrics, prefix), flush=True)

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
        if self._wandb is not None:
            self._wandb.finish()


def _flatten(metrics: dict) -> dict:
    """Lists (per-loop values) become one scalar each: ce_per_loop -> ce_per_loop/1, /2, ..."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}/{i + 1}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat
