"""Every kind of dataset file a run reads (.bin, .idx, the cached sample and blend indices, the
token-id cache) corrupted, truncated or missing: a clear error naming the file before any engine
exists, or, for the caches, a rebuild that gives the same samples as a fresh one."""

import logging
import struct

import numpy as np
import pytest
import yaml

from looplm_mega import pretrain
from looplm_mega.config import ConfigError, from_dict
from looplm_mega.data.builder import build_datasets
from looplm_mega.data.config import DataConfig
from looplm_mega.data.indexed import IndexedDatasetError
from looplm_mega.data.token_ids import cache_path
from looplm_mega.training import stop_signals
from looplm_mega.training.config import RunConfig

from tests.data.synthetic_datasets import write_random_dataset

VOCAB = 512


@pytest.fixture
def data(tmp_path):
    prefixes = [tmp_path / "a", tmp_path / "b"]
    for seed, prefix in enumerate(prefixes):
        write_random_dataset(prefix, num_documents=80, seed=seed, min_length=1, max_length=40, vocab_size=VOCAB)
    return prefixes


def run_config(prefixes, **data) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"preset": "tiny", "vocab_size": VOCAB},
        "data": {"prefixes": [str(p) for p in prefixes], "seq_length": 16, "split": "90,10", **data},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_steps": 4}})


def _patch(path, offset, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


DAMAGE = {
    ".bin truncated": (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]),
                       ".bin", "truncated or mismatched pair"),
    ".bin grown": (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes() + b"\0\0"),
                   ".bin", "truncated or mismatched pair"),
    ".bin missing": (lambda p: p.with_suffix(".bin").unlink(), ".bin", "file does not exist"),
    ".idx truncated": (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-8]),
                       ".idx", "truncated or corrupt"),
    ".idx missing": (lambda p: p.with_suffix(".idx").unlink(), ".idx", "file does not exist"),
    ".idx length in the middle": (lambda p: _patch(p.with_suffix(".idx"), 34 + 4 * 40, struct.pack("<i", -3)),
                                  ".idx", "sequence 40 has length -3"),
    ".idx pointer in the middle": (lambda p: _patch(p.with_suffix(".idx"), 34 + 4 * 80 + 8 * 40, struct.pack("<q", 1)),
                                   ".idx", "sequence 40 starts at byte 1 of the .bin"),
    ".idx document index in the middle": (
        lambda p: _patch(p.with_suffix(".idx"), 34 + 12 * 80 + 8 * 40, struct.pack("<q", 0)),
        ".idx", "entry 40 \\(0\\) is below entry 39"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_dataset_is_named_before_any_engine_exists(data, damage):
    config = run_config(data)
    config.check_data()
    harm, suffix, message = DAMAGE[damage]
    harm(data[1])
    with pytest.raises(IndexedDatasetError, match=message) as error:
        config.check_data()
    assert str(error.value).startswith(f"{data[1]}{suffix}: ")


def test_token_ids_outside_the_vocabulary_in_any_stage_are_named_with_both_numbers(data, tmp_path):
    write_random_dataset(tmp_path / "wide", num_documents=20, vocab_size=VOCAB + 100, seed=3)
    config = from_dict(RunConfig, {
        "model": {"preset": "tiny", "vocab_size": VOCAB},
        "data": {"prefixes": [str(data[0])], "seq_length": 16},
        "training": {"micro_batch_size": 2, "global_batch_size": 4},
        "curriculum": [{"name": "first", "train_steps": 2},
                       {"name": "wider", "train_steps": 2, "data": {"prefixes": [str(tmp_path / "wide")]}}]})
    with pytest.raises(ConfigError, match=f"{tmp_path / 'wide'}.bin: holds token id 6[0-9][0-9], but the model's "
                                          f"vocab_size is {VOCAB}"):
        config.check_data()


def test_a_stale_token_id_cache_is_not_trusted(data):
    config = run_config(data)
    config.check_data()
    write_random_dataset(data[0], num_documents=90, vocab_size=VOCAB + 1, seed=7)  # rewritten: new size, mtime
    with pytest.raises(ConfigError, match=f"holds token id {VOCAB}"):
        config.check_data()
    cache_path(data[0]).write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=f"holds token id {VOCAB}"):
        config.check_data()


def test_the_run_entry_point_stops_with_one_line_before_deepspeed(data, tmp_path, capsys):
    DAMAGE[".idx pointer in the middle"][0](data[0])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "vocab_size": VOCAB}, "data": {"prefixes": [str(data[0])], "seq_length": 16},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_steps": 4}}))
    try:
        with pytest.raises(SystemExit, match=f"data error: {data[0]}.idx: sequence 40 starts at byte 1"):
            pretrain.main(["--config", str(path)])
    finally:
        stop_signals.uninstall()


def _samples(dataset) -> np.ndarray:
    return np.stack([dataset[i]["tokens"] for i in range(len(dataset))])


@pytest.mark.parametrize("damage", ["missing", "truncated", "not an array", "numbers out of range"])
def test_a_damaged_index_cache_is_rebuilt_with_the_same_samples(data, tmp_path, damage, caplog):
    config = DataConfig(prefixes=[str(p) for p in data], seq_length=16, split="90,10", cache_dir=str(tmp_path / "cache"))
    expected = _samples(build_datasets(config, {"train": 40})[0])
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 8  # document, sample, shuffle index of each dataset; the blend's two arrays
    for path in files:
        if damage == "missing":
            path.unlink()
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:-8])
        elif damage == "not an array":
            path.write_bytes(b"\x00" * 200)
        else:
            array = np.load(path)
            np.save(path, array + 1000 if array.ndim == 1 else array * 0 - 1)
    with caplog.at_level(logging.WARNING):
        train = build_datasets(config, {"train": 40})[0]
    assert np.array_equal(_samples(train), expected)
    if damage != "missing":
        assert "building it again" in caplog.text
