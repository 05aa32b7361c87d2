#!/usr/bin/env python
"""Summarise the rows of tools/mano_sweep.py: accuracy per arm at its best learning rate, every
setting, and a plot of accuracy against depth.

    python tools/mano_collect.py runs/mano/results.csv [more.csv ...] [--plot runs/mano/accuracy.png]

A setting is everything but the seed; an arm is a setting without its learning rate (a model
shape, L, objective, width and length of training). For each arm the table "best learning rate"
takes the learning rate with the best mean accuracy over seeds and gives mean ± std (sample std,
0 for one seed), the accuracy of each seed and the mean accuracy read out after each loop; the
table "every setting" lists each learning rate. The plot (matplotlib, an optional dependency) has
one panel per L: each arm at its best learning rate, accuracy against the layers applied so far
(layers x loops run), so a looped arm is a line through its loops and an unlooped arm one point;
the dashed line is the share of the most common answer in the test set.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# What defines an arm, and a setting (an arm at one learning rate).
ARM_KEYS = ("config", "max_ops", "modulus", "hidden_size", "objective", "steps", "batch_size")
SETTING_KEYS = (*ARM_KEYS, "lr")
NEEDED = {"layers", "loops", "depth", "seed", "accuracy", "loop_accuracy", "baseline", "excluded", "params",
          "cpu_seconds", *SETTING_KEYS}


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), 2):
                if row.get("config") == "config":
                    continue  # a repeated header: two first rows raced on a lock-less filesystem
                row["where"] = f"{path}, line {line}"
                rows.append(row)
    return rows


def check_rows(rows: list[dict]) -> None:
    """One error naming the file and line of the first bad row."""
    for row in rows:
        missing = sorted(k for k in NEEDED if row.get(k) in ("", None))
        if missing:
            raise ValueError(f"{row['where']}: no value for {', '.join(missing)}")
        try:
            accuracies = [float(a) for a in row["loop_accuracy"].split("/")]
            float(row["accuracy"]), float(row["lr"]), float(row["cpu_seconds"]), float(row["baseline"])
            int(row["layers"]), int(row["loops"]), int(row["max_ops"]), int(row["params"]), int(row["excluded"])
        except ValueError as e:
            raise ValueError(f"{row['where']}: {e}") from None
        if len(accuracies) != int(row["loops"]):
            raise ValueError(f"{row['where']}: loop_accuracy has {len(accuracies)} values for {row['loops']} loops")


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per setting, sorted by L, depth, layers, objective, lr."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in SETTING_KEYS)].append(row)
    summary = []
    for key, members in groups.items():
        members.sort(key=lambda m: int(m["seed"]))
        accuracies = [float(m["accuracy"]) for m in members]
        per_loop = [[float(a) for a in m["loop_accuracy"].split("/")] for m in members]
        entry = dict(zip(SETTING_KEYS, key))
        entry.update(
            layers=int(members[0]["layers"]), loops=int(members[0]["loops"]), depth=int(members[0]["depth"]),
            seeds=[int(m["seed"]) for m in members], accuracies=accuracies, mean=statistics.fmean(accuracies),
            std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            loop_mean=[statistics.fmean(loop) for loop in zip(*per_loop)],
            loop_std=[statistics.stdev(loop) if len(loop) > 1 else 0.0 for loop in zip(*per_loop)],
            baseline=float(members[0]["baseline"]), excluded=sum(int(m["excluded"]) for m in members),
            params=int(members[0]["params"]), cpu_seconds=sum(float(m["cpu_seconds"]) for m in members),
        )
        summary.append(entry)
    summary.sort(key=lambda e: (int(e["max_ops"]), e["depth"], e["layers"], e["objective"], float(e["lr"])))
    return summary


def best_per_arm(summary: list[dict]) -> list[dict]:
    """The setting with the best mean accuracy of each arm, in the summary's order."""
    best: dict[tuple, dict] = {}
    for e in summary:
        arm = tuple(e[k] for k in ARM_KEYS)
        if arm not in best or e["mean"] > best[arm]["mean"]:
            best[arm] = e
    return [e for e in summary if best[tuple(e[k] for k in ARM_KEYS)] is e]


def _percent(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def print_tables(summary: list[dict]) -> None:
    print("Best learning rate per arm (accuracy at the last loop; per loop: the mean read-out after loop 1..T)\n")
    print("| config | L | p | hidden | objective | steps | best lr | accuracy % (mean ± std) | per seed | "
          "per loop (mean) | most common answer | params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in best_per_arm(summary):
        print(f"| {e['config']} | {e['max_ops']} | {e['modulus']} | {e['hidden_size']} | {e['objective']} | {e['steps']} | "
              f"{float(e['lr']):g} | {100 * e['mean']:.1f} ± {100 * e['std']:.1f} | {_percent(e['accuracies'])} | "
              f"{_percent(e['loop_mean'])} | {100 * e['baseline']:.1f} | {e['params']:,} |")
    print("\nEvery setting\n")
    print("| config | L | p | hidden | objective | lr | steps | seeds | accuracy % (mean ± std) | per seed | "
          "per loop (mean) | excluded draws | CPU s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in summary:
        print(f"| {e['config']} | {e['max_ops']} | {e['modulus']} | {e['hidden_size']} | {e['objective']} | "
              f"{float(e['lr']):g} | {e['steps']} | {len(e['seeds'])} | {100 * e['mean']:.1f} ± {100 * e['std']:.1f} | "
              f"{_percent(e['accuracies'])} | {_percent(e['loop_mean'])} | {e['excluded']:,} | "
              f"{e['cpu_seconds'] / len(e['seeds']):.0f} |")
    runs = sum(len(e["seeds"]) for e in summary)
    seconds = sum(e["cpu_seconds"] for e in summary)
    print(f"\n{runs} runs, {seconds / 3600:.2f} h of CPU time in all ({seconds / 7200:.2f} h on 2 cores)")


def plot(summary: list[dict], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: the plot needs matplotlib (pip install matplotlib), or leave out --plot") from None
    panels: dict[tuple, list[dict]] = defaultdict(list)  # one per L, modulus, width, training length
    for e in best_per_arm(summary):
        panels[(int(e["max_ops"]), e["modulus"], e["hidden_size"], e["steps"])].append(e)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, ((max_ops, modulus, hidden, steps), entries) in zip(axes[0], sorted(panels.items())):
        for e in entries:
            depth = [e["layers"] * (t + 1) for t in range(e["loops"])]
            label = f"{e['config']}" + (f" {e['objective']}" if e["loops"] > 1 else "") + f", lr {float(e['lr']):g}"
            ax.errorbar(depth, [100 * a for a in e["loop_mean"]], yerr=[100 * s for s in e["loop_std"]],
                        marker="o", capsize=3, label=label)
        ax.axhline(100 * entries[0]["baseline"], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"L = {max_ops}, Z_{modulus}, hidden {hidden}, {steps} steps", fontsize=9)
        ax.set_xlabel("layers applied (layers x loops run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy, % (mean ± std over seeds)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="result files of tools/mano_sweep.py")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy against depth here")
    args = p.parse_args(argv)
    missing = [path for path in args.csv if not Path(path).is_file()]
    if missing:
        sys.exit(f"error: no such result file: {', '.join(missing)}")
    try:
        rows = read_rows(args.csv)
        check_rows(rows)
    except (csv.Error, UnicodeDecodeError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not rows:
        sys.exit(f"error: no result rows in {', '.join(args.csv)}")
    summary = summarise(rows)
    print_tables(summary)
    if args.plot:
        plot(summary, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
