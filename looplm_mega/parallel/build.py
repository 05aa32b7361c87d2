"""This rank's part of the model, built so that no rank ever holds more than its part.

The whole model is laid out on the meta device (no memory), cut down to this rank's pipeline
layers, and then materialised one module at a time, in the whole model's order: each module's
full tensors are drawn from the seed (LoopLM.initial_tensors) or read from a model directory,
this rank keeps its TP shard, and `place` takes the module's parameters at once (ZeRO-3
partitions them over the data-parallel ranks). Memory while building is this rank's part plus
one full tensor; the values are those of LoopLM(config) at every layout, because every module's
tensors are drawn, in order, on every rank, whether the rank keeps them or not.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from looplm_mega.model.config import LoopLMConfig
from looplm_mega.model.looplm import LoopLM
from looplm_mega.parallel.pipeline import owned_layers
from looplm_mega.parallel.tensor_parallel import TensorParallel

Weights = Callable[[str], torch.Tensor]  # parameter name -> this TP rank's shard (model_dir.RankWeights)
Place = Callable[[list[nn.Parameter]], None]  # takes a module's parameters once they hold their values


def build_model(config: LoopLMConfig, pp_rank: int = 0, pp: int = 1, tp: TensorParallel = TensorParallel(), *,
                weights: Optional[Weights] = None, place: Optional[Place] = None, materialize: bool = True,
                dtype: torch.dtype = torch.float32) -> LoopLM:
    """This rank's model: its pipeline layers (keeping their global index in the names,
    `model.layers.7...` on the rank that owns layer 7, so checkpoints carry the released names)
    and its TP shards, initialised from the seed or, with `weights`, read from them; parameters in
    `dtype` (buffers stay fp32). With materialize=False the part stays on the meta device (its
    names and shapes)."""
    with torch.device("meta"):
        model = LoopLM(config, tp)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    modules = [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    if pp > 1:
        _cut(model, pp_rank, pp)
    if not materialize:
        return model
    kept = {id(m) for m in model.modules()}
    # A tied weight takes the value of the last module that writes it, as in LoopLM.reset_parameters.
    last_writer = {id(p): index for index, (_, m) in enumerate(modules) for p in m.parameters(recurse=False)}
    waiting: list[nn.Module] = []
    for index, (name, module) in enumerate(modules):
        drawn = model.initial_tensors(name, module) if weights is None else None
        if id(module) not in kept:
            continue
        for param_name, param in list(module.named_parameters(recurse=False)):
            if last_writer[id(param)] != index:
                continue
            full_name = f"{name}.{param_name}"
            value = weights(full_name) if weights is not None else model.tensor_parallel_shard(full_name, drawn[param_name])
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{full_name}: shape {tuple(value.shape)}, the model's is {tuple(param.shape)}")
            _materialize(param, value.to(param.dtype))
        waiting.append(module)
        ready = [m for m in waiting if not any(p.is_meta for p in m.parameters(recurse=False))]
        for m in ready:
            waiting.remove(m)
            if place is not None:
                place(list(m.parameters(recurse=False)))
    model.model.rotary_emb.materialize()
    return model


def _cut(model: LoopLM, pp_rank: int, pp: int) -> None:
    """The whole model down to this pipeline rank's part: its layers; the embedding on the first
    rank; the final norm, exit gate and head on the last."""
    mine = owned_layers(model.config.num_hidden_layers, pp, pp_rank)
    model.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in mine})
    if pp_rank != 0:
        del model.model.embed_tokens
    if pp_rank != pp - 1:
        del model.model.norm, model.model.early_exit_gate, model.lm_head


def _materialize(param: nn.Parameter, value: torch.Tensor) -> None:
    """A meta parameter takes a value in place: the same object (tied weights stay tied, the
    TP marks of layers.mark_tensor_parallel stay on it)."""
    marks = dict(param.__dict__)
    torch.utils.swap_tensors(param, nn.Parameter(value.contiguous(), requires_grad=param.requires_grad))
    param.__dict__.update(marks)
