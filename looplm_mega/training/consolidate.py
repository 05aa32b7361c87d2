"""Consolidate a training checkpoint (any ZeRO stage, any number of ranks) into one model:
`model.safetensors` with the released tensor names plus the model's `config.yaml`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from looplm_mega.config import from_dict, save_yaml
from looplm_mega.training.checkpoint import latest_tag
from looplm_mega.training.config import RunConfig


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from the shards of `checkpoint_dir/tag`."""
    path = checkpoint_dir / tag
    if any(path.glob("*zero_pp_rank_*optim_states.pt")):
        # ZeRO 1-3: DeepSpeed's own tool gathers the fp32 master weights from every rank's shard.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    model_file = path / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise FileNotFoundError(f"{path}: neither ZeRO shards nor {model_file.name}: not a checkpoint of ours")
    return {k: v.float() for k, v in torch.load(model_file, map_location="cpu", weights_only=False)["module"].items()}


def consolidate(checkpoint_dir: str | Path, output_dir: str | Path, tag: Optional[str] = None) -> Path:
    """Write `output_dir/model.safetensors` and `output_dir/config.yaml`; returns output_dir.
    The directory is assembled under a temporary name and renamed when complete."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no 'latest' pointer; name a checkpoint with --tag")
    state_file = checkpoint_dir / tag / "trainer_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{state_file}: missing; {checkpoint_dir / tag} is not a complete checkpoint")
    run_config = from_dict(RunConfig, json.loads(state_file.read_text())["config"])
    state = consolidated_state_dict(checkpoint_dir, tag)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".", dir=output_dir.parent))
    # safetensors refuses tensors that share memory (a tied head): store each one on its own.
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(staging / "model.safetensors"))
    save_yaml(run_config.model_config(), staging / "config.yaml")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return output_dir
