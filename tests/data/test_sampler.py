import itertools

import pytest
import torch

from looplm_mega.data.builder import build_datasets
from looplm_mega.data.config import DataConfig
from looplm_mega.data.gpt_dataset import collate_batch
from looplm_mega.data.sampler import PretrainingSampler
from tests.data.synthetic_datasets import write_random_dataset


def global_batches(num_samples, global_batch_size, micro_batch_size, data_parallel_size, consumed_samples=0):
    """[global batch][rank] -> the samples that rank reads in that global batch, micro-batches
    concatenated in accumulation order."""
    samplers = [PretrainingSampler(num_samples, global_batch_size, micro_batch_size, rank, data_parallel_size,
                                   consumed_samples) for rank in range(data_parallel_size)]
    steps = samplers[0].gradient_accumulation_steps
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(per_rank[0]) for p in per_rank)  # every rank takes the same number of steps
    return [[sum(per_rank[r][b * steps : (b + 1) * steps], []) for r in range(data_parallel_size)]
            for b in range(len(per_rank[0]) // steps)]


@pytest.mark.parametrize("data_parallel_size,micro_batch_size", [(1, 4), (2, 2), (4, 1), (4, 3)])
def test_data_parallel_slices_cover_each_global_batch_exactly_once(data_parallel_size, micro_batch_size):
    global_batch_size = 12 if micro_batch_size != 3 else 24
    batches = global_batches(100, global_batch_size, micro_batch_size, data_parallel_size)
    assert len(batches) == 100 // global_batch_size  # the partial last global batch is dropped
    for b, ranks in enumerate(batches):
        everything = sorted(itertools.chain(*ranks))
        assert everything == list(range(b * global_batch_size, (b + 1) * global_batch_size))
        assert all(len(r) == global_batch_size // data_parallel_size for r in ranks)


def test_global_batches_do_not_depend_on_the_data_parallel_size():
    one = [sorted(sum(ranks, [])) for ranks in global_batches(96, 8, 2, 1)]
    four = [sorted(sum(ranks, [])) for ranks in global_batches(96, 8, 2, 4)]
    assert one == four


def test_micro_batches_follow_megatrons_layout():
    sampler = PretrainingSampler(16, global_batch_size=8, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    assert list(sampler) == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert len(sampler) == 4 and sampler.gradient_accumulation_steps == 2


@pytest.mark.parametrize("consumed_batches", [0, 1, 3, 7])
def test_resume_from_consumed_samples_gives_the_uninterrupted_batches(consumed_batches):
    uninterrupted = global_batches(130, 16, 2, 2)
    resumed = global_batches(130, 16, 2, 2, consumed_samples=consumed_batches * 16)
    assert resumed == uninterrupted[consumed_batches:]


def test_resume_through_a_data_loader_reads_the_same_tokens(tmp_path):
    write_random_dataset(tmp_path / "data", num_documents=60, seed=1)
    config = DataConfig(prefixes=[str(tmp_path / "data")], split="1", seq_length=8, cache_dir=str(tmp_path / "cache"))

    def batches(consumed_samples):
        train, _, _ = build_datasets(config, {"train": 64})
        sampler = PretrainingSampler(len(train), 8, 2, data_parallel_rank=1, data_parallel_size=2,
                                     consumed_samples=consumed_samples)
        loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate_batch)
        return [b["input_ids"] for b in loader]

    uninterrupted, resumed = batches(0), batches(5 * 8)
    assert len(resumed) == len(uninterrupted) - 5 * 2
    for a, b in zip(uninterrupted[5 * 2 :], resumed):
        assert torch.equal(a, b)


def test_bad_batch_settings_are_refused():
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple of "
                                         "micro_batch_size=2 x data_parallel_size=4"):
        PretrainingSampler(100, 10, 2, 0, 4)
    with pytest.raises(ValueError, match=r"data_parallel_rank=2 outside \[0, 2\)"):
        PretrainingSampler(100, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples=101"):
        PretrainingSampler(100, 8, 2, 0, 2, consumed_samples=101)
