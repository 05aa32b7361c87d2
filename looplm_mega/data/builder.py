"""build_datasets: from a DataConfig and sample counts to the train/valid/test datasets.

Every dataset of the blend is split by document with the same ratios; a split draws from the
datasets by the blend weights. The blend schedule is built first, so that each dataset is asked
for exactly the samples the blend takes from it (no safety margin, no wasted index).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np

from looplm_mega.data.blended import BlendedDataset, load_or_build_blend_indices, samples_per_dataset
from looplm_mega.data.config import SPLIT_NAMES, DataConfig
from looplm_mega.data.gpt_dataset import GPTDataset, split_document_ranges
from looplm_mega.data.index_cache import default_cache_dir
from looplm_mega.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)

Dataset = Union[GPTDataset, BlendedDataset]


def build_datasets(config: DataConfig, num_samples: dict[str, int]) -> tuple[Optional[Dataset], ...]:
    """(train, valid, test) with num_samples[name] samples each; None for a split asked for 0
    samples (or left out of num_samples)."""
    unknown = sorted(set(num_samples) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"num_samples: unknown split {unknown[0]!r} (known: {', '.join(SPLIT_NAMES)})")
    for name, count in num_samples.items():
        if count < 0:
            raise ValueError(f"num_samples[{name!r}] = {count} must be >= 0")
    indexed = [IndexedDataset(prefix) for prefix in config.prefixes]
    if config.weights is not None:
        weights = np.asarray(config.weights, dtype=np.float64)
    else:
        weights = np.asarray([d.num_tokens for d in indexed], dtype=np.float64)
        if weights.sum() == 0:
            raise ValueError(f"prefixes: the datasets {config.prefixes} hold no tokens")
    ranges = [split_document_ranges(d.num_documents, config.split_ratios) for d in indexed]
    return tuple(_build_split(config, indexed, weights, ranges, s, num_samples.get(name, 0))
                 for s, name in enumerate(SPLIT_NAMES))


def _build_split(config: DataConfig, indexed: list[IndexedDataset], weights: np.ndarray,
                 ranges: list[list[tuple[int, int]]], split: int, count: int) -> Optional[Dataset]:
    if count == 0:
        return None
    name = SPLIT_NAMES[split]

    def dataset(j: int, samples: int) -> GPTDataset:
        return GPTDataset(indexed[j], ranges[j][split], samples, config.seq_length, config.seed, split_name=name,
                          cache_dir=config.cache_dir, reset_attention_mask=config.reset_attention_mask,
                          eod_token_id=config.eod_token_id)

    if len(indexed) == 1:
        return dataset(0, count)
    blend_dir = Path(config.cache_dir) if config.cache_dir is not None else default_cache_dir(indexed[0].prefix)
    blend, _ = load_or_build_blend_indices(weights, count, blend_dir)
    needed = samples_per_dataset(blend["dataset_index"], len(indexed))
    datasets = [dataset(j, int(n)) if n else None for j, n in enumerate(needed)]
    logger.info("%s: %d samples blended from %s", name, count,
                ", ".join(f"{d.prefix.name}: {n}" for d, n in zip(indexed, needed)))
    return BlendedDataset(datasets, blend)
