"""DataConfig: what a training run reads (a weighted blend of indexed datasets) and how it is cut
into samples (sequence length, train/valid/test split, shuffle seed, document masking)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from looplm_mega.config import ConfigError

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class DataConfig:
    # Dataset prefixes: `{prefix}.bin/.idx` pairs written by tools/preprocess_data.py.
    prefixes: list[str] = field(default_factory=list)
    # Blend weights, one per prefix, normalised to sum to 1. None: proportional to each dataset's
    # token count, i.e. the natural mixture of the concatenated data.
    weights: Optional[list[float]] = None
    # Train/valid/test ratios over the documents of every dataset, as Megatron's "969,30,1" (or
    # "969/30/1", or a list). Missing trailing parts are 0: "98,2" has no test split.
    split: Union[str, list[float]] = "969,30,1"
    seq_length: int = 4096  # tokens per sample (each sample reads one more, for the labels)
    seed: int = 1234  # the shuffle of documents and samples
    # Document masking: each sample carries segment ids (document index per token) so attention
    # stays within a document and positions restart. Documents are delimited by the index; with
    # eod_token_id set, a document also ends after every EOD token inside a stored document.
    reset_attention_mask: bool = True
    eod_token_id: Optional[int] = None  # see reset_attention_mask
    # Where the .npy index caches go. None: an `index_cache` folder next to each dataset.
    cache_dir: Optional[str] = None

    def __post_init__(self):
        if not self.prefixes:
            raise ConfigError("prefixes: at least one dataset prefix is needed")
        for i, prefix in enumerate(self.prefixes):
            if not prefix:
                raise ConfigError(f"prefixes[{i}]: empty dataset prefix")
            if prefix.endswith((".bin", ".idx")):
                raise ConfigError(f"prefixes[{i}]: {prefix!r} should be the prefix without .bin/.idx")
        if self.weights is not None:
            if len(self.weights) != len(self.prefixes):
                raise ConfigError(f"weights: {len(self.weights)} weights for {len(self.prefixes)} prefixes")
            for i, weight in enumerate(self.weights):
                if not math.isfinite(weight) or weight < 0:
                    raise ConfigError(f"weights[{i}]: {weight} must be a finite number >= 0")
            if sum(self.weights) <= 0:
                raise ConfigError(f"weights: {self.weights} must not all be 0")
        self.split_ratios  # validates the split
        if self.seq_length < 1:
            raise ConfigError(f"seq_length: {self.seq_length} must be at least 1")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: {self.seed} must be in [0, 2**32) (numpy's seed range)")
        if self.eod_token_id is not None and self.eod_token_id < 0:
            raise ConfigError(f"eod_token_id: {self.eod_token_id} must be >= 0")

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        """The train/valid/test ratios, normalised to sum to 1."""
        parts = self.split
        if isinstance(parts, str):
            separator = "/" if "/" in parts else ","
            try:
                parts = [float(p) for p in parts.split(separator)]
            except ValueError:
                raise ConfigError(f"split: {self.split!r} is not a list of numbers such as '969,30,1'") from None
        if not 1 <= len(parts) <= 3:
            raise ConfigError(f"split: {self.split!r} needs 1 to 3 parts (train, valid, test)")
        if any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError(f"split: {self.split!r} parts must be >= 0 and not all 0")
        parts = list(parts) + [0.0] * (3 - len(parts))
        total = sum(parts)
        return tuple(p / total for p in parts)  # type: ignore[return-value]
