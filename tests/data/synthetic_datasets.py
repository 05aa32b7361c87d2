"""Small indexed datasets of random tokens for the dataset tests (no tokenizer needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from looplm_mega.data.indexed import IndexedDatasetWriter


def write_random_dataset(prefix: Path, num_documents: int, seed: int = 0, min_length: int = 0, max_length: int = 40,
                         vocab_size: int = 1000, eod_token_id: Optional[int] = None) -> list[np.ndarray]:
    """One-sequence documents of random lengths in [min_length, max_length] (0 allowed: empty
    documents are legal and must be skipped); with eod_token_id, every document ends with it and
    contains it nowhere else. Returns the documents."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=num_documents)
    low = 0 if eod_token_id is None else eod_token_id + 1
    tokens = rng.integers(low, vocab_size, size=int(lengths.sum()))
    if eod_token_id is not None:
        tokens[np.cumsum(lengths)[lengths > 0] - 1] = eod_token_id
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents(tokens, lengths)
    return np.split(tokens, np.cumsum(lengths)[:-1])


def write_multi_sequence_dataset(prefix: Path, num_documents: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Documents of 1 to 3 sequences each (the writer's add_sequence / end_document)."""
    rng = np.random.default_rng(seed)
    documents = [[rng.integers(0, 1000, size=int(rng.integers(1, 12))) for _ in range(int(rng.integers(1, 4)))]
                 for _ in range(num_documents)]
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in documents:
            for sequence in document:
                writer.add_sequence(sequence)
            writer.end_document()
    return documents
