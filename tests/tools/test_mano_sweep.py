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
TINY = ["--configs", "1x1,1x2", "--L", "2", "--steps", "2", "--seeds", "0,1", "--batch-size", "4",
        "--hidden-size", "16", "--num-heads", "2", "--test-size", "10", "--threads", "1"]


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

    # A second seed of the same configuration (written by hand), then the collector.
    with out.open("a") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[0], "seed": "0", "accuracy": "0.5"})
    accuracy = float(rows[0]["accuracy"])
    mean, std = (accuracy + 0.5) / 2, abs(accuracy - 0.5) / 2 ** 0.5
    collected = subprocess.run([sys.executable, str(COLLECT), str(out)], capture_output=True, text=True, timeout=60)
    assert collected.returncode == 0, collected.stderr
    line = next(line for line in collected.stdout.splitlines() if line.startswith("| 1x2"))
    assert f"{100 * mean:.1f} ± {100 * std:.1f}" in line and f"| {100 * max(accuracy, 0.5):.1f} |" in line
    assert "| 2 |" in line  # two seeds


def test_list_prints_the_grid_in_its_documented_order(capsys):
    _load(SWEEP).main([*TINY, "--lrs", "1e-3,2e-3", "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["0", "1x1", "L=2", "lr=0.001", "steps=2", "seed=0"]
    assert lines[1].split("\t")[-1] == "seed=1" and lines[2].split("\t")[3] == "lr=0.002"
    assert lines[4].split("\t")[1] == "1x2"
    assert lines[-1] == "8 runs (SLURM: --array=0-7)"


def test_the_default_grid_is_the_readmes_cpu_comparison(capsys):
    _load(SWEEP).main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:] for line in lines[:-1:3]] == [
        ["1x1", "L=3", "lr=0.005", "steps=4000", "seed=0"], ["1x3", "L=3", "lr=0.005", "steps=4000", "seed=0"]]
    assert lines[-1] == "6 runs (SLURM: --array=0-5)"


@pytest.mark.parametrize("args,message", [
    (["--configs", "2x1,2y4"], "'2y4' is not LAYERSxLOOPS"),
    (["--seeds", "0,one"], "'one' in '0,one' is not an integer"),
    (["--task-id", "8"], "--task-id 8 is outside the grid's 0..7"),
    (["--modulus", "29"], "modulus=29 must be an integer in 2..23"),
])
def test_bad_arguments_are_named(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _load(SWEEP).main([*TINY, "--lrs", "1e-3,2e-3", *args, "--list"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_collector_errors_and_plot(tmp_path, capsys):
    collect = _load(COLLECT)
    with pytest.raises(SystemExit, match="no such result file"):
        collect.main([str(tmp_path / "missing.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("config,accuracy\n2x4,0.5\n")
    with pytest.raises(SystemExit, match="rows lack columns"):
        collect.main([str(bad)])

    from looplm_mega.tasks.mano_train import CSV_FIELDS, append_row

    base = dict.fromkeys(CSV_FIELDS, 1) | {"max_ops": 3, "modulus": 7, "objective": "last", "lr": 0.001, "steps": 10, "loop_accuracy": ""}
    good = tmp_path / "good.csv"
    for config, layers, loops, seed, accuracy in [("2x1", 2, 1, 0, 0.2), ("2x1", 2, 1, 1, 0.4), ("2x4", 2, 4, 0, 0.9)]:
        append_row(good, {**base, "config": config, "layers": layers, "loops": loops, "depth": layers * loops,
                          "seed": seed, "accuracy": accuracy})
    with good.open("a") as f:
        f.write(",".join(CSV_FIELDS) + "\n")  # a raced second header is skipped
    capsys.readouterr()
    plot = tmp_path / "plots" / "accuracy.png"
    pytest.importorskip("matplotlib")
    collect.main([str(good), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "| 2x1 | 3 | 7 | 1 | last | 0.001 | 10 | 2 | 30.0 ± 14.1 | 40.0 |" in out
    assert "| 2x4 | 3 | 7 | 1 | last | 0.001 | 10 | 1 | 90.0 ± 0.0 | 90.0 |" in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
