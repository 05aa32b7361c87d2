"""RunConfig: everything one pretraining run needs, as typed dataclasses loaded from YAML.

    run_dir: runs/tiny
    model: {preset: tiny, total_ut_steps: 4}        # a preset or YAML file, then field overrides
    data: {prefixes: [data/stdlib_text_document], seq_length: 256}
    training: {micro_batch_size: 4, global_batch_size: 16, train_steps: 200, precision: fp32}
    optimizer: {lr: 1.0e-3}
    schedule: {kind: cosine, warmup_steps: 20}
    deepspeed: {zero_stage: 3}

Every field can be overridden from the command line: `--training.train_steps 50 --model.total_ut_steps 2`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from looplm_mega.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from looplm_mega.data.config import DataConfig
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.model.losses import Objective
from looplm_mega.parallel.pipeline import check_pipeline
from looplm_mega.parallel.tensor_parallel import check_tensor_parallel


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1  # samples per device per forward
    global_batch_size: Optional[int] = None  # samples per optimizer step (set this or global_batch_tokens)
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step, a multiple of data.seq_length
    train_steps: Optional[int] = None  # the run's length in optimizer steps (or set train_tokens)
    train_tokens: Optional[int] = None  # the run's length in tokens (or set train_steps)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: DeepSpeed's bf16 mode
    # stage1: LM and exit gate trained together (Ouro's Stage I); stage2: the gate alone
    objective: Objective = "stage1"
    seed: int = 1234  # initial weights (the data order has data.seed)
    log_interval: int = 10  # steps between metric lines
    eval_interval: int = 0  # steps between validations; 0: only at the end
    eval_iters: int = 10  # validation iterations of one global batch each (Megatron's --eval-iters)
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    # Stop after this many micro-batches with a non-finite loss, or steps with a non-finite
    # gradient, in a row (each one alone is skipped).
    max_nonfinite_steps: int = 10
    # Peak FLOP/s of one device for MFU; None: the data-sheet value of known GPUs (model/flops.py).
    peak_flops_per_device: Optional[float] = None
    # A consolidated model directory (tools/convert_checkpoint.py output) to start from when
    # run_dir holds no checkpoint yet: its weights, at any TP degree. With init_from_continues its
    # step and consumed samples too (a run continued at another parallel layout).
    init_from: Optional[str] = None
    init_from_continues: bool = True  # with init_from: continue its step count and data position
    # The checkpoint of run_dir to resume from: latest, a tag (step00001000) when `latest` is
    # unusable, or none to start afresh (the run then writes over its old checkpoints).
    resume_from: str = "latest"
    # Adam's moments too, when the directory has them (optimizer.safetensors: convert_checkpoint.py
    # --optimizer, or upcycle.py --optimizer carry): the run continues as if never interrupted.
    init_from_optimizer: bool = True

    def __post_init__(self):
        if (self.global_batch_size is None) == (self.global_batch_tokens is None):
            raise ConfigError("training.global_batch_size / training.global_batch_tokens: set exactly one of the two")
        for name in ("micro_batch_size", "log_interval", "eval_iters", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name}={getattr(self, name)} must be at least 1")
        if self.init_from is not None and not (Path(self.init_from) / "config.yaml").exists():
            raise ConfigError(f"training.init_from: {self.init_from}/config.yaml does not exist "
                              "(give a model directory written by tools/convert_checkpoint.py)")
        if self.resume_from not in ("latest", "none") and not re.fullmatch(r"step\d{8}", self.resume_from):
            raise ConfigError(f"training.resume_from={self.resume_from!r}: expected latest, none or a checkpoint tag "
                              "such as step00001000")
        for name in ("global_batch_size", "global_batch_tokens", "train_steps", "train_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"training.{name}={value} must be at least 1")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr: float = 3e-5  # where the schedule's decay ends
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2)
    eps: float = 1e-8  # AdamW's epsilon
    weight_decay: float = 0.1  # not applied to norms, biases and the exit gate
    grad_clip: float = 1.0  # global gradient-norm clip (0: none)

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas={self.betas} must be two numbers in [0, 1)")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optimizer.lr={self.lr} / min_lr={self.min_lr}: need 0 <= min_lr <= lr and lr > 0")


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "cosine", "wsd"] = "cosine"  # wsd: warmup, stable, decay
    warmup_steps: int = 0  # linear warmup from 0 to lr
    decay_fraction: float = 0.1  # wsd: the last fraction of the steps decays linearly to min_lr

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1]")


@dataclass
class DeepSpeedSection:
    # None: the stage of config_file, or 0 without one.
    zero_stage: Optional[Literal[0, 1, 2, 3]] = None
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU
    config_file: Optional[str] = None  # a DeepSpeed JSON; our keys are laid over it
    extra: dict = field(default_factory=dict)  # inline DeepSpeed keys, laid over everything

    def __post_init__(self):
        if self.config_file is not None and not Path(self.config_file).exists():
            raise ConfigError(f"deepspeed.config_file: {self.config_file} does not exist")
        stage = self.resolved_zero_stage()
        if self.offload_param and stage != 3:
            raise ConfigError(f"deepspeed.offload_param needs ZeRO stage 3, got {stage}")
        if self.offload_optimizer and stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3")

    def file_config(self) -> dict:
        if self.config_file is None:
            return {}
        try:
            return json.loads(Path(self.config_file).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file: {self.config_file}: not valid JSON: {e}") from None

    def resolved_zero_stage(self) -> int:
        if self.zero_stage is not None:
            return self.zero_stage
        return int(self.file_config().get("zero_optimization", {}).get("stage", 0))


@dataclass
class BatchRamp:
    """A global batch that grows linearly at the start of a stage (Megatron's --rampup-batch-size,
    in tokens): start_tokens, then increment_tokens more every ramp_tokens / increments tokens
    consumed, until the stage's global_batch_tokens."""

    start_tokens: int  # the global batch at the stage's start, in tokens
    increment_tokens: int  # how much it grows at each increment
    ramp_tokens: int  # tokens consumed until the batch reaches the stage's global_batch_tokens

    def __post_init__(self):
        for name in ("start_tokens", "increment_tokens", "ramp_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batch_ramp.{name}={getattr(self, name)} must be at least 1")


@dataclass
class StageData:
    """A stage's data blend: dataset prefixes and weights, as in the run's `data` section."""

    prefixes: list[str]  # dataset prefixes, as data.prefixes
    weights: Optional[list[float]] = None  # blend weights, as data.weights


@dataclass
class UpcycleAction:
    """Grow the shared stack to `to_layers` layers at the stage's start (training/upcycle.py);
    nothing happens when the live model already has them (a run resumed or started from an
    upcycled model)."""

    to_layers: int  # layers of the grown stack, a multiple of the current number
    # stacked: the whole stack repeated (1 2 1 2); interleaved: each layer repeated (1 1 2 2)
    order: Literal["stacked", "interleaved"] = "stacked"
    optimizer: Literal["reset", "carry"] = "reset"  # carry: Adam's moments grown like the weights


@dataclass
class StageConfig:
    """One stage of a curriculum (training/curriculum.py); a field left out keeps the value in force."""

    name: str  # the stage's name in logs, metrics and checkpoints
    train_steps: Optional[int] = None  # the stage's length in steps (or set train_tokens)
    train_tokens: Optional[int] = None  # the stage's length in tokens (or set train_steps)
    loops: Optional[int] = None  # total_ut_steps from this stage on
    entropy_beta: Optional[float] = None  # beta of the Stage I objective from this stage on
    rope_theta: Optional[float] = None  # RoPE base from this stage on
    # 0: switch at the boundary; else move geometrically from the old base over this many steps,
    # or over the steps that read rope_anneal_tokens tokens (set at most one of the two).
    rope_anneal_steps: int = 0
    rope_anneal_tokens: Optional[int] = None  # the annealing's span in tokens (instead of rope_anneal_steps)
    lr: Optional[float] = None  # this stage's peak learning rate
    min_lr: Optional[float] = None  # this stage's final learning rate
    schedule: Optional[ScheduleConfig] = None  # this stage's LR schedule (None: the run's `schedule`)
    # stage1: LM and gate (Ouro's Stage I); stage2: the gate alone with the adaptive loss, every
    # other parameter frozen. None: the objective in force (training.objective for the first stage).
    # ("stage2_gate" is another name for stage2.)
    objective: Optional[Union[Objective, Literal["stage2_gate"]]] = None
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameters frozen in this stage
    # A new sequence length rebuilds the data indices; the batch stays global_batch_tokens tokens.
    seq_length: Optional[int] = None
    micro_batch_size: Optional[int] = None  # longer sequences usually need a smaller one
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step from this stage on
    batch_ramp: Optional[BatchRamp] = None  # this stage's batch grows to global_batch_tokens
    data: Optional[StageData] = None  # a new blend from this stage on
    upcycle: Optional[UpcycleAction] = None  # grow the layer stack at the stage's start

    def __post_init__(self):
        where = f"curriculum stage {self.name!r}"
        if (self.train_steps is None) == (self.train_tokens is None):
            raise ConfigError(f"{where}: set exactly one of train_steps / train_tokens")
        for name in ("train_steps", "train_tokens", "loops", "seq_length", "micro_batch_size", "global_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}: {name}={value} must be at least 1")
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise ConfigError(f"{where}: rope_theta={self.rope_theta} must be positive")
        if self.rope_anneal_steps < 0:
            raise ConfigError(f"{where}: rope_anneal_steps={self.rope_anneal_steps} must be >= 0")
        if self.rope_anneal_tokens is not None and (self.rope_anneal_tokens < 1 or self.rope_anneal_steps):
            raise ConfigError(f"{where}: rope_anneal_tokens={self.rope_anneal_tokens} must be at least 1, "
                              "and rope_anneal_steps left out")
        if self.objective == "stage2_gate":
            self.objective = "stage2"
        if self.entropy_beta is not None and self.entropy_beta < 0:
            raise ConfigError(f"{where}: entropy_beta={self.entropy_beta} must be non-negative")


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism takes the rest of the world: DP = world / (TP x PP)."""

    tp: int = 1  # tensor-parallel degree (Megatron-style split of every looped block)
    pp: int = 1  # pipeline-parallel degree
    sequence_parallel: bool = False  # norms and residuals on sequence shards (needs TP > 1)

    def __post_init__(self):
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be at least 1")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: sync later with `wandb sync`
    project: str = "looplm-mega"  # the Weights & Biases project
    name: Optional[str] = None  # the run's name (None: wandb picks one)


@dataclass(kw_only=True)
class RunConfig:
    data: DataConfig  # what the run reads
    run_dir: str = "runs/default"  # checkpoints and metrics go here
    # A preset name or YAML path under `preset`, plus any LoopLMConfig field to override.
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(global_batch_size=1, train_steps=1))  # batch, length, precision, intervals
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the learning-rate schedule
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)  # ZeRO stage, offload, a DeepSpeed JSON
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases logging
    tensorboard: bool = True  # TensorBoard event files in run_dir/tensorboard, beside metrics.jsonl
    # Ordered stages that change loops, entropy weight, RoPE base, LR schedule, sequence length,
    # batch, data blend, objective or layer count on the live run (training/curriculum.py); the
    # stages' lengths are then the run's length.
    curriculum: list[StageConfig] = field(default_factory=list)

    def __post_init__(self):
        t = self.training
        if self.curriculum:
            if t.train_steps is not None or t.train_tokens is not None:
                raise ConfigError("training.train_steps / training.train_tokens: leave both out with a curriculum "
                                  "(its stages give the run's length)")
        elif (t.train_steps is None) == (t.train_tokens is None):
            raise ConfigError("training.train_steps / training.train_tokens: set exactly one of the two")
        if self.parallel.pp > 1 and self.deepspeed.resolved_zero_stage() > 1:
            raise ConfigError(f"deepspeed.zero_stage={self.deepspeed.resolved_zero_stage()} with parallel.pp={self.parallel.pp}: "
                              "pipelines shard optimizer states only (ZeRO-1, as DeepSpeed allows); set deepspeed.zero_stage 0 or 1")
        if self.parallel.pp > 1 and (self.deepspeed.offload_optimizer or self.deepspeed.offload_param):
            raise ConfigError("deepspeed offload with parallel.pp > 1: not available; the pipeline engine keeps its states on the device")
        if self.training.global_batch_tokens is not None and self.training.global_batch_tokens % self.data.seq_length:
            raise ConfigError(
                f"training.global_batch_tokens={self.training.global_batch_tokens} is not a multiple of "
                f"data.seq_length={self.data.seq_length}")
        # Model and parallel layout are checked here, before any process group work, for every
        # stage's layer count and sequence length.
        model = self.model_config()
        for stage in self.curriculum_plan().states:
            if stage.seq_length > model.max_position_embeddings:  # trains, then exports a config that lies
                own = self.curriculum and self.curriculum[stage.index].seq_length is not None
                field_name = f"curriculum stage {stage.name!r}: seq_length" if own else "data.seq_length"
                raise ConfigError(f"{field_name}={stage.seq_length} exceeds model.max_position_embeddings="
                                  f"{model.max_position_embeddings}")
            try:
                staged = model.replace(num_hidden_layers=stage.num_layers)
                check_tensor_parallel(staged, self.parallel.tp, stage.seq_length, self.parallel.sequence_parallel)
                check_pipeline(staged, self.parallel.pp)
            except ConfigError as e:
                raise ConfigError(f"{e} (in curriculum stage {stage.name!r})" if self.curriculum else str(e)) from None
        if self.schedule.warmup_steps > self.train_steps:
            raise ConfigError(f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds the {self.train_steps} training steps")

    def model_config(self) -> LoopLMConfig:
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        if preset is None:
            raise ConfigError("model.preset: name a preset (tiny, small, ...) or a model YAML file")
        try:
            return LoopLMConfig.load(preset).replace(**fields)
        except ConfigError as e:
            raise ConfigError(f"model.{e}") from None

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step of the first stage."""
        t = self.training
        return t.global_batch_size if t.global_batch_size is not None else t.global_batch_tokens // self.data.seq_length

    def curriculum_plan(self):
        """The run laid out in steps (training/curriculum.py): its curriculum, or one implicit stage."""
        from looplm_mega.training.curriculum import Curriculum

        model, t = self.model_config(), self.training
        base = {"loops": model.total_ut_steps, "entropy_beta": model.entropy_beta, "rope_theta": model.rope_theta,
                "lr": self.optimizer.lr, "min_lr": self.optimizer.min_lr, "schedule": self.schedule,
                "objective": t.objective, "seq_length": self.data.seq_length, "micro_batch_size": t.micro_batch_size,
                "global_batch_tokens": self.global_batch_size * self.data.seq_length, "data": self.data,
                "num_layers": model.num_hidden_layers}
        if self.curriculum:
            return Curriculum(self.curriculum, base)
        return Curriculum([StageConfig("main", t.train_steps, t.train_tokens)], base, implicit=True)

    @property
    def train_steps(self) -> int:
        return self.curriculum_plan().total_steps

    def check_data(self) -> None:
        """Every dataset of the run (in any stage) opens and passes the index checks, and holds only
        token ids below model.vocab_size; meant for before any engine is built (an id out of range
        otherwise crashes the embedding at the first step). Raises IndexedDatasetError or ConfigError."""
        from looplm_mega.data.token_ids import check_token_ids

        vocab_size = self.model_config().vocab_size
        blends = {(tuple(s.data.prefixes), s.data.cache_dir) for s in self.curriculum_plan().states}
        for prefixes, cache_dir in sorted(blends, key=str):
            check_token_ids(prefixes, vocab_size, cache_dir)

    def check_batches(self, data_parallel_size: int) -> None:
        """Every global batch of the run must split into micro-batches over the data-parallel ranks."""
        for index, micro, samples in sorted(self.curriculum_plan().batch_sizes()):
            if samples % (micro * data_parallel_size):
                where = f"curriculum stage {self.curriculum[index].name!r}: " if self.curriculum else "training: "
                raise ConfigError(f"{where}a global batch of {samples} samples is not a multiple of micro_batch_size={micro} x "
                                  f"{data_parallel_size} data-parallel ranks; choose a global batch (and ramp) in "
                                  f"multiples of {micro * data_parallel_size} samples")


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from YAML with dotted command-line overrides; errors name the file and field."""
    path = Path(path)
    base = load_yaml(RunConfig, path)
    if not overrides:
        return base
    try:
        return from_dict(RunConfig, merge(to_dict(base), parse_overrides(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{path} with command-line overrides: {e}") from None
