"""The pretraining loop on a DeepSpeed engine (ZeRO 0-3): data -> looped model -> Stage I/II loss
-> optimizer step, with periodic metrics, validation per loop step, checkpoints and exact resume."""

from __future__ import annotations

import gc
import json
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from looplm_mega.config import ConfigError, merge, to_dict
from looplm_mega.data.builder import build_datasets
from looplm_mega.data.config import SPLIT_NAMES
from looplm_mega.data.gpt_dataset import collate_batch
from looplm_mega.data.sampler import PretrainingSampler
from looplm_mega.model import LoopLM, training_flops_per_token
from looplm_mega.model.flops import device_peak_flops
from looplm_mega.parallel.pipeline import build_pipeline_model
from looplm_mega.parallel.state import initialize_parallel
from looplm_mega.parallel.tensor_parallel import TensorParallel, global_grad_norm
from looplm_mega.training import stop_signals
from looplm_mega.training.checkpoint import TrainerState, latest_tag, load_checkpoint, save_checkpoint, tag_of
from looplm_mega.training.config import RunConfig
from looplm_mega.training.consolidate import consolidate
from looplm_mega.training.curriculum import StageState
from looplm_mega.training.distributed import all_true, init_distributed, is_main
from looplm_mega.training.metrics import MetricsLogger
from looplm_mega.training.model_dir import read_config, read_full_state, read_rank_state, read_trainer_state
from looplm_mega.training.optimizer import load_moments, parameter_groups, read_moments
from looplm_mega.training.pipeline_engine import PipelineEngine
from looplm_mega.training.schedules import learning_rate
from looplm_mega.training.upcycle import upcycle


def deepspeed_config(config: RunConfig, micro_batch_size: int, gradient_accumulation_steps: int, device: torch.device) -> dict:
    """Our run config as DeepSpeed's; the batch is the first step's (a curriculum resets it per step)."""
    section, opt = config.deepspeed, config.optimizer
    zero: dict = {"stage": section.resolved_zero_stage()}
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if section.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
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
        config.check_batches(self.data_parallel_size)
        self.curriculum = config.curriculum_plan()
        self.total_steps = self.curriculum.total_steps
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.pipelined = self.parallel.pp > 1
        self.init_state = None
        # The layer count of the model to resume (an upcycled run's checkpoints hold more layers
        # than its config names), else of the model to start from, else of the config.
        model_config = config.model_config()
        init_from = config.training.init_from if latest_tag(self.checkpoint_dir) is None else None
        start_layers = self._saved_layers() or (read_config(init_from).num_hidden_layers if init_from else None)
        if start_layers:
            model_config = model_config.replace(num_hidden_layers=start_layers)
        torch.manual_seed(config.training.seed)
        self._build(model_config, init_from, config.training.init_from_optimizer)
        saved = read_trainer_state(init_from) if init_from is not None else None
        if config.training.init_from_continues and saved is not None and "state" in saved:
            self.init_state = TrainerState(**saved["state"])
        self.stage = None  # the curriculum stage in force (training/curriculum.py)
        self.grad_accum = 0  # micro-batches per rank in the current step
        self.state = TrainerState()
        self._datasets: dict[tuple, object] = {}
        self._data, self._data_key = None, None
        self.nonfinite_steps_in_a_row = 0

    # --- model and engine ---------------------------------------------------------------------
    def _saved_layers(self) -> Optional[int]:
        tag = latest_tag(self.checkpoint_dir)
        if tag is None:
            return None
        saved = json.loads((self.checkpoint_dir / tag / "trainer_state.json").read_text())
        return saved.get("model", {}).get("num_hidden_layers")

    def _build(self, model_config, weights: Optional[str | Path], moments: bool = False) -> None:
        """The model (this rank's TP shard and pipeline part), its weights from a model directory
        if given, and a fresh engine (DeepSpeed's, or the pipeline engine) around it, with Adam's
        moments from the directory if asked and present."""
        config = self.config
        self.model_config = model_config  # the live config: the model reads loops and beta from it
        if self.pipelined:
            model = build_pipeline_model(model_config, self.parallel.pp_rank, self.parallel.pp, self.tensor_parallel)
        else:
            model = LoopLM(model_config, self.tensor_parallel)
        self.num_parameters = self._count_parameters(model)
        if weights is not None:
            self._load_weights(model, weights)
        groups = parameter_groups(model, config.optimizer.weight_decay, self.curriculum.frozen_in)
        opt = config.optimizer
        if self.pipelined:
            self.engine = PipelineEngine(model, self.parallel, groups, {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps},
                                         config.deepspeed.resolved_zero_stage(), opt.grad_clip, self.device,
                                         config.training.precision)
        else:
            micro = self.curriculum.states[0].micro_batch_size
            micro_batches = self.curriculum.batch_samples(0) // (micro * self.data_parallel_size)
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=groups, config=deepspeed_config(config, micro, micro_batches, self.device),
                mpu=self.parallel if self.parallel.tp > 1 else None)
        saved = read_moments(weights) if moments and weights is not None else None
        if saved is not None:
            load_moments(self.engine, model, *saved)
        self._engine_batch = None  # (micro-batch size, global batch) the engine is set for

    def _count_parameters(self, model: LoopLM) -> int:
        """The whole model's parameters (every TP shard and pipeline part, no vocabulary padding)."""
        count = torch.tensor([model.num_parameters()], dtype=torch.float64)
        if self.pipelined:
            dist.all_reduce(count, group=self.parallel.pp_group)
        return int(count.item())

    def _load_weights(self, model: LoopLM, source: str | Path) -> None:
        """Full weights from a consolidated model directory: this rank's TP shard of each tensor
        (and, under PP, of its own layers)."""
        tp = self.tensor_parallel
        try:
            shards = read_rank_state(source, tp.rank, tp.size)  # a directory split at this TP degree
            own = model.state_dict().keys()
            if shards is not None:
                model.load_state_dict({n: t for n, t in shards.items() if n in own})
            else:
                model.load_full_state_dict({n: t for n, t in read_full_state(source).items() if n in own})
        except RuntimeError as e:
            raise ConfigError(f"training.init_from: {source} does not fit model {self.config.model}: {e}") from None

    def _upcycle(self, stage: StageState) -> None:
        """Grow the live model to the stage's layer count: the boundary checkpoint (or, at the
        run's start, training.init_from) is consolidated and upcycled into run_dir/upcycled/NAME
        on the first rank, then every rank rebuilds its model and engine from it (Adam's moments
        start afresh unless the action carries them). The training RNG stream is left as it was, so
        a run resumed at the boundary repeats this exactly."""
        step, tag = self.state.step, latest_tag(self.checkpoint_dir)
        if tag is None and self.config.training.init_from is None:
            raise ConfigError(f"curriculum stage {stage.name!r}: upcycling at step 0 needs training.init_from")
        if tag is not None and tag != tag_of(step):
            raise RuntimeError(f"curriculum stage {stage.name!r}: the latest checkpoint is {tag}, not the boundary {tag_of(step)}")
        factor = stage.num_layers // self.model_config.num_hidden_layers
        action = stage.upcycle
        target = self.run_dir / "upcycled" / stage.name
        if is_main():
            print(f"stage {stage.name!r}: upcycling {self.model_config.num_hidden_layers} -> {stage.num_layers} layers "
                  f"({action.order}, optimizer {action.optimizer}) into {target}", flush=True)
            if tag is None:
                upcycle(self.config.training.init_from, target, factor, action.order, optimizer=action.optimizer)
            else:
                with tempfile.TemporaryDirectory(dir=self.run_dir) as scratch:
                    consolidate(self.checkpoint_dir, Path(scratch) / "model", tag, optimizer=action.optimizer == "carry")
                    upcycle(Path(scratch) / "model", target, factor, action.order, optimizer=action.optimizer)
        dist.barrier()
        if not self.pipelined:
            self.engine.destroy()
        self.engine = None
        gc.collect()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.training.seed)
            self._build(self.model_config.replace(num_hidden_layers=stage.num_layers), target, moments=True)

    # --- data ---------------------------------------------------------------------------------
    def _dataset(self, stage: StageState, split: str, samples: int):
        """The train or valid dataset of the stage's data segment (built once per segment)."""
        key = (stage.segment, split, samples)
        if key not in self._datasets:
            self._datasets = {k: v for k, v in self._datasets.items() if k[0] == stage.segment}  # older segments are done
            self._datasets[key] = build_datasets(stage.data, {split: samples})[SPLIT_NAMES.index(split)]
        return self._datasets[key]

    def _train_samples(self, stage: StageState) -> int:
        """The segment's samples, and spares for micro-batches dropped for a non-finite loss."""
        steps = self.curriculum.segment_steps(stage.segment)
        samples = self.curriculum.samples(steps.start, steps.stop)
        micro = max(s.micro_batch_size for s in self.curriculum.states if s.segment == stage.segment)
        return samples + -(-samples // 100) + self.config.training.max_nonfinite_steps * micro * self.data_parallel_size

    def _loader(self, dataset, consumed: int, micro_batch_size: int) -> Iterator[dict]:
        """This rank's micro-batches from sample `consumed` of the dataset on: a stream in units of
        micro x DP samples, so that any sequence of global batches (a ramp) reads Megatron's
        layout, and the TP ranks of one replica read the same batches."""
        per_unit = micro_batch_size * self.data_parallel_size
        sampler = PretrainingSampler(len(dataset), per_unit, micro_batch_size, self.parallel.dp_rank,
                                     self.data_parallel_size, consumed)
        return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch))

    def _open_data(self, stage: StageState) -> None:
        key = (stage.segment, stage.micro_batch_size)
        if key != self._data_key:
            train = self._dataset(stage, "train", self._train_samples(stage))
            self._data = self._loader(train, self.state.consumed_samples - self.state.segment_start_samples,
                                      stage.micro_batch_size)
            self._data_key = key

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
            loops = self.curriculum.at(self.state.step).loops
            print(f"pretraining {self.model_config.num_hidden_layers} layers x {loops} loops, "
                  f"{self.num_parameters:,} parameters on {self.world} x {self.device.type} ({layout}), "
                  f"ZeRO-{self.engine.zero_optimization_stage()}, {self.total_steps} steps, {origin}", flush=True)
        stop_signals.install()  # already done by the entry point, unless called from Python
        window = _Window()
        saved_step = self.state.step  # a checkpoint (or init_from) holds this step already
        try:
            while self.state.step < self.total_steps:
                # Every rank decides together (a collective), so they stop at the same step.
                if not all_true(not stop_signals.requested(), self.device):
                    step = self.state.step
                    if step != saved_step:
                        self.save()
                    if is_main():
                        done = (f"checkpoint written at step {step}" if step != saved_step else
                                f"the checkpoint of step {step} is current" if step else "nothing trained yet")
                        print(f"stop requested (SIGTERM/SIGUSR1): {done}, exiting", flush=True)
                    return self.state
                self._train_step(window)
                step = self.state.step
                if step % training.log_interval == 0 or step == self.total_steps:
                    logger.log(step, window.summary(self))
                    window = _Window()
                if training.eval_interval and step % training.eval_interval == 0 and step < self.total_steps:
                    self._log_validation(logger, step)
                save_now = training.save_interval and step % training.save_interval == 0
                # A checkpoint at every stage boundary: each stage can be restarted from its start.
                save_now = save_now or self.curriculum.is_boundary(step)
                if save_now or step == self.total_steps:
                    self.save()
                    saved_step = step
            self._log_validation(logger, self.state.step)
        finally:
            stop_signals.uninstall()
            logger.close()
        return self.state

    def _train_step(self, window: "_Window") -> None:
        lr = self._enter_step(self.state.step)
        for group in self.engine.optimizer.param_groups:
            frozen = self.stage.index in group.get("frozen_in", ())
            group["lr"] = 0.0 if frozen else lr
            group["weight_decay"] = 0.0 if frozen else group.get("base_weight_decay", group["weight_decay"])
        start = time.perf_counter()
        window.lr = lr
        if self.pipelined:
            self._pipeline_step(window)
            window.seconds += time.perf_counter() - start
            window.steps += 1
            self.state.step += 1
            return
        skipped_before = self.engine.skipped_steps
        done, dropped_in_a_row, zero0_skip = 0, 0, False
        micro = self.stage.micro_batch_size
        while done < self.grad_accum:
            batch = next(self._data, None)
            if batch is None:
                raise RuntimeError(f"step {self.state.step}: the training data ran out after {self.state.consumed_samples} "
                                   f"samples; {self.state.skipped_micro_batches} micro-batches were dropped for non-finite losses")
            self.state.consumed_samples += micro * self.data_parallel_size
            # The boundary is ours to say: the number of micro-batches changes with the batch.
            self.engine.set_gradient_accumulation_boundary(done == self.grad_accum - 1)
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
        return self.stage.objective

    def _enter_step(self, step: int) -> float:
        """Put the curriculum's settings for `step` on the live run (model, engine, data); returns
        the step's learning rate. Derived from the step alone, so a resumed run lands in the right
        stage, position and batch."""
        stage = self.curriculum.at(step)
        if stage is not self.stage:
            self._enter_stage(stage)
        live = self.model_config  # the model's own config object: it reads loops and beta every forward
        live.total_ut_steps, live.entropy_beta = stage.loops, stage.entropy_beta
        theta = self.curriculum.rope_theta(step)
        if theta != live.rope_theta:
            self.engine.module.set_rope_theta(theta)
        samples = self.curriculum.batch_samples(step)
        self.grad_accum = samples // (stage.micro_batch_size * self.data_parallel_size)
        if self.pipelined:
            if self.engine.configure(self.grad_accum, (stage.micro_batch_size, stage.seq_length), stage.objective) and is_main():
                pipeline = self.engine.pipeline
                print(f"pipeline: interleaved 1F1B over {stage.loops * self.parallel.pp} virtual stages, "
                      f"{self.grad_accum} micro-batches, analytic bubble {pipeline.bubble_fraction:.1%}", flush=True)
        elif self._engine_batch != (stage.micro_batch_size, samples):
            self.engine.set_train_micro_batch_size(stage.micro_batch_size)
            self.engine.set_train_batch_size(samples)
            self._engine_batch = (stage.micro_batch_size, samples)
        return learning_rate(step - stage.start, stage.steps, stage.optimizer(self.config.optimizer), stage.schedule)

    def _enter_stage(self, stage: StageState) -> None:
        layers = self.model_config.num_hidden_layers
        if stage.num_layers > layers:
            self._upcycle(stage)
        elif stage.num_layers != layers:
            raise ConfigError(f"curriculum stage {stage.name!r} trains {stage.num_layers} layers, the model to resume or "
                              f"start from has {layers}: set model.num_hidden_layers")
        if stage.segment != self.state.segment:
            self.state.segment, self.state.segment_start_samples = stage.segment, self.state.consumed_samples
        if not self.curriculum.implicit and is_main():
            blend = ", ".join(f"{Path(p).name}" + (f" {w:g}" if stage.data.weights else "")
                              for p, w in zip(stage.data.prefixes, stage.data.weights or [None] * len(stage.data.prefixes)))
            print(f"stage {stage.index + 1}/{len(self.curriculum.states)} {stage.name!r} at step {self.state.step}: "
                  f"{stage.num_layers} layers x {stage.loops} loops, entropy_beta {stage.entropy_beta}, RoPE base "
                  f"{stage.rope_theta:g}, lr {stage.lr:g} -> {stage.min_lr:g} ({stage.schedule.kind}), {stage.steps} steps "
                  f"of {stage.global_batch_tokens:,} tokens at seq {stage.seq_length}, data: {blend}", flush=True)
        self.stage = stage
        self._open_data(stage)

    def _pipeline_step(self, window: "_Window") -> None:
        """One optimizer step through the looped pipeline: every micro-batch's forward and backward
        are interleaved by the schedule, so a non-finite loss or gradient skips the whole step."""
        batch = self._next_batches(self._data, self.grad_accum)
        self.state.consumed_samples += self.grad_accum * self.stage.micro_batch_size * self.data_parallel_size
        metrics = self.engine.train_batch(batch["input_ids"], batch["labels"], batch.get("segment_ids"))
        window.add_metrics(metrics, batch["input_ids"].numel(), self.grad_accum)
        window.grad_norm = metrics["grad_norm"]
        if not all_true(not metrics["skipped"], self.device):
            self.state.skipped_steps += 1
            self.nonfinite_steps_in_a_row += 1
            self._check_nonfinite_limit(self.nonfinite_steps_in_a_row, "optimizer steps in a row had a non-finite loss or gradient")
        else:
            self.nonfinite_steps_in_a_row = 0

    def _next_batches(self, data: Iterator[dict], count: int) -> dict:
        """`count` micro-batches stacked along the batch dimension (the pipeline splits them again)."""
        batches = [next(data, None) for _ in range(count)]
        if any(b is None for b in batches):
            raise RuntimeError(f"step {self.state.step}: the data ran out after {self.state.consumed_samples} samples")
        return {key: torch.cat([b[key] for b in batches]).to(self.device) for key in batches[0]}

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
        """Validation CE of every loop step on the validation split of the stage's data (the same
        batches every time)."""
        stage = self.stage
        if self.config.data.split_ratios[1] == 0:
            return {}
        micro = stage.micro_batch_size
        # A pipeline evaluates whole rounds of its micro-batches.
        rounds = -(-self.config.training.eval_iters // self.grad_accum) if self.pipelined else 0
        iters = rounds * self.grad_accum if self.pipelined else self.config.training.eval_iters
        valid = self._dataset(stage, "valid", iters * micro * self.data_parallel_size)
        self.engine.eval()
        data = self._loader(valid, 0, micro)
        total = torch.zeros(self.model_config.total_ut_steps, device=self.device)
        if self.pipelined:
            for _ in range(rounds):
                batch = self._next_batches(data, self.grad_accum)
                total += self.engine.eval_batch(batch["input_ids"], batch["labels"], batch.get("segment_ids")) * self.grad_accum
        else:
            for _ in range(iters):
                total += self._forward(next(data)).ce_per_loop.float()
        if dist.is_initialized():
            dist.all_reduce(total)
        self.engine.train()
        per_loop = (total / (iters * self.world)).tolist()
        return {"loss": per_loop[-1], "ce_per_loop": per_loop}

    def _log_validation(self, logger: MetricsLogger, step: int) -> None:
        metrics = self.evaluate()
        if metrics and not self.curriculum.implicit:
            metrics["stage"] = self.stage.name
        if metrics:
            logger.log(step, metrics, prefix="valid")

    def save(self) -> Path:
        return save_checkpoint(self.engine, self.checkpoint_dir, self.state, to_dict(self.config),
                               self.config.training.keep_last, to_dict(self.model_config))

class _Window:
    """Sums over the micro-batches since the last log line."""

    def __init__(self):
        self.count, self.loss, self.ce, self.entropy, self.exit_loop, self.gates = 0, 0.0, None, 0.0, 0.0, None
        self.tokens, self.seconds, self.lr, self.grad_norm, self.steps = 0, 0.0, 0.0, None, 0

    def add_metrics(self, metrics: dict, tokens: int, micro_batches: int) -> None:
        """A pipeline step's means over its micro-batches, counted as that many micro-batches."""
        self.count += micro_batches
        self.loss += metrics["loss"] * micro_batches
        ce, gates = metrics["ce_per_loop"] * micro_batches, metrics["gate_mean_per_loop"] * micro_batches
        self.ce = ce if self.ce is None else self.ce + ce
        self.gates = gates if self.gates is None else self.gates + gates
        self.entropy += metrics["exit_entropy"] * micro_batches
        self.exit_loop += metrics["mean_exit_loop"] * micro_batches
        self.tokens += tokens

    def add(self, output, batch: dict) -> None:
        self.count += 1
        self.loss += output.loss.item()
        ce = output.ce_per_loop.detach().float().cpu()
        gates = output.exit_gates.detach().float().mean(dim=(1, 2)).cpu()
        self.ce = ce if self.ce is None else self.ce + ce
        self.gates = gates if self.gates is None else self.gates + gates
        self.entropy += output.exit_entropy.item()
        self.exit_loop += output.mean_exit_loop.item()
        self.tokens += batch["input_ids"].numel()

    def summary(self, trainer: Trainer) -> dict:
        values = torch.tensor([self.loss, self.entropy, self.exit_loop, *self.ce.tolist()], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(values)
        values /= self.count * trainer.world
        tokens_per_s = self.tokens * trainer.data_parallel_size / max(self.seconds, 1e-9)
        stage = trainer.stage
        seq = stage.seq_length
        flops_per_device = training_flops_per_token(trainer.model_config, seq) * tokens_per_s / trainer.world
        metrics = {
            **({"stage": stage.name, "rope_theta": trainer.model_config.rope_theta,
                "entropy_beta": trainer.model_config.entropy_beta, "seq_length": seq,
                "batch_tokens": trainer.grad_accum * stage.micro_batch_size * trainer.data_parallel_size * seq,
                "layers": trainer.model_config.num_hidden_layers, "data_segment": stage.segment}
               if not trainer.curriculum.implicit else {}),
            "step_seconds": self.seconds / max(1, self.steps),
            "loss": values[0].item(), "ce_per_loop": values[3:].tolist(), "exit_entropy": values[1].item(),
            "mean_exit_loop": values[2].item(), "gate_mean_per_loop": (self.gates / self.count).tolist(),
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
