import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/benchmark.py"), *args], capture_output=True, text=True, timeout=300)


def test_benchmark_measures_both_paths_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    done = _run("--preset", "tiny", "--model.vocab_size", "512", "--seq_len", "32", "--batch_size", "2",
                "--steps", "1", "--repeats", "1", "--dtypes", "[fp32]", "--output", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    paths = {r["path"] for r in summary["results"]}
    assert paths == {"fused", "naive"}
    for r in summary["results"]:
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_matmul_peak"] and r["peak_memory_bytes"] > 0
    ratio = summary["ratios"]["fp32"]
    assert ratio["tokens_per_s"] > 0 and ratio["peak_memory"] > 0
    assert "| fp32 | fused |" in done.stdout


def test_benchmark_config_errors_name_the_field():
    done = _run("--seq_len", "long")
    assert done.returncode != 0 and "seq_len: expected an integer" in done.stderr
    done = _run("--model.hidden_sise", "64")
    assert done.returncode != 0 and "hidden_sise: unknown field of LoopLMConfig" in done.stderr
    done = _run("--compile", "true", "--warmup", "0")
    assert done.returncode != 0 and "compile: needs warmup >= 1" in done.stderr
