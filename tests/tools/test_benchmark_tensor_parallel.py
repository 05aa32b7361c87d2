import json
import subprocess
import sys


def test_counted_communication_is_the_analytic_figure_and_memory_halves(tmp_path):
    done = subprocess.run([sys.executable, "tools/benchmark_tensor_parallel.py", "--preset", "tiny",
                           "--model.num_hidden_layers", "1", "--model.total_ut_steps", "2", "--seq-len", "16",
                           "--batch-size", "2", "--warmup", "0", "--steps", "1", "--output", str(tmp_path / "tp.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tp2 / tp1: parameter memory per rank" in done.stdout
    by_layout = {r["layout"]: r for r in json.loads((tmp_path / "tp.json").read_text())}
    assert by_layout["tp1"]["comm_bytes_counted"] == 0
    for layout in ("tp2", "tp2_sp"):
        r = by_layout[layout]
        assert r["comm_bytes_counted"] == r["comm_bytes_analytic"]["total"] > 0, layout
        assert r["split_param_bytes_per_rank"] * 2 == by_layout["tp1"]["split_param_bytes_per_rank"]
    assert set(by_layout["tp2_sp"]["comm_by_collective"]) == {"all_reduce", "all_gather", "reduce_scatter"}
