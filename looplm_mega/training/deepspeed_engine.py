"""The DeepSpeed engine (ZeRO 0-3, optimizer offload, tensor parallelism through the mpu): the
engine of every run without pipeline parallelism. The model runs micro-batch by micro-batch;
DeepSpeed accumulates, reduces, clips and steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import deepspeed
import torch
from torch import nn

from looplm_mega.config import merge
from looplm_mega.model import LoopLM
from looplm_mega.model.losses import Objective
from looplm_mega.parallel.build import Place
from looplm_mega.parallel.state import ParallelState
from looplm_mega.parallel.tensor_parallel import TensorParallel, global_grad_norm
from looplm_mega.training.config import RunConfig
from looplm_mega.training.distributed import is_main
from looplm_mega.training.engine import Engine, Layout
from looplm_mega.training.metrics import StepMetrics
from looplm_mega.training.zero3 import hand_gradients_to_zero3, release_after_each_call, share_master_weights


DEEPSPEED_SUB_GROUP_SIZE = 10**9  # DeepSpeed's default, where a DeepSpeed JSON names none


def zero_sizes(hidden_size: int, zero_stage: int, looped: bool) -> dict:
    """ZeRO's buffers sized from the model. DeepSpeed's defaults are sized for models far larger
    than their buffers' share of memory (5e8-element buckets: 2 GB each in fp32 on every rank).
    - buckets (reduce, all-gather; ZeRO-3's prefetch and persistence), as the Hugging Face
      integration's "auto" values;
    - ZeRO-3's reuse distance: a gathered parameter used again within this many elements of other
      parameters is kept whole. DeepSpeed's default (1e9) keeps every layer of a looped stack
      smaller than that gathered from one loop to the next, i.e. the whole stack on every rank; at
      hidden^2 each layer is released after its use, as ZeRO-3 means;
    - ZeRO-3's prefetch, off for a looped model: the prefetcher steps over parameters that are
      gathered already without counting them against its bucket, and keeps each for its next use
      in the trace; in a loop that next use is the next loop, so from the second step on the whole
      stack stays gathered (measured: README, "Memory per rank");
    - ZeRO-3's optimizer sub-groups: the step flattens each sub-group's gradients into a fresh
      copy and Adam forms temporaries of its size; with DeepSpeed's default (1e9 elements) that
      is the whole partition at once."""
    sizes = {"reduce_bucket_size": hidden_size**2, "allgather_bucket_size": hidden_size**2}
    if zero_stage == 3:
        sizes.update(stage3_prefetch_bucket_size=0 if looped else int(0.9 * hidden_size**2),
                     stage3_param_persistence_threshold=10 * hidden_size,
                     stage3_max_reuse_distance=hidden_size**2, sub_group_size=hidden_size**2)
    return sizes


def deepspeed_config(config: RunConfig, micro_batch_size: int, gradient_accumulation_steps: int, device: torch.device) -> dict:
    """Our run config as DeepSpeed's; the batch is the first step's (configure() resets it per step).
    Without a DeepSpeed JSON, ZeRO's buffers are sized from the model (zero_sizes); a JSON's or
    the inline keys' own sizes win."""
    section, opt = config.deepspeed, config.optimizer
    zero: dict = {"stage": section.resolved_zero_stage()}
    if section.config_file is None and zero["stage"] > 0:
        model = config.model_config()
        zero.update(zero_sizes(model.hidden_size, zero["stage"], model.total_ut_steps > 1))
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if section.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": opt.grad_clip,
        # torch's AdamW on a CPU-only run (offloading there moves nothing, and DeepSpeed's CPU Adam
        # would be compiled first); on GPUs DeepSpeed's fused Adam, or its CPU Adam for the
        # offloaded optimizer states.
        "optimizer": {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay,
            "torch_adam": device.type == "cpu"}},
        "zero_optimization": zero,
        "bf16": {"enabled": config.training.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }
    return merge(merge(section.file_config(), ours), section.extra)


class DeepSpeedEngine(Engine):
    def __init__(self, model: LoopLM, param_groups: list[dict], config: RunConfig, parallel: ParallelState,
                 device: torch.device, micro_batch_size: int, micro_batches: int):
        self.module, self.config, self.parallel, self.device = model, config, parallel, device
        self.tp = TensorParallel.from_state(parallel)
        ds_config = deepspeed_config(config, micro_batch_size, micro_batches, device)
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config,
                                                mpu=parallel if parallel.tp > 1 else None)
        self.optimizer = self.ds.optimizer
        self.zero_stage = self.ds.zero_optimization_stage()
        self.handed = None
        if self.zero_stage == 3:
            share_master_weights(self.optimizer)
            release_after_each_call(model)
            self.handed = hand_gradients_to_zero3(self.optimizer, model)
        if is_main() and config.deepspeed.config_file is None and self.zero_stage > 0:
            sizes = ds_config["zero_optimization"]
            print("deepspeed: ZeRO's buffers sized from the model (no DeepSpeed JSON given): " + ", ".join(
                f"{name.replace('_size', '').replace('stage3_', '')} {sizes[name]:,}" for name in zero_sizes(1, self.zero_stage, False)) +
                " elements", flush=True)
        self.objective: Objective = "stage1"
        self._batch = (micro_batch_size, micro_batch_size * micro_batches * parallel.dp)
        self._skipped_by_us = 0  # ZeRO-0 steps turned into no-ops here (DeepSpeed counts the others)

    @classmethod
    def placement(cls, config: RunConfig, parallel: ParallelState, device: torch.device, micro_batch_size: int,
                  micro_batches: int) -> Optional[Place]:
        """ZeRO-3: each module's parameters are partitioned over the data-parallel ranks as soon as
        they are built, in the run's precision, so that no rank (and no GPU) ever holds the whole
        model; deepspeed.initialize then finds them partitioned, as under deepspeed.zero.Init."""
        ds_config = deepspeed_config(config, micro_batch_size, micro_batches, device)
        if ds_config["zero_optimization"]["stage"] != 3:
            return None
        dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
        mpu = parallel if parallel.tp > 1 else None
        partitioned: list[nn.Parameter] = []

        def place(params: list[nn.Parameter]) -> None:
            for param in params:
                param.data = param.data.to(dtype)
            if partitioned:  # the settings of the first conversion, as DeepSpeed converts stragglers
                partitioned[0].convert_to_zero_parameters(param_list=params)
            else:
                deepspeed.zero.Init(module=nn.ParameterList(params), config_dict_or_path=ds_config, dtype=dtype, mpu=mpu,
                                    data_parallel_group=mpu.get_data_parallel_group() if mpu else None)
            partitioned.extend(params[:1])

        return place

    def configure(self, micro_batch_size: int, micro_batches: int, seq_length: int, objective: Objective) -> None:
        self.objective = objective
        batch = (micro_batch_size, micro_batch_size * micro_batches * self.parallel.dp)
        if batch != self._batch:
            self.ds.set_train_micro_batch_size(batch[0])
            self.ds.set_train_batch_size(batch[1])
            self._batch = batch

    def _forward(self, batch: dict):
        segment_ids = batch.get("segment_ids")
        return self.ds(batch["input_ids"].to(self.device), labels=batch["labels"].to(self.device),
                       segment_ids=segment_ids.to(self.device) if segment_ids is not None else None,
                       objective=self.objective)

    def train_batch(self, micro_batches: list[dict]) -> StepMetrics:
        skipped_before = self.skipped_steps
        readouts, zero0_norm = [], None
        if self.handed is not None:
            self.handed.new_step()
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            # The boundary is ours to say: the number of micro-batches changes with the batch.
            self.ds.set_gradient_accumulation_boundary(index == last)
            output = self._forward(batch)
            # A non-finite loss must skip the whole step like a non-finite gradient, but its own
            # gradient can be finite (an infinite CE has a finite softmax gradient). Scaled by NaN,
            # every gradient it reaches is NaN, on this rank and after the reduction on all: the
            # step's gradient norm is not finite, and the optimizer step is skipped by that check.
            loss = output.loss
            self.ds.backward(loss * torch.where(torch.isfinite(loss), 1.0, math.nan))
            if index == last and self.zero_stage == 0:
                zero0_norm = self._zero0_gradient_norm()
            self.ds.step()
            readouts.append((0, output.terms))
        # ZeRO 1-3: DeepSpeed took the norm (and skips a step whose norm is not finite).
        norm = zero0_norm if zero0_norm is not None else _as_float(self.ds.get_global_grad_norm())
        tokens = sum(b["input_ids"].numel() for b in micro_batches)
        return StepMetrics.from_readouts(readouts, self.module.config.total_ut_steps, len(micro_batches),
                                         grad_norm=norm, skipped=self.skipped_steps > skipped_before, tokens=tokens)

    def _zero0_gradient_norm(self) -> float:
        """ZeRO-0 clips without keeping the norm, and would apply a non-finite gradient: the norm is
        taken here (the gradients are reduced by now). A non-finite one turns the step into a step
        of zero gradients at learning rate 0: every parameter stays as it is (Adam's moment
        estimates decay by one step); the next set_lr restores the rate."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, self.tp)
        if not math.isfinite(norm):
            for p in params:
                p.grad.zero_()
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
            self._skipped_by_us += 1
        return norm

    @torch.no_grad()
    def eval_batch(self, micro_batches: list[dict]) -> torch.Tensor:
        self.ds.eval()
        try:
            return sum(self._forward(batch).ce_per_loop.float() for batch in micro_batches)
        finally:
            self.ds.train()

    @property
    def skipped_steps(self) -> int:
        return self.ds.skipped_steps + self._skipped_by_us

    def save(self, checkpoint_dir: Path, tag: str) -> list[Path]:
        # DeepSpeed writes every file through its checkpoint engine: recording the paths it is
        # given tells which files this rank wrote.
        written: list[Path] = []
        checkpoint_engine = self.ds.checkpoint_engine
        save = checkpoint_engine.save

        def recording_save(state_dict, path, *args, **kwargs):
            save(state_dict, path, *args, **kwargs)
            written.append(Path(path))

        checkpoint_engine.save = recording_save
        try:
            self.ds.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        finally:
            del checkpoint_engine.save  # the class's method again
        return written

    def load(self, checkpoint_dir: Path, tag: str) -> None:
        loaded, _ = self.ds.load_checkpoint(str(checkpoint_dir), tag=tag)
        if loaded is None:
            raise RuntimeError(f"{Path(checkpoint_dir) / tag}: DeepSpeed could not load this checkpoint")

    @classmethod
    def layout_for(cls, config: RunConfig, parallel: ParallelState) -> Layout:
        stage = config.deepspeed.resolved_zero_stage()
        sub_group_size = None
        if stage == 3:
            zero = deepspeed_config(config, 1, 1, torch.device("cpu"))["zero_optimization"]
            sub_group_size = int(zero.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE))
        return Layout(parallel.dp, parallel.tp, 1, stage, parallel.sequence_parallel, sub_group_size)

    def close(self) -> None:
        self.ds.destroy()


def _as_float(norm) -> float:
    return math.nan if norm is None else float(norm)
