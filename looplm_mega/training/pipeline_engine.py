"""The training engine of pipeline-parallel runs (parallel.pp > 1), in the place of DeepSpeed's.

DeepSpeed's PipelineEngine runs linear stages only (a looped stack unrolled through it would be
replicated on every stage) and forbids ZeRO-2/3 with pipelines, so pipelined runs use
parallel.pipeline (torch's interleaved 1F1B over the looped virtual stages) with:
- gradients averaged over the data-parallel group (one flat all-reduce per dtype);
- ZeRO-1-style sharding of the AdamW states over the data-parallel group
  (torch.distributed.optim.ZeroRedundancyOptimizer) when deepspeed.zero_stage is 1;
- the global gradient norm over the whole model (TP and PP ranks), clipping, and skipping of steps
  with a non-finite loss or gradient, as the DeepSpeed path does;
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
from looplm_mega.parallel.pipeline import LoopedPipeline
from looplm_mega.parallel.state import ParallelState
from looplm_mega.parallel.tensor_parallel import TensorParallel, global_grad_norm


def model_states_file(pp_rank: int, tp_rank: int) -> str:
    return f"pp_rank_{pp_rank:02d}_mp_rank_{tp_rank:02d}_model_states.pt"


def optim_states_file(pp_rank: int, tp_rank: int, dp_rank: int) -> str:
    return f"pp_rank_{pp_rank:02d}_mp_rank_{tp_rank:02d}_dp_rank_{dp_rank:03d}_optim_states.pt"


class PipelineEngine:
    def __init__(self, model: LoopLM, parallel: ParallelState, param_groups: list[dict], optimizer: dict,
                 zero_stage: int, grad_clip: float, device: torch.device, precision: str = "fp32"):
        self.module, self.parallel, self.device = model, parallel, device
        # bf16: autocast over fp32 weights (the residual stream between stages stays fp32).
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.tp = TensorParallel.from_state(parallel)
        self.grad_clip = grad_clip
        self.pipeline: Optional[LoopedPipeline] = None  # built by configure()
        self._pipeline_key = None
        adam = {"lr": optimizer["lr"], "betas": tuple(optimizer["betas"]), "eps": optimizer["eps"]}
        if zero_stage == 1 and parallel.dp > 1:
            self.optimizer = ZeroRedundancyOptimizer(param_groups, torch.optim.AdamW, process_group=parallel.dp_group, **adam)
            self._local_optimizer = self.optimizer.optim  # this rank's shard of the AdamW states
        else:
            self.optimizer = torch.optim.AdamW(param_groups, **adam)
            self._local_optimizer = self.optimizer
        self.sharded_optimizer = self._local_optimizer is not self.optimizer
        self.skipped_steps = 0

    def configure(self, micro_batches: int, micro_batch_shape: tuple[int, int], objective: str) -> bool:
        """(Re)build the schedule for this many micro-batches of this shape, the model's current loop
        count and entropy weight, and the objective: a curriculum stage may change any of them.
        True when it was rebuilt."""
        config = self.module.config
        key = (micro_batches, tuple(micro_batch_shape), objective, config.total_ut_steps, config.entropy_beta)
        if key == self._pipeline_key:
            return False
        self.pipeline = LoopedPipeline(self.module, self.parallel.pp_rank, self.parallel.pp, self.parallel.pp_group,
                                       micro_batches, micro_batch_shape, self.device, objective)
        self._pipeline_key = key
        return True

    def zero_optimization_stage(self) -> int:
        return 1 if self.sharded_optimizer else 0

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # --- one optimizer step -----------------------------------------------------------------------
    def train_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> dict:
        """Forward, backward and optimizer step over one global batch's share of this DP rank
        (micro-batches stacked along dim 0). Returns the step's metrics on every rank, with
        `skipped` True when the loss or the gradient norm was not finite (no update then)."""
        with self._autocast():
            metrics = self._from_last_stage(self.pipeline.train_step(input_ids, labels, segment_ids))
        self._average_gradients_over_data_parallel()
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = global_grad_norm(params, self.tp, self.parallel.pp_group if self.parallel.pp > 1 else None)
        metrics["grad_norm"] = norm
        metrics["skipped"] = not (math.isfinite(norm) and math.isfinite(metrics["loss"]))
        if metrics["skipped"]:
            self.skipped_steps += 1
        else:
            if self.grad_clip > 0 and norm > self.grad_clip:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(self.grad_clip / (norm + 1e-6))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def eval_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Mean CE of every loop over the micro-batches given (on every rank)."""
        with self._autocast():
            return self._from_last_stage(self.pipeline.eval_step(input_ids, labels, segment_ids))["ce_per_loop"]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _from_last_stage(self, metrics: dict) -> dict:
        """The last pipeline rank's metrics, on every rank of the pipeline."""
        steps = self.module.config.total_ut_steps
        values = torch.zeros(3 + 2 * steps, dtype=torch.float64)
        if metrics:
            values[:3] = torch.tensor([metrics["loss"], metrics["exit_entropy"], metrics["mean_exit_loop"]])
            values[3:3 + steps] = metrics["ce_per_loop"].double()
            values[3 + steps:] = metrics["gate_mean_per_loop"].double()
        if self.parallel.pp > 1:
            last = dist.get_global_rank(self.parallel.pp_group, self.parallel.pp - 1)
            dist.broadcast(values, src=last, group=self.parallel.pp_group)
        return {"loss": values[0].item(), "exit_entropy": values[1].item(), "mean_exit_loop": values[2].item(),
                "ce_per_loop": values[3:3 + steps].float(), "gate_mean_per_loop": values[3 + steps:].float()}

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
    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """DeepSpeed's signature (checkpoint.py calls both engines alike); `latest` is ours to write."""
        p, path = self.parallel, Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        if p.dp_rank == 0:
            torch.save({"module": self.module.state_dict()}, path / model_states_file(p.pp_rank, p.tp_rank))
        if p.dp_rank == 0 or self.sharded_optimizer:
            torch.save(self._local_optimizer.state_dict(), path / optim_states_file(p.pp_rank, p.tp_rank, p.dp_rank))

    def load_checkpoint(self, load_dir: str, tag: str):
        p, path = self.parallel, Path(load_dir) / tag
        model_file = path / model_states_file(p.pp_rank, p.tp_rank)
        optim_file = path / optim_states_file(p.pp_rank, p.tp_rank, p.dp_rank if self.sharded_optimizer else 0)
        for f in (model_file, optim_file):
            if not f.exists():
                raise RuntimeError(f"{f}: missing; was the checkpoint written with another parallel layout "
                                   "(parallel.tp / parallel.pp / data-parallel size)? Continue from a "
                                   "consolidated model with training.init_from instead")
        self.module.load_state_dict(torch.load(model_file, map_location=self.device, weights_only=False)["module"])
        self._local_optimizer.load_state_dict(torch.load(optim_file, map_location=self.device, weights_only=False))
        return str(path), None
