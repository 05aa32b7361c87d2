import json
import logging
import os

import numpy as np
import pytest

from looplm_mega.config import ConfigError
from looplm_mega.data import token_ids
from looplm_mega.data.indexed import IndexedDatasetWriter
from looplm_mega.data.token_ids import cache_path, check_token_ids, token_id_range


def _write(prefix, tokens, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        writer.add_documents(np.asarray(tokens), [len(tokens)])
    return prefix


def test_the_range_is_scanned_in_chunks_once_then_read_from_the_cache(tmp_path, monkeypatch):
    tokens = np.random.default_rng(0).integers(5, 900, 10_000)
    tokens[7777] = 4095
    prefix = _write(tmp_path / "d", tokens)
    monkeypatch.setattr(token_ids, "_SCAN_BYTES", 1000)  # many chunks, the largest id in a middle one
    assert token_id_range(prefix) == (int(tokens.min()), 4095)
    cached = json.loads(cache_path(prefix).read_text())
    assert cached["range"] == [int(tokens.min()), 4095] and cache_path(prefix).parent == tmp_path / "index_cache"
    monkeypatch.setattr(token_ids, "scan_token_ids", lambda dataset: pytest.fail("scanned although cached"))
    assert token_id_range(prefix) == (int(tokens.min()), 4095)


def test_a_rewritten_dataset_or_a_damaged_cache_is_scanned_again(tmp_path, caplog):
    prefix = _write(tmp_path / "d", [1, 2, 3])
    assert token_id_range(prefix, tmp_path / "cache") == (1, 3)
    _write(prefix, [1, 2, 300])
    os.utime(f"{prefix}.bin", ns=(1, 1))  # even a rewrite within the same clock tick changes the mtime
    assert token_id_range(prefix, tmp_path / "cache") == (1, 300)
    cache_path(prefix, tmp_path / "cache").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert token_id_range(prefix, tmp_path / "cache") == (1, 300)
    assert "unreadable token-id cache" in caplog.text
    assert json.loads(cache_path(prefix, tmp_path / "cache").read_text())["range"] == [1, 300]


def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path, caplog):
    prefix = _write(tmp_path / "d", [1, 2, 3])
    (tmp_path / "cache").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        assert token_id_range(prefix, tmp_path / "cache") == (1, 3)
    assert "cannot cache the token-id range" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "d.bin", "d.idx"]


def test_ids_outside_the_vocabulary_name_the_file_and_both_numbers(tmp_path):
    ok, big = _write(tmp_path / "ok", [0, 511]), _write(tmp_path / "big", [3, 512, 7])
    check_token_ids([ok], vocab_size=512)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'big'}.bin: holds token id 512, but the model's vocab_size is 512"):
        check_token_ids([ok, big], vocab_size=512)
    negative = _write(tmp_path / "neg", [3, -1], dtype=np.int32)
    with pytest.raises(ConfigError, match=r"neg.bin: holds token id -1, but ids must lie in \[0, 512\)"):
        check_token_ids([negative], vocab_size=512)
    empty = tmp_path / "empty"
    with IndexedDatasetWriter(empty, np.uint16):
        pass
    check_token_ids([empty], vocab_size=1)
