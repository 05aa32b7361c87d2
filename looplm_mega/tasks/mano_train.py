"""Train one LoopLM on Mano in this process (no DeepSpeed, no launcher) and measure its test
accuracy; plus the sweep grid and the CSV that tools/mano_sweep.py and tools/mano_collect.py share.

The model is LoopLM itself, trained on the last loop's answer (or, with objective="stage1", on
Ouro's Stage I loss over all loops) with AdamW (weight decay 0.1 on matrices, as in the paper),
linear warm-up and cosine decay, on training data that never contains a test expression
(mano.MANO's held_out). Accuracy is read from every loop; the last loop's is the model's answer
without early exit.
"""

from __future__ import annotations

import csv
import fcntl
import io
import itertools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from looplm_mega.model import LoopLM, LoopLMConfig
from looplm_mega.tasks import mano
from looplm_mega.training.config import OptimizerConfig, ScheduleConfig
from looplm_mega.training.metrics import format_duration
from looplm_mega.training.optimizer import parameter_groups
from looplm_mega.training.schedules import learning_rate

# The columns of a result row, in order (one row per trained model).
# accuracy: the last loop's; loop_accuracy: after each loop, "/"-separated; baseline: the share of
# the test set's most common answer (what always answering it scores); excluded: training draws
# redrawn because they were test expressions; seconds: wall time; cpu_seconds: the process's CPU
# time (the cost of the run, whatever else loads the machine).
CSV_FIELDS = ("config", "layers", "loops", "depth", "max_ops", "modulus", "hidden_size", "objective", "seed", "lr",
              "steps", "batch_size", "accuracy", "loop_accuracy", "baseline", "final_loss", "excluded", "params",
              "seconds", "cpu_seconds")
OBJECTIVES = ("last", "stage1")


@dataclass
class ManoRun:
    """One training run. The defaults are the looped arm of the CPU study (tools/mano_sweep.py,
    README "Mano") at the middle of its learning rates."""

    layers: int = 2
    loops: int = 3
    # L: training draws 1..L operators, the test uses exactly L. 5 is the smallest L at which the
    # expressions with L operators over Z_3 (7.4 million) dwarf a CPU run's training draws with L
    # operators (1,500 x 128 / 5 = 38,400).
    max_ops: int = 5
    # 23 in the paper; 3 leaves a CPU run's budget to composing operators rather than memorising
    # F_23's tables (mano.py).
    modulus: int = 3
    seed: int = 0  # model initialisation and training data
    lr: float = 3e-3
    steps: int = 1500
    batch_size: int = 128  # the paper's
    hidden_size: int = 64
    num_heads: int = 4
    intermediate_size: Optional[int] = None  # None: 2 x hidden_size (measured, seed 0: no worse than 4x, faster)
    weight_decay: float = 0.1
    warmup_steps: Optional[int] = None  # None: 10% of the steps, at most 200
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this
    # Stage I's entropy bonus (objective "stage1" only) keeps exit mass on every loop.
    entropy_beta: float = 0.1
    # LoopLMConfig's post-sublayer norm scale at initialisation. Measured (1 layer, single
    # operators): 1.0 learns the operator tables a little faster than Ouro's 0.05, which starts
    # each loop near identity for the sake of deep models.
    sublayer_norm_init: float = 1.0
    # "last": cross-entropy of the last loop's answer only, as looped transformers are usually
    # trained on reasoning tasks: the earlier loops are free to compute instead of answering.
    # "stage1": Ouro's objective, every loop's read-out weighted by the exit gate.
    objective: Literal["last", "stage1"] = "last"
    test_size: int = 2000
    test_seed: int = mano.DEFAULT_TEST_SEED

    def __post_init__(self):
        for name in ("layers", "loops", "max_ops", "steps", "batch_size", "hidden_size", "num_heads", "test_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        mano.check_modulus(self.modulus)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} must be one of {OBJECTIVES}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")

    @property
    def config_name(self) -> str:
        return f"{self.layers}x{self.loops}"

    def model_config(self) -> LoopLMConfig:
        return LoopLMConfig(
            vocab_size=mano.vocab_size(self.max_ops), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size or 2 * self.hidden_size,
            num_hidden_layers=self.layers, num_attention_heads=self.num_heads,
            max_position_embeddings=mano.seq_len(self.max_ops), rope_theta=10_000.0,
            total_ut_steps=self.loops, entropy_beta=self.entropy_beta,
            sublayer_norm_init=self.sublayer_norm_init, make_vocab_size_divisible_by=8,
        )


def parse_shape(text: str) -> tuple[int, int]:
    """'2x4' -> (2 layers, 4 loops)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"model config {text!r} is not LAYERSxLOOPS with positive numbers (e.g. 2x4)")
    return int(match[1]), int(match[2])


def mano_loss(model: LoopLM, batch: mano.ManoBatch, objective: str) -> torch.Tensor:
    if objective == "stage1":
        return model(batch.input_ids, labels=batch.labels).loss
    last = model(batch.input_ids).hidden_states[-1]
    at_answer = last[torch.arange(len(batch)), batch.answer_positions]
    return F.cross_entropy(model.lm_head(at_answer).float(), batch.answers)


def train_mano(run: ManoRun, log: Optional[Callable[[str], None]] = print, log_every: int = 100,
               eval_every: int = 0) -> dict:
    """Train one model and return its CSV row (CSV_FIELDS). `log` receives a progress line every
    `log_every` steps (None: silent), with the test accuracy every `eval_every` steps (0: only at
    the end; a learning curve costs a forward pass over the test set each time)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(run.seed)
    model = LoopLM(run.model_config())
    test = mano.make_test_set(run.max_ops, run.test_size, run.test_seed, run.modulus)
    data = mano.MANO(run.max_ops, run.batch_size, seed=run.seed, modulus=run.modulus, held_out=test)
    warmup = run.warmup_steps if run.warmup_steps is not None else min(200, run.steps // 10)
    optim_config = OptimizerConfig(lr=run.lr, min_lr=run.lr * run.min_lr_ratio, weight_decay=run.weight_decay)
    schedule = ScheduleConfig(kind="cosine", warmup_steps=warmup)
    optimizer = torch.optim.AdamW(parameter_groups(model, run.weight_decay), lr=run.lr,
                                  betas=tuple(optim_config.betas), eps=optim_config.eps)
    model.train()
    recent: list[float] = []
    loss_value = math.nan
    excluded = 0
    for step in range(run.steps):
        lr = learning_rate(step, run.steps, optim_config, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.batch(step)
        excluded += batch.excluded
        loss = mano_loss(model, batch, run.objective)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_config.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        recent.append(loss_value)
        done = step + 1
        if log is not None and (done % log_every == 0 or done == run.steps):
            elapsed = time.perf_counter() - start
            rate = done / elapsed
            log(f"[{run.config_name} L={run.max_ops} seed={run.seed} lr={run.lr:g}] step {done}/{run.steps} "
                f"loss {sum(recent) / len(recent):.4f} lr {lr:.2e} {rate:.1f} it/s "
                f"ETA {format_duration((run.steps - done) / rate)}")
            recent.clear()
            if eval_every and done % eval_every == 0 and done != run.steps:
                log(f"[{run.config_name} L={run.max_ops} seed={run.seed} lr={run.lr:g}] step {done} test accuracy "
                    + " / ".join(f"{a:.3f}" for a in mano.loop_accuracies(model, test)))
    accuracies = mano.loop_accuracies(model, test)
    seconds = time.perf_counter() - start
    if log is not None:
        per_loop = " / ".join(f"{a:.3f}" for a in accuracies)
        log(f"[{run.config_name} L={run.max_ops} seed={run.seed} lr={run.lr:g}] test accuracy (loops 1..T): "
            f"{per_loop} in {format_duration(seconds)}")
    return {
        "config": run.config_name, "layers": run.layers, "loops": run.loops, "depth": run.layers * run.loops,
        "max_ops": run.max_ops, "modulus": run.modulus, "hidden_size": run.hidden_size,
        "objective": run.objective, "seed": run.seed, "lr": run.lr,
        "steps": run.steps, "batch_size": run.batch_size, "accuracy": round(accuracies[-1], 5),
        "loop_accuracy": "/".join(f"{a:.4f}" for a in accuracies),
        "baseline": round(test.answers.bincount().max().item() / len(test), 5), "final_loss": round(loss_value, 5),
        "excluded": excluded, "params": model.num_parameters(), "seconds": round(seconds, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),
    }


def sweep_grid(shapes: Sequence[str], max_ops: Sequence[int], objectives: Sequence[str], lrs: Sequence[float],
               steps: Sequence[int], seeds: Sequence[int], **common) -> list[ManoRun]:
    """Every combination, in this fixed order (the last varies fastest): shape, L, objective, lr,
    steps, seed; except that a one-loop shape runs with the first objective only, since with one
    loop both objectives are the same loss. Task id i of a job array is entry i. `common`: the
    other ManoRun fields."""
    runs = []
    for shape, ops, objective, lr, num_steps, seed in itertools.product(shapes, max_ops, objectives, lrs, steps, seeds):
        layers, loops = parse_shape(shape)
        if loops == 1 and objective != objectives[0]:
            continue
        runs.append(ManoRun(layers=layers, loops=loops, max_ops=ops, objective=objective, lr=lr, steps=num_steps,
                            seed=seed, **common))
    return runs


def append_row(path: str | Path, row: dict) -> None:
    """Append one result row; the header is written only into an empty file. Many jobs may append
    to one CSV: an exclusive lock (where the filesystem supports it) keeps the header single, and
    each row goes out in one write + flush + fsync, so rows never interleave. Should a filesystem
    lack locks and two first rows race, the collector skips a repeated header."""
    missing = [f for f in CSV_FIELDS if f not in row]
    if missing:
        raise ValueError(f"result row lacks the columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this filesystem: single-write rows still do not interleave
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if f.seek(0, os.SEEK_END) == 0:
            writer.writeheader()
        writer.writerow(row)
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
