"""Consolidate a training checkpoint (any ZeRO stage, any number of ranks, any TP degree) into one
model directory (training/model_dir.py): the released tensor names and shapes, the model's
config, and the trainer state (step and consumed samples, so that a run can continue from it at
another TP degree: training.init_from).

Tensors are read lazily and written one at a time: shard files are memory-mapped, ZeRO-3 shards
go through DeepSpeed's lazy gathering, and TP shards are merged per tensor as it is written, so
host memory stays near the largest tensor. ZeRO 1/2 are the exception: DeepSpeed's zero_to_fp32
concatenates each rank's flat partitions whole (the model's fp32 weights once in memory)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

from looplm_mega.config import from_dict
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.outputs import check_output_dir
from looplm_mega.training.checkpoint import check_damage, damaged_files, resume_tag
from looplm_mega.training.config import RunConfig
from looplm_mega.training.model_dir import MODEL_DIR, MergedTensor, write_model_dir
from looplm_mega.training.optimizer import consolidated_moments


def _model_parallel_ranks(path: Path) -> list[int]:
    ranks = {int(m.group(1)) for f in path.iterdir() if (m := re.search(r"mp_rank_(\d+)_", f.name))}
    if not ranks:
        raise FileNotFoundError(f"{path}: no mp_rank_*_model_states.pt: not a checkpoint of ours")
    return sorted(ranks)


def _rank_state_dict(path: Path, mp_rank: int) -> dict:
    """fp32 weights of one tensor-parallel rank, gathered from its ZeRO shards (lazily where
    DeepSpeed can)."""
    mine = [f for f in path.iterdir() if f"mp_rank_{mp_rank:02d}_" in f.name]
    if any(f.name.endswith("optim_states.pt") and "zero_pp_rank_" in f.name for f in mine):
        # ZeRO 1-3: DeepSpeed's own tool gathers the fp32 master weights from every DP rank's
        # shard. It reads every shard file of a directory, so it is shown this rank's files alone
        # (under the names of a TP=1 checkpoint) through links.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with tempfile.TemporaryDirectory() as view:
            (Path(view) / "rank").mkdir()
            for f in mine:
                (Path(view) / "rank" / f.name.replace(f"mp_rank_{mp_rank:02d}_", "mp_rank_00_")).symlink_to(f.resolve())
            # Lazy tensors keep the shard files memory-mapped; the links may go (the mappings stay).
            return get_fp32_state_dict_from_zero_checkpoint(view, tag="rank", lazy_mode=True)
    model_file = path / f"mp_rank_{mp_rank:02d}_model_states.pt"
    return torch.load(model_file, map_location="cpu", weights_only=False, mmap=True)["module"]


def _pipeline_state_dict(path: Path, vocab_size: int) -> dict[str, MergedTensor]:
    """A pipelined checkpoint (training/pipeline_engine.py): each pipeline rank's TP shards merged,
    then the ranks' disjoint parts joined."""
    files = sorted(path.glob("pp_rank_*_mp_rank_*_model_states.pt"))
    by_stage: dict[str, list[Path]] = {}
    for f in files:
        by_stage.setdefault(f.name.split("_mp_rank_")[0], []).append(f)
    state: dict[str, torch.Tensor] = {}
    for stage_files in by_stage.values():
        ranks = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["module"] for f in sorted(stage_files)]
        state.update({name: MergedTensor([r[name] for r in ranks], name, vocab_size) for name in ranks[0]})
    return state


def consolidated_state_dict(checkpoint_dir: Path, tag: str, vocab_size: int) -> dict[str, MergedTensor]:
    """fp32 weights of the whole model from the shards of `checkpoint_dir/tag`, read when asked
    (MergedTensor.contiguous()): TP shards merged, pipeline parts joined, vocabulary padding removed."""
    path = checkpoint_dir / tag
    if any(path.glob("pp_rank_*_model_states.pt")):
        return _pipeline_state_dict(path, vocab_size)
    ranks = [_rank_state_dict(path, r) for r in _model_parallel_ranks(path)]
    return {name: MergedTensor([rank[name] for rank in ranks], name, vocab_size) for name in ranks[0]}


def consolidate(checkpoint_dir: str | Path, output_dir: str | Path, tag: Optional[str] = None, tp: int = 1,
                optimizer: bool = False, *, overwrite: bool = False) -> Path:
    """Write the checkpoint as a model directory (training.model_dir), whole or split into `tp`
    shards, with Adam's moments (training/optimizer.py) if `optimizer`; returns output_dir. An
    existing model directory there is replaced only with overwrite (looplm_mega/outputs.py)."""
    checkpoint_dir = Path(checkpoint_dir)
    check_output_dir(output_dir, MODEL_DIR, [checkpoint_dir], overwrite)  # before the shards are read
    tag = resume_tag(checkpoint_dir, tag or "latest")  # complete, its files there with their sizes
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no 'latest' pointer; name a checkpoint with --tag")
    check_damage(checkpoint_dir, tag, damaged_files(checkpoint_dir, tag))
    trainer_state = json.loads((checkpoint_dir / tag / "trainer_state.json").read_text())
    # The live model's config (loops, RoPE base, layers of the stage it was in), where recorded.
    if "model" in trainer_state:
        model_config = from_dict(LoopLMConfig, trainer_state["model"])
    else:
        model_config = from_dict(RunConfig, trainer_state["config"]).model_config()
    state = consolidated_state_dict(checkpoint_dir, tag, model_config.vocab_size)
    moments = None
    if optimizer:
        moments, trainer_state["adam_step"] = consolidated_moments(checkpoint_dir, tag, trainer_state, model_config)
    return write_model_dir(output_dir, state, model_config, trainer_state, tp, moments, overwrite=overwrite,
                           inputs=(checkpoint_dir,))
