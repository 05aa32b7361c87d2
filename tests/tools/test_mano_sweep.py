"""tools/mano_sweep.py and tools/mano_collect.py. One end-to-end subprocess run; the rest calls
main() in this process, which spares a torch start-up per test."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "tools/mano_sweep.py"
COLLECT = ROOT / "tools/mano_collect.py"
TINY = ["--configs", "1x1,1x2", "--L", "2", "--objectives", "last", "--lrs", "5e-3", "--steps", "2", "--seeds", "0,1",
        "--batch-size", "4", "--hidden-size", "16", "--num-heads", "2", "--test-size", "10", "--threads", "1"]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_id_runs_one_grid_entry_and_the_collector_summarises(tmp_path):
    out = tmp_path / "results.csv"
    done = subprocess.run([sys.executable, str(SWEEP), *TINY, "--task-id", "3", "--out", str(out), "--log-every", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "step 2/2" in done.stdout and "ETA" in done.stdout and "1 runs in" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(r["config"], r["seed"], r["steps"]) for r in rows] == [("1x2", "1", "2")]  # entry 3: 1x2, seed 1
    assert 0 <= float(rows[0]["accuracy"]) <= 1 and int(rows[0]["params"]) > 0

    # A second seed of the same setting (written by hand), then the collector.
    with out.open("a") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[0], "seed": "0", "accuracy": "0.5"})
    accuracy = float(rows[0]["accuracy"])
    mean, std = (accuracy + 0.5) / 2, abs(accuracy - 0.5) / 2 ** 0.5
    collected = subprocess.run([sys.executable, str(COLLECT), str(out)], capture_output=True, text=True, timeout=60)
    assert collected.returncode == 0, collected.stderr
    best, every = [line for line in collected.stdout.splitlines() if line.startswith("| 1x2")]
    assert f"| 0.005 | {100 * mean:.1f} ± {100 * std:.1f} | 50.0 / {100 * accuracy:.1f} |" in best  # seeds 0, 1
    assert f"| 2 | {100 * mean:.1f} ± {100 * std:.1f} |" in every  # two seeds


def test_list_prints_the_grid_in_its_documented_order(capsys):
    _load(SWEEP).main([*TINY, "--lrs", "1e-3,2e-3", "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["0", "1x1", "L=2", "last", "lr=0.001", "steps=2", "seed=0"]
    assert lines[1].split("\t")[-1] == "seed=1" and lines[2].split("\t")[4] == "lr=0.002"
    assert lines[4].split("\t")[1] == "1x2"
    assert lines[-1] == "8 runs (SLURM: --array=0-7)"


def test_the_default_grid_is_the_readmes_study(capsys):
    _load(SWEEP).main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "72 runs (SLURM: --array=0-71)"
    grid = [line.split("\t")[1:] for line in lines[:-1]]
    assert grid[0] == ["2x1", "L=5", "last", "lr=0.001", "steps=1500", "seed=0"]
    assert {tuple(g[:3]) for g in grid} == {(shape, f"L={L}", objective) for shape in ("2x1", "2x3", "6x1")
                                          for L in (5, 6) for objective in ("last", "stage1")
                                          if shape == "2x3" or objective == "last"}
    assert {g[3] for g in grid} == {"lr=0.001", "lr=0.003", "lr=0.01"} and {g[5] for g in grid} == {"seed=0", "seed=1", "seed=2"}
    # A plain `sbatch examples/slurm/mano_array.sbatch` runs the same grid.
    assert "#SBATCH --array=0-71\n" in (ROOT / "examples/slurm/mano_array.sbatch").read_text()


@pytest.mark.parametrize("args,message", [
    (["--configs", "2x1,2y4"], "'2y4' is not LAYERSxLOOPS"),
    (["--seeds", "0,one"], "'one' in '0,one' is not an integer"),
    (["--task-id", "8"], "--task-id 8 is outside the grid's 0..7"),
    (["--modulus", "29"], "modulus=29 must be an integer in 2..23"),
    (["--objectives", "last,final"], "'final' in 'last,final' is not one of last, stage1"),
])
def test_bad_arguments_are_named(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _load(SWEEP).main([*TINY, "--lrs", "1e-3,2e-3", *args, "--list"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _row(config, lr, seed, accuracy, loop_accuracy, **fields):
    from looplm_mega.tasks.mano_train import CSV_FIELDS

    layers, loops = map(int, config.split("x"))
    return dict.fromkeys(CSV_FIELDS, 1) | {
        "config": config, "layers": layers, "loops": loops, "depth": layers * loops, "max_ops": 3, "modulus": 7,
        "objective": "last", "lr": lr, "steps": 10, "seed": seed, "accuracy": accuracy,
        "loop_accuracy": loop_accuracy, "baseline": 0.25, "excluded": 3, "cpu_seconds": 1800} | fields


def test_collector_picks_the_best_learning_rate_per_arm_and_plots(tmp_path, capsys):
    from looplm_mega.tasks.mano_train import CSV_FIELDS, append_row

    good = tmp_path / "good.csv"
    for row in [_row("2x1", 0.001, 0, 0.2, "0.2"), _row("2x1", 0.001, 1, 0.4, "0.4"),
                _row("2x1", 0.002, 1, 0.7, "0.7"), _row("2x1", 0.002, 0, 0.5, "0.5"),
                _row("2x3", 0.001, 0, 0.9, "0.3/0.6/0.9"), _row("2x3", 0.001, 0, 0.6, "0.3/0.5/0.6", objective="stage1")]:
        append_row(good, row)
    with good.open("a") as f:
        f.write(",".join(CSV_FIELDS) + "\n")  # a raced second header is skipped
    plot = tmp_path / "plots" / "accuracy.png"
    pytest.importorskip("matplotlib")
    _load(COLLECT).main([str(good), "--plot", str(plot)])
    out = capsys.readouterr().out
    best = out[:out.index("Every setting")]
    assert "| 2x1 | 3 | 7 | 1 | last | 10 | 0.002 | 60.0 ± 14.1 | 50.0 / 70.0 | 60.0 | 25.0 | 1 |" in best
    assert "0.001" not in best.split("| 2x1")[1].split("\n")[0]
    assert "| 2x3 | 3 | 7 | 1 | last | 10 | 0.001 | 90.0 ± 0.0 | 90.0 | 30.0 / 60.0 / 90.0 | 25.0 | 1 |" in best
    assert "| 2x3 | 3 | 7 | 1 | stage1 | 10 | 0.001 | 60.0 ± 0.0 | 60.0 | 30.0 / 50.0 / 60.0 | 25.0 | 1 |" in best
    every = out[out.index("Every setting"):]
    assert "| 2x1 | 3 | 7 | 1 | last | 0.001 | 10 | 2 | 30.0 ± 14.1 | 20.0 / 40.0 | 30.0 | 6 | 1800 |" in every
    assert "6 runs, 3.00 h of CPU time in all (1.50 h on 2 cores)" in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_collector_errors_name_the_file_and_line(tmp_path):
    from looplm_mega.tasks.mano_train import append_row

    collect = _load(COLLECT)
    with pytest.raises(SystemExit, match="no such result file"):
        collect.main([str(tmp_path / "missing.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("config,accuracy\n2x4,0.5\n")
    with pytest.raises(SystemExit, match=r"bad.csv, line 2: no value for .*baseline"):
        collect.main([str(bad)])
    bad = tmp_path / "loops.csv"
    append_row(bad, _row("2x3", 0.001, 0, 0.9, "0.3/0.6/0.9"))
    append_row(bad, _row("2x3", 0.001, 1, 0.9, "0.3/0.9"))
    with pytest.raises(SystemExit, match="loops.csv, line 3: loop_accuracy has 2 values for 3 loops"):
        collect.main([str(bad)])
