import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools/plot_run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(path: Path, loops: int, scale: float) -> Path:
    path.mkdir()
    records = []
    for step in range(1, 6):
        records.append({"step": step, "split": "train", "loss": scale / step, "ce_per_loop": [scale / step] * loops,
                        "mean_exit_loop": 1.5, "gate_mean_per_loop": [0.3] * loops, "lr": 1e-3, "grad_norm": 1.0,
                        "tokens_per_s": 100.0, "consumed_tokens": 256 * step})
    records.append({"step": 5, "split": "valid", "loss": 2.0, "ce_per_loop": [2.1] * loops, "consumed_tokens": 1280})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "spl')  # cut by a kill
    return path


def _plot(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_one_run_gets_its_figures_and_several_runs_overlay(tmp_path):
    a, b = _run_dir(tmp_path / "a", 4, 5.0), _run_dir(tmp_path / "b", 2, 4.0)
    done = _plot(a)
    assert done.returncode == 0, done.stderr
    names = ["exit.png", "loss.png", "optimization.png"]
    assert sorted(Path(line).name for line in done.stdout.splitlines()) == names
    assert all((a / "plots" / name).read_bytes()[:8] == PNG_MAGIC for name in names)
    done = _plot(a, b, "--labels", "four loops", "two loops", "--output", tmp_path / "compare")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "compare").iterdir() if not p.name.startswith(".")) == names


def test_refusals_are_one_line(tmp_path):
    a = _run_dir(tmp_path / "a", 2, 3.0)
    assert _plot(a).returncode == 0
    again = _plot(a)  # its own earlier figures: only with --overwrite
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _plot(a, "--overwrite").returncode == 0
    several = _plot(a, a)
    assert several.returncode == 2 and "--output" in several.stderr
    missing = _plot(tmp_path / "nothing", "--output", tmp_path / "out")
    assert missing.returncode == 1 and "metrics.jsonl: missing" in missing.stderr
