"""Loading a trained model for inference or evaluation, from either of the formats we write."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from looplm_mega.model import LoopLM
from looplm_mega.parallel.build import build_model
from looplm_mega.training.hf_format import read_hf_config
from looplm_mega.training.model_dir import RankWeights, read_config


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> LoopLM:
    """A LoopLM in eval mode from a model directory (config.yaml + safetensors, any TP split, as
    tools/convert_checkpoint.py writes it) or a released-format directory (config.json, as --to-hf
    writes it or as ByteDance/Ouro-1.4B is published). Weights keep their stored dtype unless
    `dtype` is given."""
    path = Path(path)
    if (path / "config.yaml").exists():
        config = read_config(path)
    elif (path / "config.json").exists():
        config = read_hf_config(path)
    else:
        raise FileNotFoundError(f"{path}: neither config.yaml (a model directory) nor config.json (released format)")
    weights = RankWeights(path, 0, 1, config)  # read one tensor at a time into the model
    return build_model(config, weights=weights, dtype=dtype or weights.dtype).to(device).eval()
