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

import re
from pathlib import Path
from typing import Literal

from looplm_mega.model.config import LoopLMConfig
from looplm_mega.outputs import staged_output_dir
from looplm_mega.training.hf_format import read_hf_config
from looplm_mega.training.model_dir import (
    FULL, MODEL_DIR, OPTIMIZER_FILE, full_model_files, lazy_tensors, read_config, read_trainer_state, write_config,
    write_tensors,
)

# A layer's tensor, or its Adam moment (exp_avg.model.layers.3....): (prefix, layer, rest of the name).
LAYER = re.compile(r"^(.*?model\.layers\.)(\d+)\.(.+)$")


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
    return read_hf_config(source)


def _grow(files: list[Path], output: Path, sources: list[int], num_layers: int) -> None:
    """Write the tensors of `files` to the safetensors file `output`, the layers in their new order
    (`sources[j]`: the old layer of new layer j), one tensor at a time."""
    entries = lazy_tensors(files)
    # The output: the non-layer tensors, then the layers (of each prefix) in their new order.
    plan = {name: entry for name, entry in entries.items() if not LAYER.match(name)}
    by_layer: dict[tuple[str, int], list[str]] = {}
    for name in entries:
        if match := LAYER.match(name):
            by_layer.setdefault((match.group(1), int(match.group(2))), []).append(name)
    for prefix in sorted({prefix for prefix, _ in by_layer}):
        layers = sorted(layer for p, layer in by_layer if p == prefix)
        if layers != list(range(num_layers)):
            raise ValueError(f"{files[0].parent}: the tensors {prefix}* hold layers {layers}, the config says "
                             f"num_hidden_layers={num_layers}")
        for new, old in enumerate(sources):
            for name in by_layer[(prefix, old)]:
                plan[f"{prefix}{new}.{LAYER.match(name).group(3)}"] = entries[name]
    write_tensors(output, plan)


def upcycle(source: str | Path, output: str | Path, factor: int, order: Literal["stacked", "interleaved"] = "stacked",
            keep_progress: bool = False, optimizer: Literal["reset", "carry"] = "reset", *,
            overwrite: bool = False) -> Path:
    """Write the grown model to `output` (a model directory; an existing one is replaced only with
    overwrite, looplm_mega/outputs.py); returns it. With keep_progress the
    source's trainer state (step, consumed samples) is carried, so the run continues its count.
    optimizer="carry": Adam's moments (the source's optimizer.safetensors, from
    tools/convert_checkpoint.py --optimizer) are grown like the weights and kept with their step
    count; "reset": a run started from the output begins with fresh moments."""
    source, output = Path(source), Path(output)
    config = read_source_config(source)
    sources = layer_sources(config.num_hidden_layers, factor, order)
    if optimizer == "carry" and not (source / OPTIMIZER_FILE).exists():
        raise FileNotFoundError(f"{source / OPTIMIZER_FILE}: missing, so the optimizer state cannot be carried; "
                                "consolidate the checkpoint with its optimizer state (--optimizer carry reads it)")
    with staged_output_dir(output, MODEL_DIR, [source], overwrite) as staging:
        _grow(full_model_files(source), staging / FULL, sources, config.num_hidden_layers)
        trainer_state = read_trainer_state(source) if keep_progress else None
        if optimizer == "carry":
            _grow([source / OPTIMIZER_FILE], staging / OPTIMIZER_FILE, sources, config.num_hidden_layers)
            trainer_state = {**(trainer_state or {}), "adam_step": read_trainer_state(source)["adam_step"]}
        write_config(staging, config.replace(num_hidden_layers=config.num_hidden_layers * factor), trainer_state)
    return output
