import subprocess
import sys
from pathlib import Path

import numpy as np

from looplm_mega.data.indexed import IndexedDataset, IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/merge_datasets.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def _write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for tokens in documents:
            writer.add_document(tokens)


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_merge_concatenates_in_order(tmp_path):
    _write(tmp_path / "a", [[1, 2], [3]])
    _write(tmp_path / "b", [[4, 5, 6]])
    _write(tmp_path / "c", [[7], [8], [9]])
    done = _run("--inputs", tmp_path / "a", tmp_path / "b.bin", tmp_path / "c.idx", "--output-prefix", tmp_path / "out/abc")
    assert done.returncode == 0, done.stderr
    assert _documents(tmp_path / "out/abc") == [[1, 2], [3], [4, 5, 6], [7], [8], [9]]
    assert IndexedDataset(tmp_path / "out/abc").document_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert "merged 3 datasets" in done.stdout and "6 documents, 9 tokens" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["abc.bin", "abc.idx"]


def test_dtype_mismatch_is_a_clear_error_and_writes_nothing(tmp_path):
    _write(tmp_path / "small", [[1, 2]], np.uint16)
    _write(tmp_path / "large", [[70_000]], np.int32)
    done = _run("--inputs", tmp_path / "small", tmp_path / "large", "--output-prefix", tmp_path / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {tmp_path / 'large'}.idx: tokens of dtype int32, but {tmp_path / 'small'}.idx holds uint16" in done.stderr
    assert not list(tmp_path.glob("out*"))


def test_missing_or_damaged_input_names_the_file(tmp_path):
    _write(tmp_path / "a", [[1, 2]])
    done = _run("--inputs", tmp_path / "a", tmp_path / "nope", "--output-prefix", tmp_path / "out")
    assert done.returncode == 1 and f"error: {tmp_path / 'nope'}.idx: file does not exist" in done.stderr
    (tmp_path / "a.bin").write_bytes(b"\x00")
    done = _run("--inputs", tmp_path / "a", "--output-prefix", tmp_path / "out")
    assert done.returncode == 1 and f"{tmp_path / 'a'}.bin: 1 bytes" in done.stderr
    assert not list(tmp_path.glob("out*"))


def test_megatron_input_directory_merges_every_pair_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    _write(shards / "b", [[4, 5]])
    _write(shards / "a", [[1], [2, 3]])
    (shards / "notes.txt").write_text("not a dataset")
    done = _run("--input", shards, "--output-prefix", tmp_path / "merged")  # Megatron-LM's command line
    assert done.returncode == 0, done.stderr
    assert _documents(tmp_path / "merged") == [[1], [2, 3], [4, 5]]
    (shards / "c.bin").write_bytes(b"")
    done = _run("--input", shards, "--output-prefix", tmp_path / "again")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {shards / 'c.idx'}: missing, but {shards} holds the other half of its pair" in done.stderr
