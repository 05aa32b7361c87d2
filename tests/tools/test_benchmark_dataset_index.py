import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from looplm_mega.data.indexed import IndexedDataset

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/benchmark_dataset_index.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)


def test_tiny_benchmark_prints_the_table_and_writes_a_valid_sparse_dataset(tmp_path):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    done = _run("--num_tokens", "200000", "--seq_length", "128", "--mean_doc_tokens", "300",
                "--blend_samples", "50000", "--reads", "50", "--workdir", str(work), "--output", str(out), "--dense_bin")
    assert done.returncode == 0, done.stderr
    assert "| step | time (s) | CPU time (s) | peak memory (MiB) | note |" in done.stdout
    assert "| build indices (cold" in done.stdout and "| load cached indices" in done.stdout
    assert "| open the dataset: validate every index entry" in done.stdout and "| token-id range: cached" in done.stdout
    result = json.loads(out.read_text())
    assert [r["seconds"] > 0 for r in result["rows"]] == [True] * 7
    low, high = result["token_id_range"]
    assert 0 <= low < 100 and 49_900 < high < 50_000  # 200,000 random tokens below 50,000
    # The synthetic pair passes the reader's checks and holds exactly the asked-for tokens.
    dataset = IndexedDataset(work / "synthetic_text_document")
    assert dataset.num_tokens == 200_000 == result["num_tokens"]
    assert np.all(np.asarray(dataset.sequence_lengths) > 0)
    train_tokens = int(np.asarray(dataset.sequence_lengths[: round(0.969 * len(dataset))]).sum())
    assert result["num_samples"]["train"] == (train_tokens - 1) // 128


def test_bad_sizes_are_refused(tmp_path):
    done = _run("--seq_length", "0")
    assert done.returncode != 0 and "--seq_length must be positive" in done.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    done = _run("--workdir", str(tmp_path / "busy"))
    assert done.returncode != 0 and "is not empty" in done.stderr
