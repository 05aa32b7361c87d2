"""BlendedDataset: samples drawn from several datasets in fixed proportions.

Which dataset serves blended sample i is decided by a deterministic schedule, not by random draws,
so the realised mixture follows the weights closely over every window and not just on average.
Megatron's schedule is a greedy loop (at each sample pick the dataset furthest below its target
count), a sequential recurrence that needs C++ to be fast. We use its vectorisable twin, stride
scheduling: the k-th sample of dataset j gets the key (k + 1/2) / w_j and samples are served in
key order (one stable sort). Among the first n samples, dataset j then has
floor(t * w_j + 1/2) for some t within m/2 of n (m datasets), so its count stays within
(m + 1) / 2 samples of n * w_j: over any window of 10,000 samples, proportions are within
(m + 1) / 10,000 of the weights (0.1% up to 9 datasets). The schedule of N samples is the prefix of
the schedule of any longer run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from looplm_mega.data.index_cache import arrays_for_pickling, arrays_from_pickling, cache_key, load_or_build

BLEND_FORMAT = 1
BLEND_ARRAYS = ("dataset_index", "dataset_sample_index")


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    valid = weights.ndim == 1 and len(weights) > 0 and np.all(np.isfinite(weights)) and np.all(weights >= 0)
    if not valid or weights.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)} must be finite, >= 0 and not all 0")
    # Rounded so that equal mixtures written differently ([7, 2, 1] and [0.7, 0.2, 0.1], whose
    # float sum is not exactly 1) give identical weights: exact key ties between datasets are
    # common, and an ulp of difference would break them the other way and change the schedule.
    return np.round(weights / weights.sum(), 12)


def build_blend_indices(weights: Sequence[float], num_samples: int) -> dict[str, np.ndarray]:
    """dataset_index[i]: the dataset of blended sample i; dataset_sample_index[i]: its sample
    number within that dataset (0, 1, 2 ... per dataset)."""
    weights = normalized_weights(weights)
    # Dataset j never gets more than n * w_j + (m + 1) / 2 of the first n samples: this many keys
    # per dataset always suffice.
    slack = len(weights) + 1
    keys, sources, numbers = [], [], []
    for j, weight in enumerate(weights):
        if weight == 0:
            continue
        count = min(num_samples, int(np.ceil(num_samples * weight)) + slack)
        number = np.arange(count, dtype=np.int64)
        keys.append((number + 0.5) / weight)
        sources.append(np.full(count, j, dtype=np.int16))
        numbers.append(number)
    # Stable sort: equal keys go to the lower dataset number, the same on every machine.
    order = np.argsort(np.concatenate(keys), kind="stable")[:num_samples]
    dataset_index = np.concatenate(sources)[order]
    dataset_sample_index = np.concatenate(numbers)[order]
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


def load_or_build_blend_indices(weights: Sequence[float], num_samples: int,
                                cache_dir: str | Path) -> tuple[dict[str, np.ndarray], bool]:
    """build_blend_indices, cached in `cache_dir` (built on rank 0, memory-mapped everywhere)."""
    weights = normalized_weights(weights)
    if num_samples == 0:
        return {"dataset_index": np.zeros(0, np.int16), "dataset_sample_index": np.zeros(0, np.int64)}, False
    params = {"format": BLEND_FORMAT, "weights": weights.tolist(), "num_samples": num_samples}
    name = f"blend_{cache_key(params)}"
    return load_or_build(cache_dir, name, BLEND_ARRAYS, lambda: build_blend_indices(weights, num_samples), params,
                         lambda arrays: check_blend_indices(arrays, len(weights), num_samples))


def check_blend_indices(arrays: dict[str, np.ndarray], num_datasets: int, num_samples: int) -> Optional[str]:
    """What is wrong with cached blend arrays (None: nothing found): cheap vectorised checks."""
    dataset_index, sample_index = (np.asarray(arrays[a]) for a in BLEND_ARRAYS)
    if dataset_index.shape != (num_samples,) or sample_index.shape != (num_samples,):
        return f"the arrays do not hold {num_samples} samples"
    if dataset_index.min() < 0 or dataset_index.max() >= num_datasets:
        return f"dataset_index holds datasets outside [0, {num_datasets})"
    for j in range(num_datasets):  # each dataset's samples are numbered 0, 1, 2 ... in blend order
        numbers = sample_index[dataset_index == j]
        if not np.array_equal(numbers, np.arange(len(numbers))):
            return f"dataset_sample_index does not number the samples of dataset {j} 0, 1, 2 ..."
    return None


def samples_per_dataset(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """How many samples of each dataset the blend uses."""
    return np.bincount(np.asarray(dataset_index), minlength=num_datasets)


class BlendedDataset:
    """dataset[i] = datasets[dataset_index[i]][dataset_sample_index[i]]. A dataset that the blend
    never uses (weight 0) may be None."""

    def __init__(self, datasets: Sequence[Optional[object]], indices: dict[str, np.ndarray]):
        self.datasets = list(datasets)
        self.dataset_index = indices["dataset_index"]
        self.dataset_sample_index = indices["dataset_sample_index"]
        needed = samples_per_dataset(self.dataset_index, len(self.datasets))
        if len(needed) > len(self.datasets):
            raise ValueError(f"the blend index refers to dataset {len(needed) - 1}, "
                             f"but only {len(self.datasets)} were given")
        for j, (dataset, count) in enumerate(zip(self.datasets, needed)):
            available = 0 if dataset is None else len(dataset)
            if available < count:
                raise ValueError(f"blended dataset {j} ({getattr(dataset, 'indexed', None) and dataset.indexed.prefix}) "
                                 f"has {available} samples but the blend needs {count}")

    def __getstate__(self) -> dict:
        # The schedule by file name, not by contents (see index_cache.arrays_for_pickling).
        state = dict(self.__dict__)
        state.update(arrays_for_pickling({k: getattr(self, k) for k in BLEND_ARRAYS}))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.update(arrays_from_pickling({k: state[k] for k in BLEND_ARRAYS}))

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"blended sample {i} outside [0, {len(self)})")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
