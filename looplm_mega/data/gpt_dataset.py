"""GPTDataset: fixed-length training samples packed across the documents of one indexed dataset.

Picture the documents of a split laid end to end, in a freshly shuffled order for every epoch, as
one token stream. Sample k is the seq_length + 1 tokens starting at token k * seq_length, so
consecutive samples overlap by one token (the last input of one sample is the first of the next,
and every token is a label exactly once) and a sample may span several documents. Three index
arrays describe this, built once with numpy and cached as .npy (index_cache.py):

    document_index  [E * sequences in split]  the sequence ids of the stream, epoch after epoch
    sample_index    [K + 1, 2]                (position in document_index, token offset) of the
                                              start of samples 0..K (entry k + 1 ends sample k)
    shuffle_index   [K]                       the order in which samples are served

Samples are shuffled within their epoch (the epoch in which their first token lies) rather than
across all epochs, so every document is seen once before any is seen twice. Each epoch's document
order and sample order come from seeds of their own, so the first N samples are the same whatever
number of samples was asked for: a run extended past its planned length sees the same prefix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from looplm_mega.data.index_cache import (arrays_for_pickling, arrays_from_pickling, cache_key, default_cache_dir,
                                          fingerprint, load_or_build)
from looplm_mega.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the way indices are built changes: every cached name changes with it
INDEX_ARRAYS = ("document_index", "sample_index", "shuffle_index")
_DOCUMENT_STREAM, _SAMPLE_STREAM = 0, 1  # separate random streams for the two shuffles
IGNORE_INDEX = -100  # label value the losses skip


def split_document_ranges(num_documents: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [first, last) document ranges for the train/valid/test ratios. Contiguous ranges
    (as Megatron) keep the validation set independent of the shuffle seed."""
    ratios = np.asarray(ratios, dtype=np.float64)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(ratios / ratios.sum())]) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def sequences_of_documents(documents: np.ndarray, document_indices: np.ndarray) -> np.ndarray:
    """The sequence ids of `documents`, in that order (document d holds sequences
    [document_indices[d], document_indices[d + 1]))."""
    starts = np.asarray(document_indices[documents], dtype=np.int64)
    counts = np.asarray(document_indices[documents + 1], dtype=np.int64) - starts
    # Sequence i of the output belongs to a document whose first sequence sits at output position
    # cumsum(counts) - counts; shift a running arange by that difference.
    shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return shift + np.arange(len(shift), dtype=np.int64)


def build_sample_indices(
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
    document_range: tuple[int, int],
    num_samples: int,
    seq_length: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The three index arrays (see the module docstring) for at least `num_samples` samples of the
    documents in `document_range`; whole epochs of samples are built (num_sample_epochs)."""
    first, last = document_range
    documents = np.arange(first, last, dtype=np.int64)
    tokens_per_epoch = _tokens_in_range(sequence_lengths, document_indices, document_range)
    num_epochs = num_sample_epochs(tokens_per_epoch, num_samples, seq_length)
    num_built = -(-num_epochs * tokens_per_epoch // seq_length)  # samples starting in those epochs
    # The last sample reads seq_length + 1 tokens from its start: shuffle enough further epochs
    # of documents to hold them.
    num_document_epochs = -(-(num_built * seq_length + 1) // tokens_per_epoch)

    order = [sequences_of_documents(_random(seed, _DOCUMENT_STREAM, e).permutation(documents), document_indices)
             for e in range(num_document_epochs)]
    document_index = np.concatenate(order)
    lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    starts = np.arange(num_built + 1, dtype=np.int64) * seq_length
    # side="right": a sample that starts exactly where a sequence ends starts in the next one
    # (empty sequences are skipped the same way).
    positions = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[positions] - lengths[positions])
    sample_index = np.stack([positions, offsets], axis=1)

    epoch_bounds = -(-np.arange(num_epochs + 1, dtype=np.int64) * tokens_per_epoch // seq_length)
    shuffle_index = np.concatenate([
        lo + _random(seed, _SAMPLE_STREAM, e).permutation(hi - lo)
        for e, (lo, hi) in enumerate(zip(epoch_bounds[:-1], epoch_bounds[1:]))
    ])
    index_dtype = np.int32 if len(sequence_lengths) < 2**31 else np.int64
    return {"document_index": document_index.astype(index_dtype), "sample_index": sample_index,
            "shuffle_index": shuffle_index}


def check_sample_indices(arrays: dict[str, np.ndarray], first_sequence: int, end_sequence: int,
                         num_samples: int) -> Optional[str]:
    """What is wrong with cached index arrays (None: nothing found), by cheap vectorised range
    checks: a cache file overwritten with other numbers would otherwise read the wrong tokens or
    fail deep inside a DataLoader worker."""
    document_index, sample_index, shuffle_index = (np.asarray(arrays[a]) for a in INDEX_ARRAYS)
    if document_index.ndim != 1 or sample_index.ndim != 2 or sample_index.shape[1:] != (2,) or shuffle_index.ndim != 1:
        return "document_index, sample_index, shuffle_index have the wrong shapes"
    if len(document_index) == 0 or len(sample_index) < 2:
        return "empty document_index or sample_index"
    if document_index.min() < first_sequence or document_index.max() >= end_sequence:
        return f"document_index holds sequences outside [{first_sequence}, {end_sequence})"
    positions, offsets = sample_index[:, 0], sample_index[:, 1]
    if positions.min() < 0 or positions.max() >= len(document_index) or (np.diff(positions) < 0).any():
        return "sample_index positions do not rise within the document_index"
    if offsets.min() < 0:
        return "sample_index holds negative token offsets"
    if len(shuffle_index) < num_samples:
        return f"shuffle_index holds {len(shuffle_index)} samples, fewer than the {num_samples} asked for"
    if shuffle_index.min() < 0 or shuffle_index.max() >= len(sample_index) - 1:
        return f"shuffle_index holds samples outside [0, {len(sample_index) - 1})"
    return None


def _random(seed: int, stream: int, epoch: int) -> np.random.RandomState:
    # The legacy RandomState, not default_rng: numpy freezes its streams across versions (NEP 19),
    # so a run resumed elsewhere without the cache rebuilds the very same order.
    return np.random.RandomState([seed, stream, epoch])


def num_sample_epochs(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Epochs whose samples cover `num_samples` (sample k starts in epoch k * seq_length // tokens)."""
    return (num_samples - 1) * seq_length // tokens_per_epoch + 1


def _tokens_in_range(sequence_lengths: np.ndarray, document_indices: np.ndarray, document_range: tuple[int, int]) -> int:
    first_sequence, end_sequence = int(document_indices[document_range[0]]), int(document_indices[document_range[1]])
    return int(np.asarray(sequence_lengths[first_sequence:end_sequence]).sum(dtype=np.int64))


class GPTDataset:
    """Samples of `seq_length + 1` tokens from the documents `document_range` of `indexed`.

    dataset[i] is a dict: "tokens" int64 [seq_length + 1] and, with reset_attention_mask,
    "segment_ids" int64 [seq_length + 1] (0, 1, ... one per document piece in the sample).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        document_range: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        *,
        split_name: str = "train",
        cache_dir: Optional[str | Path] = None,
        reset_attention_mask: bool = True,
        eod_token_id: Optional[int] = None,
    ):
        first, last = document_range
        if not 0 <= first <= last <= indexed.num_documents:
            raise ValueError(f"{indexed.prefix}: document range {document_range} outside [0, {indexed.num_documents}]")
        if num_samples < 0 or seq_length < 1:
            raise ValueError(f"{indexed.prefix}: num_samples={num_samples} must be >= 0 and seq_length={seq_length} >= 1")
        self.indexed = indexed
        self.document_range = (first, last)
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.seed = seed
        self.split_name = split_name
        self.reset_attention_mask = reset_attention_mask
        self.eod_token_id = eod_token_id
        self.tokens_per_epoch = _tokens_in_range(indexed.sequence_lengths, indexed.document_indices, self.document_range)
        self.built_indices = False  # whether this process built the indices (False: loaded them)
        if num_samples == 0:
            self.indices = {"document_index": np.zeros(0, np.int32), "sample_index": np.zeros((1, 2), np.int64),
                            "shuffle_index": np.zeros(0, np.int64)}
            self.num_epochs = 0
        else:
            if self.tokens_per_epoch == 0:
                raise ValueError(f"{indexed.prefix}: the {split_name} split (documents {first}..{last}) has no tokens, "
                                 f"but {num_samples} samples were asked of it; check data.split")
            self.num_epochs = num_sample_epochs(self.tokens_per_epoch, num_samples, seq_length)
            self.indices = self._load_or_build_indices(cache_dir)
        self._attach()

    def _attach(self) -> None:
        """Set the arrays that __getitem__ reads (again after unpickling)."""
        # Plain ndarray views of the memory maps: np.memmap's per-item indexing is several times slower.
        self.document_index = np.asarray(self.indices["document_index"])
        self.sample_index = np.asarray(self.indices["sample_index"])
        self.shuffle_index = np.asarray(self.indices["shuffle_index"])
        self._sequence_lengths = np.asarray(self.indexed.sequence_lengths)
        # Sequences that continue a document (the writer's add_sequence) must not start a segment.
        self._continues_document = None
        if len(self.indexed) != self.indexed.num_documents:
            first_sequences = np.asarray(self.indexed.document_indices[:-1])
            self._continues_document = np.ones(len(self.indexed), dtype=bool)
            self._continues_document[first_sequences[first_sequences < len(self.indexed)]] = False

    def __getstate__(self) -> dict:
        # Files by name, not by contents (DataLoader workers under spawn / forkserver pickle this).
        derived = ("document_index", "sample_index", "shuffle_index", "_sequence_lengths", "_continues_document")
        state = {k: v for k, v in self.__dict__.items() if k not in derived}
        state["indexed"] = self.indexed.prefix
        state["indices"] = arrays_for_pickling(self.indices)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.indexed = IndexedDataset(state["indexed"])
        self.indices = arrays_from_pickling(state["indices"])
        self._attach()

    def _load_or_build_indices(self, cache_dir: Optional[str | Path]) -> dict[str, np.ndarray]:
        indexed, (first, last) = self.indexed, self.document_range
        first_sequence, end_sequence = int(indexed.document_indices[first]), int(indexed.document_indices[last])
        # The indices depend on the split's sequence lengths and document structure, not on the
        # tokens nor on where the files live: hash those, so a moved or re-tokenised copy with the
        # same structure reuses the cache and any other change rebuilds it.
        structure = fingerprint(indexed.sequence_lengths[first_sequence:end_sequence],
                                np.asarray(indexed.document_indices[first : last + 1]) - first_sequence)
        params = {"format": INDEX_FORMAT, "structure": structure, "first_document": first,
                  "first_sequence": first_sequence, "seq_length": self.seq_length, "seed": self.seed,
                  "num_epochs": self.num_epochs}
        name = f"{indexed.prefix.name}_{self.split_name}_{cache_key(params)}"
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed.prefix)
        description = {**params, "prefix": str(indexed.prefix), "split": self.split_name,
                       "document_range": [first, last], "num_samples_requested": self.num_samples}
        build = lambda: build_sample_indices(indexed.sequence_lengths, indexed.document_indices,  # noqa: E731
                                             self.document_range, self.num_samples, self.seq_length, self.seed)
        check = lambda arrays: check_sample_indices(arrays, first_sequence, end_sequence, self.num_samples)  # noqa: E731
        indices, self.built_indices = load_or_build(directory, name, INDEX_ARRAYS, build, description, check)
        available = len(indices["shuffle_index"])
        if available < self.num_samples:
            raise ValueError(f"{directory / name}: cached index holds {available} samples, fewer than the "
                             f"{self.num_samples} asked for; delete the stale cache files")
        return indices

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} outside the {self.num_samples} samples of "
                             f"{self.indexed.prefix} ({self.split_name})")
        k = int(self.shuffle_index[i % self.num_samples])
        (first_position, first_offset), (last_position, last_offset) = self.sample_index[k], self.sample_index[k + 1]
        pieces, segment_starts = [], []
        filled = 0
        for position in range(int(first_position), int(last_position) + 1):
            sequence = int(self.document_index[position])
            start = int(first_offset) if position == first_position else 0
            end = int(last_offset) + 1 if position == last_position else int(self._sequence_lengths[sequence])
            if end > start:
                continues = self._continues_document is not None and self._continues_document[sequence]
                if filled and start == 0 and not continues:
                    segment_starts.append(filled)
                pieces.append(self.indexed.get(sequence, start, end - start))
                filled += end - start
        tokens = np.concatenate(pieces).astype(np.int64)
        sample = {"tokens": tokens}
        if self.reset_attention_mask:
            is_start = np.zeros(len(tokens), dtype=np.int64)
            is_start[segment_starts] = 1
            if self.eod_token_id is not None:
                # EOD closes the document it ends (attention.segment_ids_from_eod's convention).
                is_start[1:] |= tokens[:-1] == self.eod_token_id
            sample["segment_ids"] = np.cumsum(is_start)
        return sample


def collate_batch(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into the model's inputs: input_ids, labels (the next tokens) and, when the
    samples carry them, segment_ids. A label in another document than its input is ignored
    (IGNORE_INDEX): with document masking the input cannot see the context that predicts it."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
    if "segment_ids" in samples[0]:
        segments = torch.from_numpy(np.stack([s["segment_ids"] for s in samples]))
        batch["labels"][segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX
        batch["segment_ids"] = segments[:, :-1]
    return batch
