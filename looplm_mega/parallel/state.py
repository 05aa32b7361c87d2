"""Tensor-, pipeline- and data-parallel process groups carved out of one world.

Rank order is Megatron's: tensor-parallel ranks are adjacent (they exchange activations in every
layer, so they should share a node), then data-parallel, then pipeline-parallel:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

ParallelState is also the "mpu" that deepspeed.initialize takes: ZeRO shards over the data-parallel
group only, and gradient norms are summed over the model-parallel group (TP x PP) with each
replicated parameter counted once (DeepSpeed reads `param.tensor_model_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from looplm_mega.config import ConfigError


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel size; a ConfigError when TP x PP does not divide the world."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must be at least 1")
    if world_size % (tp * pp):
        raise ConfigError(
            f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the world of {world_size} "
            f"processes; launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp"
        )
    return world_size // (tp * pp)


@dataclass
class ParallelState:
    tp: int
    pp: int
    dp: int
    rank: int
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    model_parallel_group: Optional[dist.ProcessGroup]  # the TP x PP ranks of one data-parallel replica
    sequence_parallel: bool = False

    # --- coordinates ---------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    # --- the mpu interface DeepSpeed calls --------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank - self.tp_rank

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_model_parallel_group(self):
        return self.model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        base = self.pp_rank * self.tp * self.dp + self.tp_rank
        return [base + d * self.tp for d in range(self.dp)]

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group


def initialize_parallel(tp: int = 1, pp: int = 1, sequence_parallel: bool = False) -> ParallelState:
    """Create the groups on the default process group (every rank must call this, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = check_parallel_sizes(world, tp, pp)
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # nothing to split: the plain path is the same computation

    def rank_of(t: int, d: int, p: int) -> int:
        return p * dp * tp + d * tp + t

    # new_group must be called by every rank for every group, in the same order.
    def make(groups: list[list[int]]):
        mine = None
        for ranks in groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        return mine

    tp_group = make([[rank_of(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)])
    dp_group = make([[rank_of(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)])
    pp_group = make([[rank_of(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)])
    mp_group = make([[rank_of(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])
    return ParallelState(tp, pp, dp, rank, tp_group, pp_group, dp_group, mp_group, sequence_parallel)
