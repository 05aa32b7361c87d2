"""The optimizer's side of training: parameter groups, and Adam's moments as full tensors under
the parameters' released names, so that they can leave
one parallel layout and enter another: read out of any checkpoint (DeepSpeed ZeRO 0-3 at any TP
degree, unsharded pipeline checkpoints), carried through upcycling like the weights, and put into
a live engine of any layout (training.init_from of a model directory that has them).

In a model directory they are `optimizer.safetensors` (`exp_avg.NAME`, `exp_avg_sq.NAME`), with
Adam's step count as `adam_step` in trainer_state.json (bias correction needs it).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

from looplm_mega.config import from_dict
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.parallel.tensor_parallel import shard_shape
from looplm_mega.training.model_dir import OPTIMIZER_FILE, MergedTensor, SafetensorsEntry, TensorLike, lazy_tensors, materialize

MOMENTS = ("exp_avg", "exp_avg_sq")


def moment_key(moment: str, name: str) -> str:
    return f"{moment}.{name}"


def parameter_groups(model: torch.nn.Module, weight_decay: float, frozen_in=None) -> list[dict]:
    """Weight decay for matrices only: not for norms, biases and the exit gate. With a curriculum,
    parameters are further grouped by the stages that freeze them (`frozen_in(name)` -> stage
    indices): ZeRO flattens its groups once, so a stage freezes whole groups (lr and weight decay 0)."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = len(shard_shape(param)) < 2 or "norm" in name or "early_exit_gate" in name
        decay = 0.0 if exempt else weight_decay
        frozen = frozen_in(name) if frozen_in is not None else ()
        group = groups.setdefault((decay, frozen), {"params": [], "weight_decay": decay, "base_weight_decay": decay,
                                                    "frozen_in": list(frozen)})
        group["params"].append(param)
    return list(groups.values())


def _parameter_order(run_config: dict, model_config: LoopLMConfig, pp_rank: int = 0, pp: int = 1) -> list[str]:
    """The names of the parameters in the order the trainer handed them to the optimizer (its
    groups, in order): torch optimizers' state dicts number the parameters that way."""
    from looplm_mega.parallel.build import build_model
    from looplm_mega.training.config import RunConfig

    config = from_dict(RunConfig, run_config)
    model = build_model(model_config, pp_rank, pp, materialize=False)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, config.optimizer.weight_decay, config.curriculum_plan().frozen_in)
    return [names[id(p)] for group in groups for p in group["params"]]


def _from_torch_state(state_dict: dict, names: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """Moments and step from a torch optimizer's state dict whose parameters are `names` in order."""
    moments, step = {}, 0
    for index, name in enumerate(names):
        entry = state_dict["state"].get(index)
        if entry is None:
            continue  # never stepped (no gradient yet): zero moments, as a fresh Adam has
        for moment in MOMENTS:
            moments[moment_key(moment, name)] = entry[moment]
        step = max(step, int(entry["step"]))
    return moments, step


def _zero_moments(view: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Moments from the ZeRO 1-3 shards of one TP rank (a directory of a TP=1 checkpoint's files).
    DeepSpeed's zero_to_fp32 knows how the flat partitions map onto parameters; its merge is given
    the moments' flat partitions in place of the fp32 weights' (the same layout)."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(str(view)))
    files = z.get_optim_files(str(view))
    states = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)[z.OPTIMIZER_STATE_DICT] for f in files]
    stage, world = states[0][z.ZERO_STAGE], states[0][z.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    parameters = set(model_states[0].param_shapes[0]) if len(model_states[0].param_shapes) == 1 else {
        n for shapes in model_states[0].param_shapes for n in shapes}
    moments, step = {}, 0
    for moment in MOMENTS:
        if stage <= 2:
            # The base optimizer's flat partitions carry the group padding; the fp32 groups do not.
            flats = [[s["base_optimizer_state"]["state"][g][moment][: s["base_optimizer_state"]["state"][g][moment].numel()
                                                                 - s["group_paddings"][g]]
                      for g in range(len(s["base_optimizer_state"]["state"]))] for s in states]
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flats, model_states, False,
                                                                  states[0].get(z.PARAM_ALIGNMENT_PADDINGS))
            base = states[0]["base_optimizer_state"]["state"]
        else:
            flats = [[s[z.OPTIMIZER_STATE_DICT]["state"][g][moment] for g in range(len(s[z.OPTIMIZER_STATE_DICT]["state"]))]
                     for s in states]
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, False)
            base = states[0][z.OPTIMIZER_STATE_DICT]["state"]
        moments.update({moment_key(moment, n): t for n, t in merged.items() if n in parameters})  # ZeRO-3: lazy
        step = max(int(entry["step"]) for entry in base.values())
    return moments, step


def consolidated_moments(checkpoint_dir: Path, tag: str, trainer_state: dict,
                         model_config: LoopLMConfig) -> tuple[dict[str, MergedTensor], int]:
    """Full moments of every parameter, read when asked (TP shards merged, pipeline parts joined,
    vocabulary padding removed), and Adam's step, from any checkpoint of ours."""
    path = checkpoint_dir / tag
    vocab = model_config.vocab_size
    pipelined = sorted(path.glob("pp_rank_*_optim_states.pt"))
    if pipelined:
        if any("_dp_rank_001_" in f.name for f in pipelined):
            raise ValueError(f"{path}: the optimizer states of this pipelined run are sharded (zero_stage 1); "
                             "carrying them is available for pipelined runs with deepspeed.zero_stage 0")
        pp = 1 + max(int(re.search(r"pp_rank_(\d+)_", f.name).group(1)) for f in pipelined)
        moments, step = {}, 0
        for pp_rank in range(pp):
            names = _parameter_order(trainer_state["config"], model_config, pp_rank, pp)
            files = sorted(path.glob(f"pp_rank_{pp_rank:02d}_mp_rank_*_dp_rank_000_optim_states.pt"))
            ranks = [_from_torch_state(torch.load(f, map_location="cpu", weights_only=False, mmap=True), names) for f in files]
            moments.update(_merge_ranks([m for m, _ in ranks], vocab))
            step = max([step] + [s for _, s in ranks])
        return moments, step
    tp_ranks = sorted({int(m.group(1)) for f in path.iterdir() if (m := re.search(r"mp_rank_(\d+)_model_states", f.name))})
    ranks = []
    for tp_rank in tp_ranks:
        mine = [f for f in path.iterdir() if f"mp_rank_{tp_rank:02d}_" in f.name]
        if any(f.name.endswith("optim_states.pt") for f in mine):
            with tempfile.TemporaryDirectory() as view:  # this TP rank's files under TP=1 names (see consolidate.py)
                for f in mine:
                    (Path(view) / f.name.replace(f"mp_rank_{tp_rank:02d}_", "mp_rank_00_")).symlink_to(f.resolve())
                ranks.append(_zero_moments(Path(view)))
        else:  # ZeRO-0: the torch optimizer's state sits in the model states file
            saved = torch.load(path / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu", weights_only=False,
                               mmap=True)
            if "state" not in (saved.get("optimizer") or {}):
                raise ValueError(f"{path}: no torch optimizer states in the ZeRO-0 checkpoint (bf16 without ZeRO keeps "
                                 "its own format); carrying moments needs fp32 or ZeRO 1-3")
            ranks.append(_from_torch_state(saved["optimizer"], _parameter_order(trainer_state["config"], model_config)))
    return _merge_ranks([m for m, _ in ranks], vocab), max(s for _, s in ranks)


def _merge_ranks(ranks: list[dict], vocab_size: int) -> dict[str, MergedTensor]:
    """Merge the TP ranks' moment shards the way their parameters merge (when each is read)."""
    return {key: MergedTensor([r[key] for r in ranks], key.split(".", 1)[1], vocab_size) for key in ranks[0]}


@torch.no_grad()
def load_moments(engine, model, moments: dict[str, "TensorLike"], step: int) -> None:
    """Put full moments (read one at a time when lazy) into a live engine: this rank's TP shard of each, into whichever optimizer
    holds its state (DeepSpeed ZeRO 1-3 through safe_set_full_optimizer_state; torch's AdamW, or
    the shard ZeroRedundancyOptimizer keeps on this rank, directly). Parameters without moments
    keep a fresh state."""
    from deepspeed.utils import safe_set_full_optimizer_state

    optimizer = engine.optimizer
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: this rank's AdamW
    if not isinstance(local, torch.optim.Optimizer):
        _create_zero_states(optimizer, step)
    owned = {p for group in local.param_groups for p in group["params"]} if isinstance(local, torch.optim.Optimizer) else set()
    for name, param in model.named_parameters():
        if moment_key(MOMENTS[0], name) not in moments:
            continue
        shards = {m: model.tensor_parallel_shard(name, materialize(moments[moment_key(m, name)])).to(param.device)
                  for m in MOMENTS}
        if hasattr(param, "ds_id"):  # ZeRO-3
            for moment, value in shards.items():
                _set_zero3_partition(optimizer, param, value, moment)
        elif not isinstance(local, torch.optim.Optimizer):  # ZeRO 1/2
            for moment, value in shards.items():
                safe_set_full_optimizer_state(param, value, moment)
        elif param in owned:
            local.state[param] = {"step": torch.tensor(float(step)), **{m: v.to(param.dtype).clone() for m, v in shards.items()}}


def _set_zero3_partition(optimizer, param, value: torch.Tensor, moment: str) -> None:
    """This rank's slice of a ZeRO-3 parameter's moment. DeepSpeed's own set_full_hp_param reads
    past the end of the value for a parameter whose last partition is padding (a tensor smaller
    than the data-parallel size, such as the exit gate's bias), so the slice is cut here."""
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=moment)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start:start + partition.numel()]
    partition.data.zero_()
    partition.data[:piece.numel()].copy_(piece)


def _create_zero_states(optimizer, step: int) -> None:
    """DeepSpeed's ZeRO optimizers create Adam's state at the first step and only then link each
    parameter to its slice of it (which safe_set_full_optimizer_state writes through): the state of
    every flat fp32 partition is created here, zero, at `step`, and the links made."""
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_partitioned_groups_flat
    for flat in flats:
        optimizer.optimizer.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                           "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 link lazily; ZeRO-3 reads the state
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def read_moments(model_dir: str | Path) -> Optional[tuple[dict[str, SafetensorsEntry], int]]:
    """(moments, Adam's step) of a model directory, or None when it has none; each moment is read
    from the file when asked (model_dir.materialize)."""
    import json

    path = Path(model_dir) / OPTIMIZER_FILE
    if not path.exists():
        return None
    state = json.loads((Path(model_dir) / "trainer_state.json").read_text())
    return lazy_tensors([path]), int(state["adam_step"])
