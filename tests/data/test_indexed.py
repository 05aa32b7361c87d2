import struct

import numpy as np
import pytest

from looplm_mega.data import indexed
from looplm_mega.data.indexed import (MAGIC, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
                                      token_dtype)

# The format's dtype codes, written out here rather than imported: the test pins the format.
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def _write(prefix, documents, dtype=np.uint16):
    """documents: a list of documents, each a list of sequences."""
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for sequences in documents:
            for sequence in sequences:
                writer.add_sequence(sequence)
            writer.end_document()
    return prefix


def _files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_index_bytes_match_the_hand_computed_layout(tmp_path):
    # Three documents: [1 2 3], [4], and one of two sequences [5 6] + [7].
    _write(tmp_path / "d", [[[1, 2, 3]], [[4]], [[5, 6], [7]]])
    expected = (MAGIC + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 4) + struct.pack("<Q", 4)
                + struct.pack("<4i", 3, 1, 2, 1)      # sequence lengths
                + struct.pack("<4q", 0, 6, 8, 12)     # byte offsets of the uint16 sequences
                + struct.pack("<4q", 0, 1, 2, 4))     # document d = sequences [di[d], di[d+1])
    assert MAGIC == b"MMIDIDX\x00\x00"
    idx = (tmp_path / "d.idx").read_bytes()
    assert idx == expected
    assert np.frombuffer(idx[34:50], dtype="<i4").tolist() == [3, 1, 2, 1]
    assert (tmp_path / "d.bin").read_bytes() == np.arange(1, 8, dtype="<u2").tobytes()
    assert _files(tmp_path) == ["d.bin", "d.idx"]  # no temporary files left behind


@pytest.mark.parametrize("code", sorted(CODES))
def test_round_trip_for_every_dtype_code(tmp_path, code):
    dtype = np.dtype(CODES[code])
    values = np.array([0, 1, 7, 100, 3, 5], dtype=dtype)
    if dtype.kind in "if":
        values[1] = -2
    if dtype.kind == "f":
        values[2] = 0.25
    with IndexedDatasetWriter(tmp_path / "d", dtype) as writer:
        writer.add_documents(values, [2, 0, 3, 1])
    assert (tmp_path / "d.idx").read_bytes()[17] == code
    dataset = IndexedDataset(tmp_path / "d")
    assert dataset.dtype == dtype and len(dataset) == 4 and dataset.num_documents == 4 and dataset.num_tokens == 6
    assert dataset[0].tolist() == values[:2].tolist() and len(dataset[1]) == 0
    assert dataset[2].tolist() == values[2:5].tolist() and dataset.get(2, 1, 1).tolist() == [values[3]]
    assert dataset.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert dataset.sequence_pointers.tolist() == [0, 2 * dtype.itemsize, 2 * dtype.itemsize, 5 * dtype.itemsize]


def test_empty_dataset_round_trips(tmp_path):
    _write(tmp_path / "d", [])
    dataset = IndexedDataset(tmp_path / "d")
    assert len(dataset) == 0 and dataset.num_documents == 0 and dataset.num_tokens == 0


def test_token_dtype_follows_megatron():
    assert token_dtype(32768) == np.uint16 and token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32 and token_dtype(151_936) == np.int32


def _corrupt_idx(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, file, message", [
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8]), "d.idx", "truncated or corrupt"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "d.idx", "shorter than the 34-byte header"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "d.bin", "truncated or mismatched"),
    (lambda idx, bin_: _corrupt_idx(idx, 0, b"NOTMAGIC!"), "d.idx", "not a Megatron indexed dataset"),
    (lambda idx, bin_: _corrupt_idx(idx, 9, struct.pack("<Q", 2)), "d.idx", "unsupported version 2"),
    (lambda idx, bin_: _corrupt_idx(idx, 17, bytes([99])), "d.idx", "unknown dtype code 99"),
    # The last document index must equal the number of sequences (3 here), and they must rise.
    (lambda idx, bin_: _corrupt_idx(idx, 34 + 12 * 3 + 8 * 3, struct.pack("<q", 2)), "d.idx", "document indices"),
    (lambda idx, bin_: _corrupt_idx(idx, 34 + 12 * 3 + 8 * 1, struct.pack("<q", 3)), "d.idx", "document indices"),
    (lambda idx, bin_: bin_.unlink(), "d.bin", "does not exist"),
    # Entries in the middle (lengths 2, 1, 3; pointers 0, 4, 6): a negative length, a wrong pointer,
    # and a length whose sum still matches the .bin size (the total alone cannot see it).
    (lambda idx, bin_: _corrupt_idx(idx, 34 + 4, struct.pack("<i", -1)), "d.idx", "sequence 1 has length -1"),
    (lambda idx, bin_: _corrupt_idx(idx, 34 + 12 + 8, struct.pack("<q", 2)), "d.idx",
     "sequence 1 starts at byte 2 of the .bin, but the lengths before it put it at 4"),
    (lambda idx, bin_: _corrupt_idx(idx, 34 + 4, struct.pack("<i", 2)), "d.idx",
     "sequence 2 starts at byte 6 of the .bin, but the lengths before it put it at 8"),
])
def test_damaged_files_raise_an_error_naming_the_file(tmp_path, damage, file, message):
    _write(tmp_path / "d", [[[1, 2]], [[3]], [[4, 5, 6]]])
    IndexedDataset(tmp_path / "d")  # valid before the damage
    damage(tmp_path / "d.idx", tmp_path / "d.bin")
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(tmp_path / "d")
    assert str(tmp_path / file) in str(error.value)


def test_validation_in_chunks_finds_the_first_bad_entry_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_COPY_ITEMS", 3)  # entries cross several chunks
    _write(tmp_path / "d", [[[1, 2]], [[3]], [[4, 5]], [[6]], [[7, 8, 9]], [[10]], [[11]]])
    IndexedDataset(tmp_path / "d")
    _corrupt_idx(tmp_path / "d.idx", 34 + 7 * 4 + 3 * 8, struct.pack("<q", 99))  # the first entry of chunk 2
    with pytest.raises(IndexedDatasetError, match="sequence 3 starts at byte 99 .* put it at 10"):
        IndexedDataset(tmp_path / "d")
    _write(tmp_path / "d", [[[1, 2]], [[3]], [[4, 5]], [[6]], [[7, 8, 9]], [[10]], [[11]]])
    _corrupt_idx(tmp_path / "d.idx", 34 + 7 * 12 + 4 * 8, struct.pack("<q", 2))  # document 4 starts before 3
    with pytest.raises(IndexedDatasetError, match=r"entry 4 \(2\) is below entry 3 \(3\)"):
        IndexedDataset(tmp_path / "d")


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_interrupted_writer_leaves_no_pair_and_keeps_the_previous_one(tmp_path, interruption):
    with pytest.raises(interruption):
        with IndexedDatasetWriter(tmp_path / "new") as writer:
            writer.add_document([1, 2, 3])
            raise interruption()
    assert _files(tmp_path) == []
    _write(tmp_path / "old", [[[9, 9]]])
    with pytest.raises(interruption):
        with IndexedDatasetWriter(tmp_path / "old") as writer:
            writer.add_document([1, 2, 3])
            raise interruption()
    assert _files(tmp_path) == ["old.bin", "old.idx"]
    assert IndexedDataset(tmp_path / "old")[0].tolist() == [9, 9]


def test_add_dataset_appends_documents_and_shifts_indices(tmp_path):
    _write(tmp_path / "a", [[[1, 2]], [[3], [4, 5]]])
    _write(tmp_path / "b", [[[6]], [[7, 8], [9]]])
    with IndexedDatasetWriter(tmp_path / "ab") as writer:
        writer.add_dataset(tmp_path / "a")
        writer.add_document([10])
        writer.add_dataset(tmp_path / "b")
    merged = IndexedDataset(tmp_path / "ab")
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3], [4, 5], [10], [6], [7, 8], [9]]
    assert merged.document_indices.tolist() == [0, 1, 3, 4, 5, 7]
    assert merged.sequence_pointers.tolist() == [0, 4, 6, 10, 12, 14, 18]
    assert merged.num_documents == 5 and merged.num_tokens == 10


def test_add_dataset_rejects_another_dtype(tmp_path):
    _write(tmp_path / "a", [[[1, 2]]], dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype int32 differs from uint16"):
        with IndexedDatasetWriter(tmp_path / "out") as writer:
            writer.add_dataset(tmp_path / "a")
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_token_ids_that_do_not_fit_the_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="token id 70000 does not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as writer:
            writer.add_documents(np.array([1, 70000, 3]), [3])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
