#!/usr/bin/env python
"""Pictures of pretraining runs from their metrics.jsonl: several runs overlaid, against training
tokens. Writes into --output (default: RUN_DIR/plots for one run):

    loss.png            training loss, and validation CE of every loop
    exit.png            the exit distribution: mean exit loop, mean gate of every loop
    optimization.png    learning rate, gradient norm, throughput (tokens/s)

    python tools/plot_run.py runs/quickstart/run
    python tools/plot_run.py runs/a runs/b --labels "1 layer" "2 layers" --output runs/compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.eval.plots import require_matplotlib  # noqa: E402
from looplm_mega.outputs import OutputError, exit_with, staged_output_dir  # noqa: E402

KIND = "plot_run figures"  # the kind of output (looplm_mega/outputs.py)
STYLES = ["-", "--", ":", "-."]  # one line style per run; colours tell loops apart


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The train and valid records of a run; a line cut short by a kill is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    train = [r for r in records if r.get("split") == "train"]
    if not train:
        raise ValueError(f"{path}: no training records yet")
    return train, [r for r in records if r.get("split") == "valid"]


def _tokens(records: list[dict]) -> list[float]:
    """Training tokens of each record (the step where a run did not log them)."""
    return [r.get("consumed_tokens", r["step"]) for r in records]


def _axes(figure, rows: int, xlabel: str):
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    axes[-1].set_xlabel(xlabel)
    return axes


def plot_runs(runs: dict[str, tuple[list[dict], list[dict]]], output: Path) -> list[Path]:
    """Draw the figures of `runs` ({label: (train, valid)}) into `output`; their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_tokens = all("consumed_tokens" in train[-1] for train, _ in runs.values())
    xlabel = "training tokens" if has_tokens else "step"
    paths = []

    def save(figure, name):
        figure.savefig(output / name, format="png", dpi=110)
        paths.append(output / name)

    def figure(rows):
        fig = Figure(figsize=(7.0, 2.6 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        return fig, _axes(fig, rows, xlabel)

    fig, (loss, valid) = figure(2)
    for style, (label, (train, validation)) in zip(_cycle(STYLES), runs.items()):
        loss.plot(_tokens(train), [r["loss"] for r in train], style, label=label)
        _per_loop(valid, validation, "ce_per_loop", style, label, marker="o", markersize=3)
    loss.set_ylabel("training loss")
    valid.set_ylabel("validation CE")
    for ax in (loss, valid):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, "loss.png")

    fig, (exit_loop, gates) = figure(2)
    for style, (label, (train, _)) in zip(_cycle(STYLES), runs.items()):
        exit_loop.plot(_tokens(train), [r["mean_exit_loop"] for r in train], style, label=label)
        _per_loop(gates, train, "gate_mean_per_loop", style, label)
    exit_loop.set_ylabel("mean exit loop E[t]")
    gates.set_ylabel("mean gate lambda_t")
    for ax in (exit_loop, gates):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, "exit.png")

    fig, axes = figure(3)
    for style, (label, (train, _)) in zip(_cycle(STYLES), runs.items()):
        for ax, key in zip(axes, ("lr", "grad_norm", "tokens_per_s")):
            ax.plot(_tokens(train), [r.get(key, float("nan")) for r in train], style, label=label)
    for ax, name in zip(axes, ("learning rate", "gradient norm", "tokens/s")):
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, "optimization.png")
    return paths


def _per_loop(ax, records: list[dict], key: str, style: str, label: str, **line) -> None:
    """A line of each loop's value (a colour per loop); a curriculum may change the number of loops."""
    for loop in range(max((len(r[key]) for r in records), default=0)):
        points = [(x, r[key][loop]) for x, r in zip(_tokens(records), records) if loop < len(r[key])]
        ax.plot(*zip(*points), style, color=f"C{loop}", label=f"{label}, loop {loop + 1}", **line)


def _cycle(items):
    while True:
        yield from items


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="a legend label per run (default: the directories' names)")
    parser.add_argument("--output", help="folder for the PNG files (default: RUN_DIR/plots with one run)")
    parser.add_argument("--overwrite", action="store_true", help="replace figures this tool wrote there before")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    if args.output is None and len(args.runs) > 1:
        parser.error("--output: name a folder for the figures of several runs")
    output = Path(args.output or Path(args.runs[0]) / "plots")
    labels = args.labels or [Path(run).resolve().name for run in args.runs]
    try:
        require_matplotlib()
        runs = {label: read_records(Path(run)) for label, run in zip(labels, args.runs)}
        with staged_output_dir(output, KIND, overwrite=args.overwrite) as staging:
            names = [p.name for p in plot_runs(runs, staging)]
    except OutputError as e:
        exit_with(parser.prog, e)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    for name in names:
        print(output / name)


if __name__ == "__main__":
    main()
