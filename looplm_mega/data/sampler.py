"""Which samples each data-parallel rank reads, resumable from a consumed-sample count.

Global batch b of a stage is the samples [consumed + b * G, consumed + (b + 1) * G) of the stage's
dataset (whose order is already shuffled). It is cut into micro-batches of M samples, Megatron's
way: at accumulation step a, rank r of D reads the samples [(a * D + r) * M, (a * D + r + 1) * M)
of the global batch. Global batches therefore do not depend on the data-parallel size, and a run
resumed from consumed_samples = k * G reads exactly the batches that an uninterrupted run reads
from its (k + 1)-th global batch on.

A global batch of G samples is G / (M x D) consecutive units of M x D samples, so the trainer reads
a stream of such units (PretrainingSampler with global_batch_size = M x D) and any sequence of
global batch sizes (a batch ramp) still reads Megatron's layout. A curriculum stage with a new
sequence length or blend starts a new dataset at its sample 0 (training/curriculum.py).
"""

from __future__ import annotations

from typing import Iterator


def _check_batch_sizes(global_batch_size: int, micro_batch_size: int, data_parallel_size: int, where: str) -> None:
    if global_batch_size < 1 or micro_batch_size < 1 or data_parallel_size < 1:
        raise ValueError(f"{where}global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size} and "
                         f"data_parallel_size={data_parallel_size} must be at least 1")
    if global_batch_size % (micro_batch_size * data_parallel_size):
        raise ValueError(f"{where}global_batch_size={global_batch_size} is not a multiple of micro_batch_size="
                         f"{micro_batch_size} x data_parallel_size={data_parallel_size}")


class PretrainingSampler:
    """A batch sampler (for torch DataLoader's `batch_sampler`): yields this rank's micro-batches,
    lists of sample indices, global batch after global batch from `consumed_samples` on. A last
    global batch that the dataset cannot fill is dropped, so that every rank takes the same number
    of steps."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
    ):
        _check_batch_sizes(global_batch_size, micro_batch_size, data_parallel_size, "")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= num_samples:
            raise ValueError(f"consumed_samples={consumed_samples} outside the dataset's [0, {num_samples}] samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def num_global_batches(self) -> int:
        """Global batches left from consumed_samples on."""
        return (self.num_samples - self.consumed_samples) // self.global_batch_size

    def micro_batches(self, batch_start: int) -> list[list[int]]:
        """This rank's micro-batches of the global batch that starts at sample `batch_start`."""
        m, d, r = self.micro_batch_size, self.data_parallel_size, self.data_parallel_rank
        return [list(range(batch_start + (a * d + r) * m, batch_start + (a * d + r + 1) * m))
                for a in range(self.gradient_accumulation_steps)]

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.num_global_batches):
            yield from self.micro_batches(self.consumed_samples + b * self.global_batch_size)

    def __len__(self) -> int:
        return self.num_global_batches * self.gradient_accumulation_steps
