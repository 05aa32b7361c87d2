"""The pretraining loop: data -> curriculum -> one engine step -> metrics -> checkpoints, with
validation per loop and exact resume. Everything about how a step is computed (DeepSpeed's ZeRO,
the looped pipeline, tensor parallelism) is the engine's (training/engine.py): the trainer picks
one when it builds and knows nothing else about it."""

from __future__ import annotations

import contextlib
import gc
import resource
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from looplm_mega.config import ConfigError, to_dict
from looplm_mega.data.builder import build_datasets
from looplm_mega.data.config import SPLIT_NAMES
from looplm_mega.data.gpt_dataset import collate_batch
from looplm_mega.data.sampler import PretrainingSampler
from looplm_mega.model import training_flops_per_token
from looplm_mega.model.flops import device_peak_flops
from looplm_mega.parallel.build import build_model
from looplm_mega.parallel.state import check_parallel_sizes, initialize_parallel
from looplm_mega.parallel.tensor_parallel import TensorParallel
from looplm_mega.training import stop_signals
from looplm_mega.training.checkpoint import (TrainerState, latest_tag, load_checkpoint, resume_tag, save_checkpoint,
                                             saved_layout, tag_of)
from looplm_mega.training.config import RunConfig
from looplm_mega.training.consolidate import consolidate
from looplm_mega.training.curriculum import StageState
from looplm_mega.training.deepspeed_engine import DeepSpeedEngine
from looplm_mega.training.distributed import init_distributed, is_main, launched_world_size
from looplm_mega.training.engine import Engine, Layout
from looplm_mega.training.metrics import MetricsLogger, StepMetrics, ValidationMetrics
from looplm_mega.training.model_dir import RankWeights, read_config, read_trainer_state
from looplm_mega.training.optimizer import load_moments, parameter_groups, read_moments
from looplm_mega.training.pipeline_engine import PipelineEngine
from looplm_mega.training.schedules import learning_rate
from looplm_mega.training.upcycle import upcycle


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        # What the config and the data can be checked for, on every rank before any process group
        # or engine exists: such errors stop the run in seconds, with one message per rank.
        config.check_batches(check_parallel_sizes(launched_world_size(), config.parallel.tp, config.parallel.pp))
        config.check_data()
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.resume = resume_tag(self.checkpoint_dir, config.training.resume_from)  # complete, sizes right
        self.device = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.parallel = initialize_parallel(config.parallel.tp, config.parallel.pp, config.parallel.sequence_parallel)
        self.tensor_parallel = TensorParallel.from_state(self.parallel)
        self.data_parallel_size = self.parallel.dp
        self.curriculum = config.curriculum_plan()
        self.total_steps = self.curriculum.total_steps
        self.engine_class = PipelineEngine if self.parallel.pp > 1 else DeepSpeedEngine
        # The layer count of the model to resume (an upcycled run's checkpoints hold more layers
        # than its config names), else of the model to start from, else of the config.
        model_config = config.model_config()
        init_from = config.training.init_from if self.resume is None else None
        saved = read_trainer_state(self.checkpoint_dir / self.resume) if self.resume else None
        start_layers = (saved or {}).get("model", {}).get("num_hidden_layers") or (
            read_config(init_from).num_hidden_layers if init_from else None)
        if start_layers:
            model_config = model_config.replace(num_hidden_layers=start_layers)
        self.init_state = None
        torch.manual_seed(config.training.seed)
        layout = saved_layout(self.checkpoint_dir, self.resume) if self.resume else None
        if layout is not None and Layout(**layout) != self.engine_class.layout_for(config, self.parallel):
            self._resume_at_another_layout(model_config, Layout(**layout))
        else:
            self._build(model_config, init_from, config.training.init_from_optimizer)
            saved = read_trainer_state(init_from) if init_from is not None else None
            if config.training.init_from_continues and saved is not None and "state" in saved:
                self.init_state = TrainerState.from_dict(saved["state"])
        self.stage = None  # the curriculum stage in force (training/curriculum.py)
        self.grad_accum = 0  # micro-batches per rank in the current step
        self.state = TrainerState()
        self._datasets: dict[tuple, object] = {}
        self._data, self._data_key = None, None
        self.nonfinite_steps_in_a_row = 0

    # --- model and engine ---------------------------------------------------------------------
    def _resume_at_another_layout(self, model_config, saved: Layout) -> None:
        """The checkpoint to resume was written at another layout (nodes lost or added, another TP,
        PP or ZeRO stage): it is consolidated, with Adam's moments, into a model directory, and the
        run continues from it as from training.init_from: weights, moments, step and consumed
        samples (and so the data order) as saved."""
        tag, planned = self.resume, self.engine_class.layout_for(self.config, self.parallel)
        # Rank 0 writes the model directory into a scratch folder of the run, removed once all have read it.
        scratch_dir = tempfile.TemporaryDirectory(dir=self.run_dir, prefix=".converting-") if is_main() else None
        with scratch_dir or contextlib.nullcontext() as scratch:
            target = [str(Path(scratch) / "model") if scratch else None]
            dist.broadcast_object_list(target, src=0)
            if is_main():
                print(f"checkpoint {tag} was written at {saved}; this run is {planned}: converting it (weights and "
                      "Adam's moments) to continue at this layout", flush=True)
                consolidate(self.checkpoint_dir, target[0], tag, optimizer=True)
            dist.barrier()
            self._build(model_config, target[0], moments=True)
            self.init_state = TrainerState.from_dict(read_trainer_state(target[0])["state"])
            dist.barrier()  # every rank has read it before rank 0 removes it
        self.resume = None

    def _build(self, model_config, weights: Optional[str | Path], moments: bool = False) -> None:
        """This rank's model (its TP shard and pipeline part; under ZeRO-3 its partition only),
        drawn from the seed or read from a model directory tensor by tensor (parallel/build.py),
        and a fresh engine around it (the looped pipeline's when PP > 1, else DeepSpeed's), with
        Adam's moments from the directory if asked and present."""
        config, tp = self.config, self.tensor_parallel
        self.model_config = model_config  # the live config: the model reads loops and beta from it
        first = self.curriculum.states[0]
        micro_batches = self.curriculum.batch_samples(0) // (first.micro_batch_size * self.data_parallel_size)
        place = self.engine_class.placement(config, self.parallel, self.device, first.micro_batch_size, micro_batches)
        try:
            source = None if weights is None else RankWeights(weights, tp.rank, tp.size, model_config)
            model = build_model(model_config, self.parallel.pp_rank, self.parallel.pp, tp, weights=source, place=place)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"training.init_from: {weights} does not fit model {config.model}: {e}") from None
        count = torch.tensor([model.num_parameters()], dtype=torch.float64)
        dist.all_reduce(count, group=self.parallel.pp_group)  # the parts of a pipeline add up
        self.num_parameters = int(count.item())
        groups = parameter_groups(model, config.optimizer.weight_decay, self.curriculum.frozen_in)
        self.engine: Engine = self.engine_class(model, groups, config, self.parallel, self.device, first.micro_batch_size,
                                                micro_batches)
        saved = read_moments(weights) if moments and weights is not None else None
        if saved is not None:
            load_moments(self.engine, model, *saved)

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
                # overwrite: a run resumed at this boundary grows the model into the same place again.
                upcycle(self.config.training.init_from, target, factor, action.order, optimizer=action.optimizer,
                        overwrite=True)
            else:
                with tempfile.TemporaryDirectory(dir=self.run_dir) as scratch:
                    consolidate(self.checkpoint_dir, Path(scratch) / "model", tag, optimizer=action.optimizer == "carry")
                    upcycle(Path(scratch) / "model", target, factor, action.order, optimizer=action.optimizer,
                            overwrite=True)
        dist.barrier()
        self.engine.close()
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
        """The samples the steps of the stage's data segment read."""
        steps = self.curriculum.segment_steps(stage.segment)
        return self.curriculum.samples(steps.start, steps.stop)

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

    def _micro_batches(self, data: Iterator[dict], count: int) -> list[dict]:
        """The next `count` micro-batches of this rank."""
        batches = [next(data, None) for _ in range(count)]
        if any(b is None for b in batches):
            raise RuntimeError(f"step {self.state.step}: the data ran out after {self.state.consumed_samples} samples")
        return batches

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> TrainerState:
        config, training = self.config, self.config.training
        resumed = self.resume is not None
        if resumed:
            self.state = load_checkpoint(self.engine, self.checkpoint_dir, self.resume)
        elif self.init_state is not None:
            self.state = self.init_state
        logger = MetricsLogger(self.run_dir, self.total_steps, is_main(), config.wandb, to_dict(config), self.state.step,
                               tensorboard=config.tensorboard)
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            origin = (f"resumed at step {self.state.step}" if resumed else
                      f"from {config.training.init_from} at step {self.state.step}" if config.training.init_from else "from scratch")
            loops = self.curriculum.at(self.state.step).loops
            print(f"pretraining {self.model_config.num_hidden_layers} layers x {loops} loops, "
                  f"{self.num_parameters:,} parameters on {self.world} x {self.device.type} ({self.engine.layout()}), "
                  f"{self.total_steps} steps, {origin}", flush=True)
        stop_signals.install()  # already done by the entry point, unless called from Python
        window: list[StepMetrics] = []
        saved_step = self.state.step  # a checkpoint (or init_from) holds this step already
        try:
            while self.state.step < self.total_steps:
                # Every rank decides together (a collective), so they stop at the same step.
                if _any_rank(stop_signals.requested(), self.device):
                    step = self.state.step
                    if step != saved_step:
                        self.save()
                    if is_main():
                        done = (f"checkpoint written at step {step}" if step != saved_step else
                                f"the checkpoint of step {step} is current" if step else "nothing trained yet")
                        print(f"stop requested (SIGTERM/SIGUSR1): {done}, exiting", flush=True)
                    return self.state
                window.append(self._train_step())
                step = self.state.step
                if step % training.log_interval == 0 or step == self.total_steps:
                    logger.log(step, self._summary(window))
                    window = []
                if training.eval_interval and step % training.eval_interval == 0 and step < self.total_steps:
                    self._validate(logger)
                save_now = training.save_interval and step % training.save_interval == 0
                # A checkpoint at every stage boundary: each stage can be restarted from its start.
                save_now = save_now or self.curriculum.is_boundary(step)
                if save_now or step == self.total_steps:
                    self.save()
                    saved_step = step
            self._validate(logger)
        finally:
            stop_signals.uninstall()
            logger.close()
        return self.state

    def _train_step(self) -> StepMetrics:
        """One optimizer step: the curriculum's settings for it, its micro-batches, the engine."""
        lr = self._enter_step(self.state.step)
        self.engine.set_lr(lr, self.stage.index)
        start = time.perf_counter()
        batches = self._micro_batches(self._data, self.grad_accum)
        self.state.consumed_samples += self.grad_accum * self.stage.micro_batch_size * self.data_parallel_size
        metrics = self.engine.train_batch(batches)
        metrics.step_seconds, metrics.lr = time.perf_counter() - start, lr
        if metrics.skipped:
            self.state.skipped_steps += 1
            self.nonfinite_steps_in_a_row += 1
            limit = self.config.training.max_nonfinite_steps
            if self.nonfinite_steps_in_a_row >= limit:
                raise FloatingPointError(
                    f"step {self.state.step}: {self.nonfinite_steps_in_a_row} optimizer steps in a row had a non-finite "
                    f"loss or gradient (training.max_nonfinite_steps={limit}); lower optimizer.lr or check the data")
        else:
            self.nonfinite_steps_in_a_row = 0
        self.state.step += 1
        return metrics

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
        self.grad_accum = self.curriculum.batch_samples(step) // (stage.micro_batch_size * self.data_parallel_size)
        self.engine.configure(stage.micro_batch_size, self.grad_accum, stage.seq_length, stage.objective)
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

    def _summary(self, window: list[StepMetrics]) -> StepMetrics:
        """The log record of the steps since the last one: their metrics over every rank, and the
        run's context (throughput, FLOPs, memory, the stage in force)."""
        metrics = StepMetrics.merge(window)
        seconds = sum(m.step_seconds for m in window)
        stage, config = self.stage, self.model_config
        metrics.lr, metrics.step_seconds = window[-1].lr, seconds / len(window)
        metrics.tokens_per_s = metrics.tokens * self.data_parallel_size / max(seconds, 1e-9)
        flops_per_device = training_flops_per_token(config, stage.seq_length) * metrics.tokens_per_s / self.world
        metrics.tflops_per_device = flops_per_device / 1e12
        peak = self.config.training.peak_flops_per_device
        if peak is None and self.device.type == "cuda":
            peak = device_peak_flops(torch.cuda.get_device_name(), self.config.training.precision)
        metrics.mfu = flops_per_device / peak if peak else None
        metrics.skipped_steps, metrics.consumed_samples = self.state.skipped_steps, self.state.consumed_samples
        metrics.consumed_tokens = self.curriculum.tokens(0, self.state.step)
        if self.device.type == "cuda":
            metrics.memory_gb = torch.cuda.max_memory_allocated() / 2**30
        else:
            metrics.memory_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if not self.curriculum.implicit:
            metrics.stage = {"stage": stage.name, "rope_theta": config.rope_theta, "entropy_beta": config.entropy_beta,
                             "seq_length": stage.seq_length,
                             "batch_tokens": self.grad_accum * stage.micro_batch_size * self.data_parallel_size * stage.seq_length,
                             "layers": config.num_hidden_layers, "data_segment": stage.segment}
        return metrics

    def _validate(self, logger: MetricsLogger) -> None:
        metrics = self.evaluate()
        if metrics is not None:
            logger.log(self.state.step, metrics, prefix="valid")

    @torch.no_grad()
    def evaluate(self) -> Optional[ValidationMetrics]:
        """Validation CE of every loop on the validation split of the stage's data: eval_iters
        global batches, the same ones every time (None without a validation split)."""
        if self.config.data.split_ratios[1] == 0:
            return None
        if self.stage is None:  # resumed at the last step: nothing trained, the last stage's settings
            self._enter_step(self.total_steps - 1)
        stage, iters = self.stage, self.config.training.eval_iters
        per_rank = stage.micro_batch_size * self.data_parallel_size
        valid = self._dataset(stage, "valid", iters * self.grad_accum * per_rank)
        data = self._loader(valid, 0, stage.micro_batch_size)
        total = torch.zeros(self.model_config.total_ut_steps, device=self.device)
        for _ in range(iters):
            total += self.engine.eval_batch(self._micro_batches(data, self.grad_accum)).to(self.device)
        dist.all_reduce(total)
        ce_per_loop = (total / (iters * self.grad_accum * self.world)).tolist()
        return ValidationMetrics(ce_per_loop, self.curriculum.tokens(0, self.state.step),
                                 None if self.curriculum.implicit else stage.name)

    def save(self) -> Path:
        return save_checkpoint(self.engine, self.checkpoint_dir, self.state, to_dict(self.config),
                               self.config.training.keep_last, to_dict(self.model_config))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is True on some rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def pretrain(config: RunConfig) -> TrainerState:
    return Trainer(config).train()
