"""Megatron-compatible binary indexed datasets: `{prefix}.bin` holds the tokens of every sequence
back to back, `{prefix}.idx` the index (layout below, little-endian; S sequences, D = documents + 1):

    offset      size  content
    0           9     magic b"MMIDIDX\\x00\\x00"
    9           8     uint64 version = 1
    17          1     uint8 dtype code (DTYPE_CODES)
    18          8     uint64 S
    26          8     uint64 D
    34          4 S   int32 sequence lengths (tokens)
    34 + 4 S    8 S   int64 byte offset of each sequence in .bin
    34 + 12 S   8 D   int64 document indices: document d = sequences [di[d], di[d+1])

The writer streams: tokens go to disk as they come and the per-sequence lengths spill to a side
file, so memory stays bounded however large the shard (Megatron's builder keeps Python lists of
every length and runs out of memory on big shards). Both files are written under temporary names
and renamed only when complete. The reader memory-maps both files and validates every entry of
the index, and the index against the data, before use.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_COPY_ITEMS = 1 << 22  # items per chunk when streaming arrays between files


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, truncated or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits with room for special tokens (Megatron's rule), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Streams sequences into `{prefix}.bin/.idx`. Use as a context manager: the pair appears under
    its final names only when the block exits without an exception.

        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for tokens in documents:
                writer.add_document(tokens)
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no code in the indexed format (known: {sorted(map(str, CODE_OF_DTYPE))})")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = {name: Path(f"{self.prefix}.{name}.tmp") for name in ("bin", "idx", "lengths", "docs")}
        self._bin = open(self._tmp["bin"], "wb")
        self._lengths = open(self._tmp["lengths"], "wb")
        self._docs = open(self._tmp["docs"], "wb")
        self._docs.write(np.zeros(1, dtype=np.int64).tobytes())
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0

    def _converted(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens in the file's dtype; a value that does not fit is an error, not a silent wrap."""
        if tokens.dtype != self.dtype and len(tokens) and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            low, high = tokens.min(), tokens.max()
            if low < info.min or high > info.max:
                raise ValueError(f"{self.prefix}: token id {high if high > info.max else low} does not fit {self.dtype}")
        return tokens.astype(self.dtype, copy=False)

    def add_sequence(self, tokens) -> None:
        """One sequence; it joins the current document until end_document()."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a sequence must be one-dimensional, got shape {array.shape}")
        self._bin.write(self._converted(array).tobytes(order="C"))
        self._lengths.write(np.array([len(array)], dtype=np.int32).tobytes())
        self.num_sequences += 1
        self.num_tokens += len(array)

    def end_document(self) -> None:
        self._docs.write(np.array([self.num_sequences], dtype=np.int64).tobytes())
        self.num_documents += 1

    def add_document(self, tokens) -> None:
        """A document made of one sequence (how GPT pretraining data is stored)."""
        self.add_sequence(tokens)
        self.end_document()

    def add_documents(self, tokens, lengths) -> None:
        """Many one-sequence documents at once: `tokens` concatenated, `lengths` per document."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != len(tokens):
            raise ValueError(f"lengths sum to {lengths.sum()} but {len(tokens)} tokens were given")
        self._bin.write(self._converted(tokens).tobytes())
        self._lengths.write(lengths.astype(np.int32).tobytes())
        ends = self.num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.num_sequences += len(lengths)
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_dataset(self, prefix: str | Path) -> None:
        """Append every document of an existing dataset (tools/merge_datasets.py)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{data_path(prefix)}: dtype {other.dtype} differs from {self.dtype} of {self.prefix}")
        with open(data_path(prefix), "rb") as f:
            while block := f.read(_COPY_ITEMS * 8):
                self._bin.write(block)
        for start in range(0, len(other), _COPY_ITEMS):
            self._lengths.write(np.asarray(other.sequence_lengths[start : start + _COPY_ITEMS]).tobytes())
        docs = np.asarray(other.document_indices[1:], dtype=np.int64) + self.num_sequences
        self._docs.write(docs.tobytes())
        self.num_sequences += len(other)
        self.num_documents += other.num_documents
        self.num_tokens += other.num_tokens

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        lengths = np.memmap(self._tmp["lengths"], dtype=np.int32, mode="r") if self.num_sequences else np.zeros(0, np.int32)
        docs = np.fromfile(self._tmp["docs"], dtype=np.int64)
        with open(self._tmp["idx"], "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", self.num_sequences))
            f.write(struct.pack("<Q", len(docs)))
            for start in range(0, self.num_sequences, _COPY_ITEMS):
                f.write(np.asarray(lengths[start : start + _COPY_ITEMS]).tobytes())
            offset = 0
            for start in range(0, self.num_sequences, _COPY_ITEMS):
                nbytes = np.asarray(lengths[start : start + _COPY_ITEMS], dtype=np.int64) * self.dtype.itemsize
                pointers = offset + np.cumsum(nbytes) - nbytes
                f.write(pointers.tobytes())
                offset += int(nbytes.sum())
            f.write(docs.tobytes())
        del lengths
        # The old index goes first: a crash between the renames leaves no valid-looking pair.
        index_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._tmp["bin"], data_path(self.prefix))
        os.replace(self._tmp["idx"], index_path(self.prefix))
        self._cleanup()

    def abort(self) -> None:
        for f in (self._bin, self._lengths, self._docs):
            with contextlib.suppress(OSError):  # on a full disk, closing flushes and fails again
                f.close()
        self._cleanup(include_outputs=True)

    def _cleanup(self, include_outputs: bool = False) -> None:
        names = ("lengths", "docs", "bin", "idx") if include_outputs else ("lengths", "docs")
        for name in names:
            self._tmp[name].unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:  # a full disk while writing the index, a signal
                self.abort()
                raise
        else:
            self.abort()


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _validate_entries(idx: Path, lengths: np.ndarray, pointers: np.ndarray, documents: np.ndarray, itemsize: int) -> int:
    """Check every entry of an index (a corrupt one in the middle would otherwise crash inside the
    model or yield empty samples): lengths >= 0, each pointer the running sum of the lengths before
    it times the item size, document indices rising from 0 to the number of sequences. Vectorised,
    in chunks (bounded memory for any size). Returns the byte size the .bin must have."""
    offset = 0  # bytes before the chunk
    for start in range(0, len(lengths), _COPY_ITEMS):
        chunk = np.asarray(lengths[start : start + _COPY_ITEMS], dtype=np.int64)
        if (chunk < 0).any():
            i = start + _first(chunk < 0)
            raise IndexedDatasetError(f"{idx}: sequence {i} has length {int(lengths[i])} (negative)")
        nbytes = chunk * itemsize
        expected = offset + np.cumsum(nbytes) - nbytes
        wrong = np.asarray(pointers[start : start + _COPY_ITEMS]) != expected
        if wrong.any():
            i = _first(wrong)
            raise IndexedDatasetError(f"{idx}: sequence {start + i} starts at byte {int(pointers[start + i])} of the .bin, "
                                      f"but the lengths before it put it at {int(expected[i])}")
        offset += int(nbytes.sum())
    num_sequences = len(lengths)
    if documents[0] != 0 or documents[-1] != num_sequences:
        raise IndexedDatasetError(f"{idx}: document indices must rise from 0 to {num_sequences}, "
                                  f"but run from {int(documents[0])} to {int(documents[-1])}")
    for start in range(0, len(documents) - 1, _COPY_ITEMS):
        falls = np.diff(np.asarray(documents[start : start + _COPY_ITEMS + 1])) < 0
        if falls.any():
            d = start + _first(falls) + 1
            raise IndexedDatasetError(f"{idx}: document indices must rise from 0 to {num_sequences}, but entry {d} "
                                      f"({int(documents[d])}) is below entry {d - 1} ({int(documents[d - 1])})")
    return offset


class IndexedDataset:
    """Memory-mapped reader of `{prefix}.bin/.idx`; reads are zero-copy numpy views."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, bin_ = index_path(prefix), data_path(prefix)
        for path in (idx, bin_):
            if not path.exists():
                raise IndexedDatasetError(f"{path}: file does not exist")
        size = idx.stat().st_size
        if size < HEADER_BYTES:
            raise IndexedDatasetError(f"{idx}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
        with open(idx, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[:9] != MAGIC:
            raise IndexedDatasetError(f"{idx}: not a Megatron indexed dataset (magic {header[:9]!r}, expected {MAGIC!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx}: unsupported version {version} (expected {VERSION})")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        num_sequences, num_doc_entries = struct.unpack("<QQ", header[18:34])
        expected = HEADER_BYTES + 12 * num_sequences + 8 * num_doc_entries
        if size != expected:
            raise IndexedDatasetError(
                f"{idx}: {size} bytes, but a header of {num_sequences} sequences and {num_doc_entries} "
                f"document entries needs {expected} (truncated or corrupt)")
        if num_doc_entries < 1:
            raise IndexedDatasetError(f"{idx}: the document index is empty (it must start with 0)")
        mm = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sequence_lengths = mm[HEADER_BYTES : HEADER_BYTES + 4 * num_sequences].view(np.int32)
        self.sequence_pointers = mm[HEADER_BYTES + 4 * num_sequences : HEADER_BYTES + 12 * num_sequences].view(np.int64)
        self.document_indices = mm[HEADER_BYTES + 12 * num_sequences : expected].view(np.int64)
        needed = _validate_entries(idx, self.sequence_lengths, self.sequence_pointers, self.document_indices,
                                   self.dtype.itemsize)
        bin_size = bin_.stat().st_size
        if bin_size != needed:
            raise IndexedDatasetError(f"{bin_}: {bin_size} bytes, but {idx} describes {needed} (truncated or mismatched pair)")
        self._bin = np.memmap(bin_, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        if bin_size and hasattr(mmap, "MADV_RANDOM"):
            # Samples are read at random places: without this hint every first touch of a page
            # pulls in the whole read-ahead window (8 MB on some VMs, ~5 ms a sample).
            self._bin._mmap.madvise(mmap.MADV_RANDOM)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `index`, as a read-only view of the file."""
        seq_len = int(self.sequence_lengths[index])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) outside sequence {index} of length {seq_len}")
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return self._bin[start : start + length * self.dtype.itemsize].view(self.dtype)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)
