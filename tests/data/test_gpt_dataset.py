import json
import os
import pickle
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from looplm_mega.data.builder import build_datasets
from looplm_mega.data.config import DataConfig
from looplm_mega.data.gpt_dataset import (IGNORE_INDEX, GPTDataset, build_sample_indices, collate_batch,
                                          split_document_ranges)
from looplm_mega.data.index_cache import fingerprint
from looplm_mega.data.indexed import IndexedDataset
from looplm_mega.model.attention import segment_ids_from_eod
from tests.data.synthetic_datasets import write_multi_sequence_dataset, write_random_dataset
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def make_dataset(tmp_path, documents_range=None, num_samples=100, seq_length=16, seed=3, **kwargs):
    indexed = IndexedDataset(tmp_path / "data")
    document_range = documents_range or (0, indexed.num_documents)
    return GPTDataset(indexed, document_range, num_samples, seq_length, seed, cache_dir=tmp_path / "cache", **kwargs)


def brute_force(documents, order, seq_length):
    """Every sample of the stream of `documents` in `order`, and the segment ids (document piece
    number within the sample) of its tokens, from plain concatenation."""
    stream = np.concatenate([documents[d] for d in order])
    position = np.repeat(np.arange(len(order)), [len(documents[d]) for d in order])
    samples, segments = [], []
    for k in range((len(stream) - 1) // seq_length):
        window = slice(k * seq_length, (k + 1) * seq_length + 1)
        samples.append(stream[window])
        segments.append(np.concatenate([[0], np.cumsum(np.diff(position[window]) != 0)]))
    return samples, segments


def test_samples_equal_the_concatenated_documents_over_several_epochs(tmp_path):
    documents = write_random_dataset(tmp_path / "data", num_documents=30, max_length=12, seed=1)
    assert any(len(d) == 0 for d in documents)  # empty documents must be skipped
    tokens_per_epoch = sum(len(d) for d in documents)
    seq_length = 16
    num_samples = 3 * tokens_per_epoch // seq_length  # about three epochs
    dataset = make_dataset(tmp_path, num_samples=num_samples, seq_length=seq_length)
    assert dataset.num_epochs == 3 and len(dataset) == num_samples

    samples, segments = brute_force(documents, dataset.document_index, seq_length)
    for i in range(len(dataset)):
        k = dataset.shuffle_index[i]
        np.testing.assert_array_equal(dataset[i]["tokens"], samples[k])
        np.testing.assert_array_equal(dataset[i]["segment_ids"], segments[k])
        assert dataset[i]["tokens"].dtype == np.int64 and len(dataset[i]["tokens"]) == seq_length + 1
    # Consecutive samples overlap by exactly one token.
    np.testing.assert_array_equal(samples[0][-1], samples[1][0])


def test_each_epoch_visits_every_document_once_and_shuffles_within_the_epoch(tmp_path):
    documents = write_random_dataset(tmp_path / "data", num_documents=25, min_length=1, seed=2)
    tokens_per_epoch = sum(len(d) for d in documents)
    seq_length = 8
    dataset = make_dataset(tmp_path, num_samples=4 * tokens_per_epoch // seq_length, seq_length=seq_length)
    order = dataset.document_index
    assert len(order) >= dataset.num_epochs * 25
    epochs = order[: len(order) // 25 * 25].reshape(-1, 25)
    for epoch in epochs:
        assert sorted(epoch) == list(range(25))
    assert not all((epochs[0] == e).all() for e in epochs[1:])  # a fresh document order per epoch
    # Samples are served epoch by epoch: those of epoch e (whose first token lies in it) first.
    starts = np.asarray(dataset.shuffle_index[: len(dataset)]) * seq_length
    epoch_of_sample = starts // tokens_per_epoch
    assert (np.diff(epoch_of_sample) >= 0).all()
    first_epoch = dataset.shuffle_index[epoch_of_sample == 0]
    assert sorted(first_epoch) == list(range(len(first_epoch)))
    assert list(first_epoch) != sorted(first_epoch)


def test_segment_ids_from_the_index_agree_with_eod_tokens(tmp_path):
    eod = 0
    write_random_dataset(tmp_path / "data", num_documents=40, min_length=1, seed=4, eod_token_id=eod)
    by_index = make_dataset(tmp_path, seq_length=32)
    by_eod = make_dataset(tmp_path, seq_length=32, eod_token_id=eod)
    for i in range(len(by_index)):
        tokens = torch.from_numpy(by_index[i]["tokens"])[None]
        from_eod = segment_ids_from_eod(tokens, eod)[0].numpy()
        np.testing.assert_array_equal(by_index[i]["segment_ids"], from_eod)
        np.testing.assert_array_equal(by_eod[i]["segment_ids"], from_eod)
    assert "segment_ids" not in make_dataset(tmp_path, seq_length=32, reset_attention_mask=False)[0]


def test_eod_inside_a_stored_document_starts_a_new_segment(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=3, min_length=40, max_length=40, seed=5)
    indexed = IndexedDataset(tmp_path / "data")
    eod = int(indexed[0][10])
    by_index = make_dataset(tmp_path, num_samples=12, seq_length=20)
    by_both = make_dataset(tmp_path, num_samples=12, seq_length=20, eod_token_id=eod)
    eod_splits = 0
    for i in range(12):
        tokens, segments = by_index[i]["tokens"], by_index[i]["segment_ids"]
        is_start = (np.diff(segments) != 0) | (tokens[:-1] == eod)
        np.testing.assert_array_equal(by_both[i]["segment_ids"], np.concatenate([[0], np.cumsum(is_start)]))
        eod_splits += by_both[i]["segment_ids"][-1] - segments[-1]
    assert eod_splits > 0


def test_documents_of_several_sequences_stay_together_in_one_segment(tmp_path):
    documents = write_multi_sequence_dataset(tmp_path / "data", num_documents=20, seed=6)
    joined = [np.concatenate(d) for d in documents]
    indexed = IndexedDataset(tmp_path / "data")
    assert len(indexed) > indexed.num_documents
    dataset = make_dataset(tmp_path, num_samples=2 * sum(map(len, joined)) // 8, seq_length=8)
    # The stream is whole documents, each one's sequences in order: map sequences back to documents.
    document_indices = np.asarray(indexed.document_indices)
    document_of_sequence = np.repeat(np.arange(20), np.diff(document_indices))
    document_order = document_of_sequence[[s for s in dataset.document_index if s in document_indices[:-1]]]
    expected = np.concatenate([np.arange(document_indices[d], document_indices[d + 1]) for d in document_order])
    np.testing.assert_array_equal(dataset.document_index[: len(expected)], expected)
    samples, segments = brute_force(joined, document_order, 8)
    for i in range(len(dataset)):
        k = dataset.shuffle_index[i]
        np.testing.assert_array_equal(dataset[i]["tokens"], samples[k])
        np.testing.assert_array_equal(dataset[i]["segment_ids"], segments[k])


def test_split_document_ranges_are_contiguous_and_cover_everything():
    assert split_document_ranges(100, (0.969, 0.03, 0.001)) == [(0, 97), (97, 100), (100, 100)]
    assert split_document_ranges(10, (0.5, 0.5, 0.0)) == [(0, 5), (5, 10), (10, 10)]
    assert split_document_ranges(7, (1 / 3, 1 / 3, 1 / 3)) == [(0, 2), (2, 5), (5, 7)]


def test_splits_are_disjoint_by_document(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=50, min_length=1, seed=7)
    config = DataConfig(prefixes=[str(tmp_path / "data")], split="6,3,1", seq_length=8, cache_dir=str(tmp_path / "cache"))
    splits = build_datasets(config, {"train": 50, "valid": 20, "test": 5})
    documents = [set(np.asarray(s.document_index).tolist()) for s in splits]
    assert documents[0] == set(range(30)) and documents[1] == set(range(30, 45)) and documents[2] == set(range(45, 50))


def test_same_seed_gives_the_same_samples_and_another_seed_does_not(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=30, seed=8)
    first = make_dataset(tmp_path, seed=11)
    (tmp_path / "cache").rename(tmp_path / "cache_first")
    again = make_dataset(tmp_path, seed=11)
    assert again.built_indices  # really rebuilt, not loaded
    other = make_dataset(tmp_path, seed=12)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(first.indices[name], again.indices[name])
    assert not np.array_equal(first.shuffle_index, other.shuffle_index)


def test_indices_are_the_same_in_another_process(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=30, seed=9)
    indexed = IndexedDataset(tmp_path / "data")
    here = build_sample_indices(indexed.sequence_lengths, indexed.document_indices, (0, 30), 200, 16, 5)
    code = ("import sys; from looplm_mega.data.gpt_dataset import build_sample_indices; "
            "from looplm_mega.data.indexed import IndexedDataset; from looplm_mega.data.index_cache import fingerprint; "
            "d = IndexedDataset(sys.argv[1]); "
            "i = build_sample_indices(d.sequence_lengths, d.document_indices, (0, 30), 200, 16, 5); "
            "print(fingerprint(*i.values()))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fingerprint(*here.values())


def test_a_longer_run_sees_the_same_first_samples(tmp_path):
    documents = write_random_dataset(tmp_path / "data", num_documents=30, seed=10)
    tokens_per_epoch = sum(len(d) for d in documents)
    short = make_dataset(tmp_path, num_samples=tokens_per_epoch // 16 + 3)  # just into epoch 2
    long = make_dataset(tmp_path, num_samples=5 * tokens_per_epoch // 16)
    assert long.num_epochs > short.num_epochs
    for i in range(len(short)):
        np.testing.assert_array_equal(short[i]["tokens"], long[i]["tokens"])


def test_cache_is_loaded_the_second_time_and_rebuilt_when_a_parameter_changes(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=30, seed=11)
    first = make_dataset(tmp_path)
    assert first.built_indices
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 4 and not any(".tmp" in f.name for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = make_dataset(tmp_path)
    assert not second.built_indices
    assert isinstance(second.indices["shuffle_index"], np.memmap)
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").iterdir())] == mtimes
    np.testing.assert_array_equal(first[5]["tokens"], second[5]["tokens"])

    for changed in (dict(seed=4), dict(seq_length=12), dict(documents_range=(0, 20))):
        assert make_dataset(tmp_path, **changed).built_indices, changed
    assert len(list((tmp_path / "cache").glob("*_shuffle_index.npy"))) == 4


def test_cache_defaults_to_a_folder_next_to_the_data(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=10, min_length=1, seed=12)
    GPTDataset(IndexedDataset(tmp_path / "data"), (0, 10), 5, 4, seed=0)
    assert len(list((tmp_path / "index_cache").glob("data_train_*_sample_index.npy"))) == 1


def test_asking_samples_of_an_empty_split_names_the_dataset_and_split(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=10, min_length=1, seed=13)
    config = DataConfig(prefixes=[str(tmp_path / "data")], split="10,0,0", cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_datasets(config, {"train": 2})
    assert valid is None and test is None
    with pytest.raises(ValueError, match=r"data: the valid split \(documents 10..10\) has no tokens"):
        build_datasets(config, {"train": 2, "valid": 1})
    with pytest.raises(IndexError, match="outside the 2 samples"):
        train[2]


def test_collate_batch_gives_model_inputs_and_ignores_labels_across_documents():
    samples = [{"tokens": np.array([5, 6, 7, 8, 9]), "segment_ids": np.array([0, 0, 1, 1, 2])},
               {"tokens": np.array([1, 2, 3, 4, 5]), "segment_ids": np.array([0, 0, 0, 0, 0])}]
    batch = collate_batch(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[6, IGNORE_INDEX, 8, IGNORE_INDEX], [2, 3, 4, 5]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    plain = collate_batch([{"tokens": s["tokens"]} for s in samples])
    assert set(plain) == {"input_ids", "labels"} and plain["labels"].tolist()[0] == [6, 7, 8, 9]


def _build_on_rank(tmp_path: Path) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        dataset = make_dataset(tmp_path, num_samples=300)
        np.save(tmp_path / f"rank{rank}.npy", np.stack([dataset[i]["tokens"] for i in range(len(dataset))]))
        memory_mapped = isinstance(dataset.indices["shuffle_index"], np.memmap)
        report = {"built": dataset.built_indices, "memory_mapped": memory_mapped}
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_rank_0_builds_and_rank_1_loads_the_same_indices(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=60, seed=14)
    run_distributed(_build_on_rank, 2, tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports == [{"built": True, "memory_mapped": True}, {"built": False, "memory_mapped": True}]
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_pickling_refers_to_the_files_instead_of_copying_them(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=2000, min_length=100, max_length=200, seed=15)
    dataset = make_dataset(tmp_path, num_samples=20_000, seq_length=8)
    payload = pickle.dumps(dataset)
    assert len(payload) < 20_000  # the token file alone is 600 kB, the indices 400 kB
    copy = pickle.loads(payload)
    assert isinstance(copy.indices["shuffle_index"], np.memmap)
    for i in (0, 7, 19_999):
        np.testing.assert_array_equal(copy[i]["tokens"], dataset[i]["tokens"])
        np.testing.assert_array_equal(copy[i]["segment_ids"], dataset[i]["segment_ids"])
