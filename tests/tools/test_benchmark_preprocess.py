import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_measures_each_tool_and_worker_count(tmp_path):
    out = tmp_path / "bench.json"
    args = [sys.executable, str(ROOT / "tools/benchmark_preprocess.py"), "--cache-dir", str(tmp_path / "cache"),
            "--corpus-mb", "0.4", "--vocab-size", "300", "--tokenizer-sample-mb", "0.1", "--batch-documents", "16",
            "--workers", "1", "--repeats", "2", "--verify-chars", "100000", "--output", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert 400_000 <= summary["corpus_bytes"] < 500_000 and summary["identical_outputs"]
    assert [(r["workers"], r["variant"], r["encoder"]) for r in summary["results"]] == [
        (1, "tokenizers", "tokenizers"), (1, "tiktoken", "tiktoken")]
    # Alternated (tokenizers, tiktoken, tokenizers, tiktoken); listed by tool.
    assert [r["variant"] for r in summary["runs"]] == ["tokenizers", "tokenizers", "tiktoken", "tiktoken"]
    for r in summary["results"]:
        assert r["tokens_per_s"] > 0 and r["mb_per_s"] > 0 and r["peak_rss_bytes"] > 10 * 2**20 and r["cpu_seconds"] > 0
        assert r["input_bytes"] == summary["corpus_bytes"] and r["documents"] > 50 and len(r["seconds_all"]) == 2
    assert summary["results"][0]["speedup_vs_tokenizers"] == 1.0
    assert "| workers | tool | encoder | seconds | CPU seconds | tokens/s | MB/s | peak RSS" in done.stdout
    assert "\n| 1 | ours | tiktoken | " in done.stdout
    # The corpus and tokenizer (and the tokenizer directory for the Megatron-style command line) are
    # cached; the measured runs' outputs are removed.
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "cache").iterdir()) == ["corpus", "tokenizer", "tokenizer"]
