import pickle
import time

import numpy as np
import pytest

from looplm_mega.data.blended import (BlendedDataset, build_blend_indices, load_or_build_blend_indices,
                                      normalized_weights)
from looplm_mega.data.builder import build_datasets
from looplm_mega.data.config import DataConfig
from looplm_mega.data.gpt_dataset import GPTDataset
from looplm_mega.data.indexed import IndexedDataset
from tests.data.synthetic_datasets import write_random_dataset


def window_proportions(dataset_index: np.ndarray, num_datasets: int, window: int) -> np.ndarray:
    """[windows, datasets]: the share of each dataset in every window of consecutive samples."""
    counts = np.zeros((len(dataset_index) + 1, num_datasets))
    counts[1:] = np.cumsum(np.eye(num_datasets)[dataset_index], axis=0)
    return (counts[window:] - counts[:-window]) / window


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.6, 0.3, 0.1], [0.013, 0.2, 0.387, 0.15, 0.25], [3, 1, 0, 1]])
def test_realised_proportions_stay_within_0_1_percent_over_every_10000_window(weights):
    indices = build_blend_indices(weights, 60_000)
    shares = window_proportions(indices["dataset_index"], len(weights), 10_000)
    assert np.abs(shares - normalized_weights(weights)).max() < 0.001
    assert np.all(shares[:, np.asarray(weights) == 0] == 0)


@pytest.mark.parametrize("weights", [[0.9, 0.1], [0.6, 0.3, 0.1], [0.05] * 20])
def test_every_prefix_is_within_the_documented_bound_of_its_target(weights):
    """Among the first n samples, dataset j has n * w_j give or take (m + 1) / 2 (blended.py)."""
    dataset_index = build_blend_indices(weights, 20_000)["dataset_index"]
    counts = np.cumsum(np.eye(len(weights))[dataset_index], axis=0)
    targets = np.arange(1, 20_001)[:, None] * normalized_weights(weights)
    assert np.abs(counts - targets).max() <= (len(weights) + 1) / 2


def test_each_dataset_is_read_in_order_from_its_sample_0():
    indices = build_blend_indices([0.2, 0.5, 0.3], 10_001)
    for j in range(3):
        numbers = indices["dataset_sample_index"][indices["dataset_index"] == j]
        np.testing.assert_array_equal(numbers, np.arange(len(numbers)))


def test_the_schedule_is_deterministic_and_a_longer_one_extends_a_shorter_one():
    short = build_blend_indices([0.7, 0.2, 0.1], 5_000)
    long = build_blend_indices([7, 2, 1], 50_000)  # the same weights, unnormalised
    for name in short:
        np.testing.assert_array_equal(short[name], long[name][:5_000])
        np.testing.assert_array_equal(short[name], build_blend_indices([0.7, 0.2, 0.1], 5_000)[name])


def test_millions_of_samples_take_seconds():
    start = time.perf_counter()
    indices = build_blend_indices([0.5, 0.3, 0.2], 3_000_000)
    assert time.perf_counter() - start < 10  # about 0.3 s on 2 CPU cores
    assert np.bincount(indices["dataset_index"]).tolist() == [1_500_000, 900_000, 600_000]


def test_blend_index_is_cached_and_reused(tmp_path):
    first, built = load_or_build_blend_indices([0.4, 0.6], 1000, tmp_path)
    assert built
    second, built = load_or_build_blend_indices([2, 3], 1000, tmp_path)
    assert not built and isinstance(second["dataset_index"], np.memmap)
    np.testing.assert_array_equal(first["dataset_index"], second["dataset_index"])
    assert load_or_build_blend_indices([0.5, 0.5], 1000, tmp_path)[1]
    assert load_or_build_blend_indices([0.4, 0.6], 999, tmp_path)[1]


def test_bad_weights_are_refused():
    for weights in ([], [0, 0], [1, -1], [1, float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            build_blend_indices(weights, 10)


def test_blended_samples_come_from_the_scheduled_dataset(tmp_path):
    datasets = []
    for j in range(2):
        write_random_dataset(tmp_path / f"d{j}", num_documents=20, min_length=1, seed=j)
        indexed = IndexedDataset(tmp_path / f"d{j}")
        datasets.append(GPTDataset(indexed, (0, 20), 60, 8, seed=1, cache_dir=tmp_path / "cache"))
    indices = build_blend_indices([0.25, 0.75], 80)
    blended = BlendedDataset(datasets, indices)
    assert len(blended) == 80
    for i in range(80):
        j, k = indices["dataset_index"][i], indices["dataset_sample_index"][i]
        np.testing.assert_array_equal(blended[i]["tokens"], datasets[j][k]["tokens"])
    copy = pickle.loads(pickle.dumps(blended))
    np.testing.assert_array_equal(copy[79]["tokens"], blended[79]["tokens"])
    with pytest.raises(ValueError, match="has 60 samples but the blend needs 75"):
        BlendedDataset(datasets, build_blend_indices([0.25, 0.75], 100))


def test_build_datasets_blends_by_weight_or_by_token_count(tmp_path):
    sizes = [40, 120]
    for j, size in enumerate(sizes):
        write_random_dataset(tmp_path / f"d{j}", num_documents=size, min_length=10, max_length=10, seed=j)
    prefixes = [str(tmp_path / f"d{j}") for j in range(2)]
    config = DataConfig(prefixes=prefixes, weights=[0.5, 0.5], split="1", seq_length=4, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_datasets(config, {"train": 1000})
    assert np.bincount(train.dataset_index).tolist() == [500, 500]
    # Each dataset is asked for exactly the samples the blend takes from it.
    assert [len(d) for d in train.datasets] == [500, 500]

    natural = DataConfig(prefixes=prefixes, split="1", seq_length=4, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_datasets(natural, {"train": 1000})
    assert np.bincount(train.dataset_index).tolist() == [250, 750]  # 400 : 1200 tokens

    unused = DataConfig(prefixes=prefixes, weights=[0, 1], split="1", seq_length=4, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_datasets(unused, {"train": 100})
    assert train.datasets[0] is None and train[99]["tokens"].shape == (5,)
