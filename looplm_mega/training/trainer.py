"""The pretraining loop on a DeepSpeed engine (ZeRO 0-3): data -> looped model -> Stage I/II loss
-> optimizer step, with periodic metrics, validation per loop step, checkpoints and exact resume."""

from __future__ import annotations

import math
import resource
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from looplm_mega.config import ConfigError, merge, to_dict
from looplm_mega.data.builder import build_datasets
from looplm_mega.data.gpt_dataset import collate_batch
from looplm_mega.data.sampler import PretrainingSampler
from looplm_mega.model import LoopLM, training_flops_per_token
from looplm_mega.model.flops import device_peak_flops
from looplm_mega.parallel.pipeline import build_pipeline_model, check_pipeline
from looplm_mega.parallel.state import initialize_parallel
from looplm_mega.parallel.tensor_parallel import TensorParallel, global_grad_norm
from looplm_mega.training.checkpoint import TrainerState, latest_tag, load_checkpoint, save_checkpoint
from looplm_mega.training.config import RunConfig
from looplm_mega.training.distributed import all_true, init_distributed, is_main
from looplm_mega.training.metrics import MetricsLogger
from looplm_mega.training.model_dir import read_full_state, read_rank_state, read_trainer_state
from looplm_mega.training.pipeline_engine import PipelineEngine
from looplm_mega.training.schedules import learning_rate


def parameter_groups(model: torch.nn.Module, weight_decay: float, frozen_in=None) -> list[dict]:
    """Weight decay for matrices only: not for norms, biases and the exit gate. With a curriculum,
    parameters are further grouped by the stages that freeze them (`frozen_in(name)` -> stage
    indices): ZeRO flattens its groups once, so a stage freezes whole groups (lr and weight decay 0)."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "norm" in name or "early_exit_gate" in name
        decay = 0.0 if exempt else weight_decay
        frozen = frozen_in(name) if frozen_in is not None else ()
        group = groups.setdefault((decay, frozen), {"params": [], "weight_decay": decay, "base_weight_decay": decay,
                                                    "frozen_in": list(frozen)})
        group["params"].append(param)
    return list(groups.values())


def deepspeed_config(config: RunConfig, gradient_accumulation_steps: int, device: torch.device) -> dict:
    section, opt = config.deepspeed, config.optimizer
    zero: dict = {"stage": section.resolved_zero_stage()}
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if section.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ours = {
        "train_micro_batch_size_per_gpu": config.training.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": opt.grad_clip,
        # torch's AdamW on CPU; DeepSpeed's fused (GPU) or CPU-offload Adam otherwise.
        "optimizer": {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay,
            "torch_adam": device.type == "cpu" and not section.offload_optimizer}},
        "zero_optimization": zero,
        "bf16": {"enabled": config.training.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }
    return merge(merge(section.file_config(), ours), section.extra)


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.device = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.parallel = initialize_parallel(config.parallel.tp, config.parallel.pp, config.parallel.sequence_parallel)
        self.tensor_parallel = TensorParallel.from_state(self.parallel)
        self.data_parallel_size = self.parallel.dp
        self.grad_accum = config.gradient_accumulation_steps(self.data_parallel_size)
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.model_config = config.model_config()
        # Every rank draws the full tensors from the same seed and keeps its TP shard (and, under
        # PP, its layers); ZeRO then shards over the data-parallel group.
        torch.manual_seed(config.training.seed)
        self.pipelined = self.parallel.pp > 1
        if self.pipelined:
            check_pipeline(self.model_config, self.parallel.pp, self.grad_accum)
            model = build_pipeline_model(self.model_config, self.parallel.pp_rank, self.parallel.pp, self.tensor_parallel)
        else:
            model = LoopLM(self.model_config, self.tensor_parallel)
        self.num_parameters = self._count_parameters(model)
        self.init_state = self._initialize_from(model)
        self.curriculum = config.curriculum_plan()
        groups = parameter_groups(model, config.optimizer.weight_decay, self.curriculum.frozen_in if self.curriculum else None)
        if self.pipelined:
            opt = config.optimizer
            self.engine = PipelineEngine(model, self.parallel, groups, {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps},
                                         config.deepspeed.resolved_zero_stage(), opt.grad_clip, self.grad_accum,
                                         (config.training.micro_batch_size, config.data.seq_length), self.device,
                                         config.training.objective, config.training.precision)
        else:
            model_parallel = self.parallel.tp > 1
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=groups, config=deepspeed_config(config, self.grad_accum, self.device),
                mpu=self.parallel if model_parallel else None)
        self.total_steps = config.train_steps
        self.stage = None  # the curriculum stage in force (training/curriculum.py)
        self.samples_per_step = config.global_batch_size
        # Every validation reads the same batches, so one validation's worth of samples is built
        # (a pipeline evaluates whole rounds of grad_accum micro-batches).
        self.eval_iters = config.training.eval_iters
        if self.pipelined:
            self.eval_iters = -(-self.eval_iters // self.grad_accum) * self.grad_accum
        eval_samples = self.eval_iters * config.training.micro_batch_size * self.data_parallel_size
        if config.data.split_ratios[1] == 0:
            eval_samples = 0  # no validation split: no validation
        # Spare global batches stand in for micro-batches dropped for a non-finite loss.
        micro_per_batch = self.samples_per_step // (config.training.micro_batch_size * self.data_parallel_size)
        spare_batches = -(-self.total_steps // 100) + -(-config.training.max_nonfinite_steps // micro_per_batch)
        train_samples = (self.total_steps + spare_batches) * self.samples_per_step
        self.train_data, self.valid_data, _ = build_datasets(config.data, {"train": train_samples, "valid": eval_samples})
        self.state = TrainerState()
        self.stop_requested = False
        self.nonfinite_steps_in_a_row = 0

    def _count_parameters(self, model: LoopLM) -> int:
        """The whole model's parameters (every TP shard and pipeline part, no vocabulary padding)."""
        count = torch.tensor([model.num_parameters()], dtype=torch.float64)
        if self.pipelined:
            dist.all_reduce(count, group=self.parallel.pp_group)
        return int(count.item())

    def _initialize_from(self, model: LoopLM) -> Optional[TrainerState]:
        """training.init_from: full weights from a consolidated model (this rank's TP shard of
        each), unless the run already has checkpoints to resume. Returns the trainer state to
        continue from, if that is asked for."""
        source = self.config.training.init_from
        if source is None or latest_tag(self.checkpoint_dir) is not None:
            return None
        tp = self.tensor_parallel
        try:
            shards = read_rank_state(source, tp.rank, tp.size)  # a directory split at this TP degree
            own = model.state_dict().keys()  # under PP, this rank's part of the model
            if shards is not None:
                model.load_state_dict({n: t for n, t in shards.items() if n in own})
            else:
                model.load_full_state_dict({n: t for n, t in read_full_state(source).items() if n in own})
        except RuntimeError as e:
            raise ConfigError(f"training.init_from: {source} does not fit model {self.config.model}: {e}") from None
        saved = read_trainer_state(source)
        if not (self.config.training.init_from_continues and saved is not None):
            return None
        return TrainerState(**saved["state"])

    # --- data ---------------------------------------------------------------------------------
    def _loader(self, dataset, consumed: int, global_batch: int) -> Iterator[dict]:
        # The TP ranks of one replica read the same batches.
        sampler = PretrainingSampler(len(dataset), global_batch, self.config.training.micro_batch_size,
                                     self.parallel.dp_rank, self.data_parallel_size, consumed)
        return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch))

    def _forward(self, batch: dict):
        return self.engine(batch["input_ids"].to(self.device), labels=batch["labels"].to(self.device),
                           segment_ids=batch["segment_ids"].to(self.device) if "segment_ids" in batch else None,
                           objective=self.objective)

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> TrainerState:
        config, training = self.config, self.config.training
        resumed = load_checkpoint(self.engine, self.checkpoint_dir)
        if resumed is not None:
            self.state = resumed
        elif self.init_state is not None:
            self.state = self.init_state
        logger = MetricsLogger(self.run_dir, self.total_steps, is_main(), config.wandb, to_dict(config), self.state.step)
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            origin = (f"resumed at step {self.state.step}" if resumed else
                      f"from {config.training.init_from} at step {self.state.step}" if config.training.init_from else "from scratch")
            layout = (f"TP={self.parallel.tp}{' with SP' if self.tensor_parallel.sequence_parallel else ''} x "
                      f"PP={self.parallel.pp} x DP={self.parallel.dp}")
            if self.pipelined:
                layout += (f"; interleaved 1F1B over {self.model_config.total_ut_steps * self.parallel.pp} virtual stages, "
                           f"{self.grad_accum} micro-batches, analytic bubble {self.engine.pipeline.bubble_fraction:.1%}")
            print(f"pretraining {self.model_config.num_hidden_layers} layers x {self.model_config.total_ut_steps} loops, "
                  f"{self.num_parameters:,} parameters on {self.world} x {self.device.type} ({layout}), "
                  f"ZeRO-{self.engine.zero_optimization_stage()}, {self.total_steps} steps of {self.samples_per_step} samples, {origin}", flush=True)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        data = self._loader(self.train_data, self.state.consumed_samples, self.samples_per_step)
        window = _Window()
        try:
            while self.state.step < self.total_steps:
                self._train_step(data, window)
                step = self.state.step
                if step % training.log_interval == 0 or step == self.total_steps:
                    logger.log(step, window.summary(self))
                    window = _Window()
                if training.eval_interval and step % training.eval_interval == 0 and step < self.total_steps:
                    self._log_validation(logger, step)
                save_now = training.save_interval and step % training.save_interval == 0
                # A checkpoint at every stage boundary: each stage can be restarted from its start.
                save_now = save_now or (self.curriculum is not None and self.curriculum.is_boundary(step))
                if save_now or step == self.total_steps:
                    self.save()
                if not all_true(not self.stop_requested, self.device):
                    if not save_now and step != self.total_steps:
                        self.save()
                    if is_main():
                        print(f"stop requested (SIGTERM/SIGUSR1): checkpoint written at step {step}, exiting", flush=True)
                    return self.state
            self._log_validation(logger, self.state.step)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            logger.close()
        return self.state

    def _train_step(self, data: Iterator[dict], window: "_Window") -> None:
        training = self.config.training
        lr = self._enter_step(self.state.step)
        for group in self.engine.optimizer.param_groups:
            frozen = self.stage is not None and self.stage.index in group.get("frozen_in", ())
            group["lr"] = 0.0 if frozen else lr
            group["weight_decay"] = 0.0 if frozen else group.get("base_weight_decay", group["weight_decay"])
        start = time.perf_counter()
        if self.pipelined:
            self._pipeline_step(data, window)
            window.seconds += time.perf_counter() - start
            window.steps += 1
            window.lr = lr
            self.state.step += 1
            return
        skipped_before = self.engine.skipped_steps
        done, dropped_in_a_row, zero0_skip = 0, 0, False
        while done < self.grad_accum:
            batch = next(data, None)
            if batch is None:
                raise RuntimeError(f"step {self.state.step}: the training data ran out after {self.state.consumed_samples} "
                                   f"samples; {self.state.skipped_micro_batches} micro-batches were dropped for non-finite losses")
            self.state.consumed_samples += training.micro_batch_size * self.data_parallel_size
            output = self._forward(batch)
            # A non-finite loss on any rank: this micro-batch is dropped on every rank before its
            # backward, and the next one takes its place.
            if not all_true(bool(torch.isfinite(output.loss)), self.device):
                self.state.skipped_micro_batches += 1
                dropped_in_a_row += 1
                self._check_nonfinite_limit(dropped_in_a_row, "micro-batches in a row gave a non-finite loss")
                continue
            dropped_in_a_row = 0
            self.engine.backward(output.loss)
            done += 1
            if done == self.grad_accum and self.engine.zero_optimization_stage() == 0:
                zero0_skip = self._zero0_gradient_norm(window)
            self.engine.step()
            window.add(output, batch)
        window.seconds += time.perf_counter() - start
        window.steps += 1
        window.lr = lr
        if self.engine.zero_optimization_stage() > 0:
            window.grad_norm = self.engine.get_global_grad_norm()
        # ZeRO 1-3 skip a step whose gradient norm is not finite (DeepSpeed counts it); ZeRO-0 here.
        if zero0_skip or self.engine.skipped_steps > skipped_before:
            self.state.skipped_steps += 1
            self.nonfinite_steps_in_a_row += 1
            self._check_nonfinite_limit(self.nonfinite_steps_in_a_row, "optimizer steps in a row had a non-finite gradient")
        else:
            self.nonfinite_steps_in_a_row = 0
        self.state.step += 1

    @property
    def objective(self) -> str:
        return self.stage.objective if self.stage is not None else self.config.training.objective

    def _enter_step(self, step: int) -> float:
        """Put the curriculum's settings for `step` on the live model; returns the step's learning
        rate. Derived from the step alone, so a resumed run lands in the right stage and position."""
        if self.curriculum is None:
            return learning_rate(step, self.total_steps, self.config.optimizer, self.config.schedule)
        stage = self.curriculum.at(step)
        live = self.model_config  # the model's own config object: it reads loops and beta every forward
        live.total_ut_steps, live.entropy_beta = stage.loops, stage.entropy_beta
        theta = self.curriculum.rope_theta(step)
        if theta != live.rope_theta:
            self.engine.module.set_rope_theta(theta)
        if stage != self.stage and is_main():
            print(f"stage {stage.index + 1}/{len(self.curriculum.states)} {stage.name!r} at step {step}: {stage.loops} loops, "
                  f"entropy_beta {stage.entropy_beta}, RoPE base {stage.rope_theta:g}, lr {stage.lr:g} -> {stage.min_lr:g} "
                  f"({stage.schedule.kind}), {stage.steps} steps", flush=True)
        self.stage = stage
        return learning_rate(step - stage.start, stage.steps, stage.optimizer(self.config.optimizer), stage.schedule)

    def _next_batches(self, data: Iterator[dict], count: int) -> dict:
        """`count` micro-batches stacked along the batch dimension (the pipeline splits them again)."""
        batches = [next(data, None) for _ in range(count)]
        if any(b is None for b in batches):
            raise RuntimeError(f"step {self.state.step}: the data ran out after {self.state.consumed_samples} samples")
        return {key: torch.cat([b[key] for b in batches]).to(self.device) for key in batches[0]}

    def _pipeline_step(self, data: Iterator[dict], window: "_Window") -> None:
        """One optimizer step through the looped pipeline: every micro-batch's forward and backward
        are interleaved by the schedule, so a non-finite loss or gradient skips the whole step."""
        batch = self._next_batches(data, self.grad_accum)
        self.state.consumed_samples += self.grad_accum * self.config.training.micro_batch_size * self.data_parallel_size
        metrics = self.engine.train_batch(batch["input_ids"], batch["labels"], batch.get("segment_ids"))
        window.add_metrics(metrics, batch["input_ids"].numel(), self.grad_accum)
        window.grad_norm = metrics["grad_norm"]
        if not all_true(not metrics["skipped"], self.device):
            self.state.skipped_steps += 1
            self.nonfinite_steps_in_a_row += 1
            self._check_nonfinite_limit(self.nonfinite_steps_in_a_row, "optimizer steps in a row had a non-finite loss or gradient")
        else:
            self.nonfinite_steps_in_a_row = 0

    def _zero0_gradient_norm(self, window: "_Window") -> bool:
        """ZeRO-0 clips without keeping the norm, and would apply a non-finite gradient: the norm is
        taken here (the gradients are reduced by now). A non-finite one turns the step into a step
        of zero gradients at learning rate 0: every parameter stays as it is (Adam's moment
        estimates decay by one step). True if the step is skipped."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, self.tensor_parallel)
        window.grad_norm = norm
        if math.isfinite(norm):
            return False
        for p in params:
            p.grad.zero_()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = 0.0
        return True

    def _check_nonfinite_limit(self, in_a_row: int, what: str) -> None:
        limit = self.config.training.max_nonfinite_steps
        if in_a_row >= limit:
            raise FloatingPointError(f"step {self.state.step}: {in_a_row} {what} (training.max_nonfinite_steps={limit}); "
                                     "lower optimizer.lr or check the data")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation CE of every loop step on the validation split (fixed batches every time)."""
        training = self.config.training
        if self.valid_data is None:
            return {}
        self.engine.eval()
        global_batch = training.micro_batch_size * self.data_parallel_size
        data = self._loader(self.valid_data, 0, global_batch)
        total = torch.zeros(self.model_config.total_ut_steps, device=self.device)
        if self.pipelined:
            for _ in range(self.eval_iters // self.grad_accum):
                batch = self._next_batches(data, self.grad_accum)
                total += self.engine.eval_batch(batch["input_ids"], batch["labels"], batch.get("segment_ids")) * self.grad_accum
        else:
            for _ in range(self.eval_iters):
                total += self._forward(next(data)).per_step_loss.float()
        if dist.is_initialized():
            dist.all_reduce(total)
        self.engine.train()
        per_step = (total / (self.eval_iters * self.world)).tolist()
        return {"loss": per_step[-1], "ce_per_step": per_step}

    def _log_validation(self, logger: MetricsLogger, step: int) -> None:
        metrics = self.evaluate()
        if metrics and self.stage is not None:
            metrics["stage"] = self.stage.name
        if metrics:
            logger.log(step, metrics, prefix="valid")

    def save(self) -> Path:
        return save_checkpoint(self.engine, self.checkpoint_dir, self.state, to_dict(self.config), self.config.training.keep_last)

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True


class _Window:
    """Sums over the micro-batches since the last log line."""

    def __init__(self):
        self.count, self.loss, self.ce, self.entropy, self.exit_step, self.gates = 0, 0.0, None, 0.0, 0.0, None
        self.tokens, self.seconds, self.lr, self.grad_norm, self.steps = 0, 0.0, 0.0, None, 0

    def add_metrics(self, metrics: dict, tokens: int, micro_batches: int) -> None:
        """A pipeline step's means over its micro-batches, counted as that many micro-batches."""
        self.count += micro_batches
        self.loss += metrics["loss"] * micro_batches
        ce, gates = metrics["per_step_loss"] * micro_batches, metrics["gate_mean_per_step"] * micro_batches
        self.ce = ce if self.ce is None else self.ce + ce
        self.gates = gates if self.gates is None else self.gates + gates
        self.entropy += metrics["exit_entropy"] * micro_batches
        self.exit_step += metrics["mean_exit_step"] * micro_batches
        self.tokens += tokens

    def add(self, output, batch: dict) -> None:
        self.count += 1
        self.loss += output.loss.item()
        ce = output.per_step_loss.detach().float().cpu()
        gates = output.exit_gates.detach().float().mean(dim=(1, 2)).cpu()
        self.ce = ce if self.ce is None else self.ce + ce
        self.gates = gates if self.gates is None else self.gates + gates
        self.entropy += output.exit_entropy.item()
        self.exit_step += output.mean_exit_step.item()
        self.tokens += batch["input_ids"].numel()

    def summary(self, trainer: Trainer) -> dict:
        values = torch.tensor([self.loss, self.entropy, self.exit_step, *self.ce.tolist()], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(values)
        values /= self.count * trainer.world
        tokens_per_s = self.tokens * trainer.data_parallel_size / max(self.seconds, 1e-9)
        seq = trainer.config.data.seq_length
        flops_per_device = training_flops_per_token(trainer.model_config, seq) * tokens_per_s / trainer.world
        metrics = {
            **({"stage": trainer.stage.name, "rope_theta": trainer.model_config.rope_theta,
                "entropy_beta": trainer.model_config.entropy_beta} if trainer.stage is not None else {}),
            "step_seconds": self.seconds / max(1, self.steps),
            "loss": values[0].item(), "ce_per_step": values[3:].tolist(), "exit_entropy": values[1].item(),
            "mean_exit_step": values[2].item(), "gate_mean_per_step": (self.gates / self.count).tolist(),
            "lr": self.lr, "grad_norm": float(self.grad_norm) if self.grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12,
            "skipped_steps": trainer.state.skipped_steps, "skipped_micro_batches": trainer.state.skipped_micro_batches,
            "consumed_samples": trainer.state.consumed_samples,
        }
        peak = trainer.config.training.peak_flops_per_device
        if peak is None and trainer.device.type == "cuda":
            peak = device_peak_flops(torch.cuda.get_device_name(), trainer.config.training.precision)
        if peak:
            metrics["mfu"] = flops_per_device / peak
        if trainer.pipelined:
            metrics["pipeline_bubble"] = trainer.engine.pipeline.bubble_fraction
        if trainer.device.type == "cuda":
            metrics["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            metrics["memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics


def pretrain(config: RunConfig) -> TrainerState:
    return Trainer(config).train()
