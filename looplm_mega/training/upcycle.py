"""Upcycling: grow the shared layer stack by an integer factor by duplicating layers (Ouro grew
its 1.4B model into the 2.6B one this way, 24 -> 48 layers).

    stacked      new layer j is old layer j mod N     (0..N-1, 0..N-1, ...)
    interleaved  new layer j is old layer j div f     (0, 0, 1, 1, ...)

Everything else (embedding, final norm, exit gate, head) is copied. The output is a model
directory (training/model_dir.py) that a run starts from with training.init_from, at any TP / PP
degree. Tensors are read and written one at a time: memory stays at the largest tensor, not the
model (model_dir.StreamingSafetensorsWriter).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from safetensors import safe_open

from looplm_mega.model.config import LoopLMConfig, RELEASED_FIELDS
from looplm_mega.training.model_dir import (
    FULL, StreamingSafetensorsWriter, full_model_files, read_config, read_trainer_state, staged_directory, write_config,
)

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_sources(num_layers: int, factor: int, order: Literal["stacked", "interleaved"]) -> list[int]:
    """For every layer of the grown stack, the old layer it copies."""
    if factor < 1:
        raise ValueError(f"factor={factor}: must be a positive integer")
    if order == "stacked":
        return [j % num_layers for j in range(num_layers * factor)]
    if order == "interleaved":
        return [j // factor for j in range(num_layers * factor)]
    raise ValueError(f"order={order!r}: expected 'stacked' or 'interleaved'")


def read_source_config(source: Path) -> LoopLMConfig:
    """config.yaml of our model directories, or the released config.json of a Hugging Face Ouro directory."""
    if (source / "config.yaml").exists():
        return read_config(source)
    released = source / "config.json"
    if released.exists():
        fields = json.loads(released.read_text())
        return LoopLMConfig(**{k: fields[k] for k in RELEASED_FIELDS if k in fields})
    raise FileNotFoundError(f"{source}: neither config.yaml nor config.json")


def upcycle(source: str | Path, output: str | Path, factor: int, order: Literal["stacked", "interleaved"] = "stacked",
            keep_progress: bool = False) -> Path:
    """Write the grown model to `output` (a model directory); returns it. With keep_progress the
    source's trainer state (step, consumed samples) is carried, so the run continues its count."""
    source, output = Path(source), Path(output)
    config = read_source_config(source)
    sources = layer_sources(config.num_hidden_layers, factor, order)
    files = full_model_files(source)
    # name in the output -> (file, name in the source): the non-layer tensors, then the layers in
    # their new order.
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update({name: path for name in f.keys()})
    plan: dict[str, tuple[Path, str]] = {name: (path, name) for name, path in where.items() if not LAYER.match(name)}
    by_layer: dict[int, list[str]] = {}
    for name in where:
        if match := LAYER.match(name):
            by_layer.setdefault(int(match.group(1)), []).append(name)
    if sorted(by_layer) != list(range(config.num_hidden_layers)):
        raise ValueError(f"{source}: the tensors hold layers {sorted(by_layer)}, the config says "
                         f"num_hidden_layers={config.num_hidden_layers}")
    for new, old in enumerate(sources):
        for name in by_layer[old]:
            plan[f"model.layers.{new}.{LAYER.match(name).group(2)}"] = (where[name], name)
    handles = {path: safe_open(str(path), framework="pt") for path in files}
    specs = {}
    for new_name, (path, name) in plan.items():
        piece = handles[path].get_slice(name)
        specs[new_name] = (piece.get_dtype(), piece.get_shape())
    with staged_directory(output) as staging:
        with StreamingSafetensorsWriter(staging / FULL, specs) as writer:
            for new_name, (path, name) in plan.items():
                writer.add(new_name, handles[path].get_tensor(name))
        write_config(staging, config.replace(num_hidden_layers=config.num_hidden_layers * factor),
                     read_trainer_state(source) if keep_progress else None)
    return output
