"""The training engine of pipeline-parallel runs (parallel.pp > 1), in the place of DeepSpeed's.

DeepSpeed's PipelineEngine runs linear stages only (a looped stack unrolled through it would be
replicated on every stage) and forbids ZeRO-2/3 with pipelines, so pipelined runs use
parallel.pipeline (torch's interleaved 1F1B over the looped virtual stages) with:
- gradients averaged over the data-parallel group (one flat all-reduce per dtype);
- ZeRO-1-style sharding of the AdamW states over the data-parallel group
  (torch.distributed.optim.ZeroRedundancyOptimizer) when deepspeed.zero_stage is 1;
- the global gradient norm over the whole model (TP and PP ranks), clipping, and skipping of steps
  with a non-finite loss or gradient (training/engine.py's rule for every engine);
- checkpoints of this rank's part: the model states once per (PP, TP) rank, optimizer states per
  data-parallel rank, under names consolidation understands.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from looplm_mega.model import LoopLM
from looplm_mega.model.losses import Objective
from looplm_mega.parallel.pipeline import LoopedPipeline
from looplm_mega.parallel.state import ParallelState
from looplm_mega.parallel.tensor_parallel import TensorParallel, global_grad_norm
from looplm_mega.training.config import RunConfig
from looplm_mega.training.distributed import is_main
from looplm_mega.training.engine import Engine, Layout
from looplm_mega.training.metrics import StepMetrics


def model_states_file(pp_rank: int, tp_rank: int) -> str:
    return f"pp_rank_{pp_rank:02d}_mp_rank_{tp_rank:02d}_model_states.pt"


def optim_states_file(pp_rank: int, tp_rank: int, dp_rank: int) -> str:
    return f"pp_rank_{pp_rank:02d}_mp_rank_{tp_rank:02d}_dp_rank_{dp_rank:03d}_optim_states.pt"


class PipelineEngine(Engine):
    def __init__(self, model: LoopLM, param_groups: list[dict], config: RunConfig, parallel: ParallelState,
                 device: torch.device, micro_batch_size: int = 1, micro_batches: int = 1):
        self.module, self.config, self.parallel, self.device = model, config, parallel, device
        # bf16: autocast over fp32 weights (the residual stream between stages stays fp32).
        self.autocast_dtype = torch.bfloat16 if config.training.precision == "bf16" else None
        self.tp = TensorParallel.from_state(parallel)
        self.grad_clip = config.optimizer.grad_clip
        self.pipeline: Optional[LoopedPipeline] = None  # built by configure()
        self._pipeline_key = None
        opt = config.optimizer
        adam = {"lr": opt.lr, "betas": tuple(opt.betas), "eps": opt.eps}
        if config.deepspeed.resolved_zero_stage() == 1 and parallel.dp > 1:
            self.optimizer = ZeroRedundancyOptimizer(param_groups, torch.optim.AdamW, process_group=parallel.dp_group, **adam)
            self._local_optimizer = self.optimizer.optim  # this rank's shard of the AdamW states
        else:
            self.optimizer = torch.optim.AdamW(param_groups, **adam)
            self._local_optimizer = self.optimizer
        self.sharded_optimizer = self._local_optimizer is not self.optimizer
        self._skipped_steps = 0

    def configure(self, micro_batch_size: int, micro_batches: int, seq_length: int, objective: Objective) -> None:
        """(Re)build the schedule when the micro-batches' number or shape, the model's loop count or
        entropy weight, or the objective change (a curriculum stage may change any of them)."""
        config = self.module.config
        key = (micro_batches, micro_batch_size, seq_length, objective, config.total_ut_steps, config.entropy_beta)
        if key == self._pipeline_key:
            return
        self.pipeline = LoopedPipeline(self.module, self.parallel.pp_rank, self.parallel.pp, self.parallel.pp_group,
                                       micro_batches, (micro_batch_size, seq_length), self.device, objective)
        self._pipeline_key = key
        if is_main():
            print(f"pipeline: interleaved 1F1B over {config.total_ut_steps * self.parallel.pp} virtual stages, "
                  f"{micro_batches} micro-batches, analytic bubble {self.pipeline.bubble_fraction:.1%}", flush=True)

    @classmethod
    def layout_for(cls, config: RunConfig, parallel: ParallelState) -> Layout:
        sharded = config.deepspeed.resolved_zero_stage() == 1 and parallel.dp > 1
        return Layout(parallel.dp, parallel.tp, parallel.pp, 1 if sharded else 0, parallel.sequence_parallel)

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    # --- one optimizer step -----------------------------------------------------------------------
    def train_batch(self, micro_batches: list[dict]) -> StepMetrics:
        """Forward, backward and optimizer step over one global batch's share of this DP rank. The
        schedule interleaves the micro-batches' forwards and backwards, so a non-finite loss or
        gradient norm skips the whole step."""
        with self._autocast():
            readouts = self.pipeline.train_step(*self._stacked(micro_batches))
        metrics = self._from_last_rank(readouts, len(micro_batches))
        self._average_gradients_over_data_parallel()
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = global_grad_norm(params, self.tp, self.parallel.pp_group if self.parallel.pp > 1 else None)
        metrics.grad_norm = norm
        metrics.skipped = not (math.isfinite(norm) and math.isfinite(metrics.loss))
        metrics.tokens = sum(b["input_ids"].numel() for b in micro_batches)
        if metrics.skipped:
            self._skipped_steps += 1
        else:
            if self.grad_clip > 0 and norm > self.grad_clip:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(self.grad_clip / (norm + 1e-6))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def eval_batch(self, micro_batches: list[dict]) -> torch.Tensor:
        self.module.eval()
        try:
            with self._autocast():
                readouts = self.pipeline.eval_step(*self._stacked(micro_batches))
            return torch.tensor(self._from_last_rank(readouts, 1).ce_per_loop)  # sums over the micro-batches
        finally:
            self.module.train()

    def _stacked(self, micro_batches: list[dict]) -> tuple:
        """The micro-batches stacked along the batch dimension (the schedule splits them again)."""
        def cat(key):
            return torch.cat([b[key] for b in micro_batches]).to(self.device) if key in micro_batches[0] else None
        return cat("input_ids"), cat("labels"), cat("segment_ids")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _from_last_rank(self, readouts: list, micro_batches: int) -> StepMetrics:
        """The step's metrics from the last pipeline rank's read-outs, on every rank of the pipeline."""
        loops = self.module.config.total_ut_steps
        values = torch.zeros(3 + 2 * loops, dtype=torch.float64)
        if readouts:
            m = StepMetrics.from_readouts(readouts, loops, micro_batches)
            values[:] = torch.tensor([m.loss, m.exit_entropy, m.mean_exit_loop, *m.ce_per_loop, *m.gate_mean_per_loop])
        if self.parallel.pp > 1:
            last = dist.get_global_rank(self.parallel.pp_group, self.parallel.pp - 1)
            dist.broadcast(values, src=last, group=self.parallel.pp_group)
        values = values.tolist()
        return StepMetrics(loss=values[0], exit_entropy=values[1], mean_exit_loop=values[2],
                           ce_per_loop=values[3:3 + loops], gate_mean_per_loop=values[3 + loops:], grad_norm=math.nan,
                           micro_batches=micro_batches, pipeline_bubble=self.pipeline.bubble_fraction)

    def _average_gradients_over_data_parallel(self) -> None:
        if self.parallel.dp == 1:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.flatten() for g in same])
            dist.all_reduce(flat, group=self.parallel.dp_group)
            flat /= self.parallel.dp
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # --- checkpoints ------------------------------------------------------------------------------
    def save(self, checkpoint_dir: Path, tag: str) -> list[Path]:
        p, path = self.parallel, Path(checkpoint_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        written = []
        if p.dp_rank == 0:
            written.append(path / model_states_file(p.pp_rank, p.tp_rank))
            torch.save({"module": self.module.state_dict()}, written[-1])
        if p.dp_rank == 0 or self.sharded_optimizer:
            written.append(path / optim_states_file(p.pp_rank, p.tp_rank, p.dp_rank))
            torch.save(self._local_optimizer.state_dict(), written[-1])
        return written

    def load(self, checkpoint_dir: Path, tag: str) -> None:
        p, path = self.parallel, Path(checkpoint_dir) / tag
        model_file = path / model_states_file(p.pp_rank, p.tp_rank)
        optim_file = path / optim_states_file(p.pp_rank, p.tp_rank, p.dp_rank if self.sharded_optimizer else 0)
        for f in (model_file, optim_file):
            if not f.exists():
                raise RuntimeError(f"{f}: missing; was the checkpoint written with another parallel layout "
                                   "(parallel.tp / parallel.pp / data-parallel size)? Continue from a "
                                   "consolidated model with training.init_from instead")
        self.module.load_state_dict(torch.load(model_file, map_location=self.device, weights_only=False)["module"])
        self._local_optimizer.load_state_dict(torch.load(optim_file, map_location=self.device, weights_only=False))
