#!/usr/bin/env python
"""Summarise the rows of tools/mano_sweep.py: accuracy per configuration over seeds, and a plot.

    python tools/mano_collect.py runs/mano/results.csv [more.csv ...] [--plot runs/mano/accuracy.png]

Runs that differ only in the seed form one group; for each it prints mean ± std (sample std,
0 for one seed) and the best seed's accuracy (the paper reports the best of 3 seeds). The plot
(matplotlib, an optional dependency) shows accuracy against total depth, layers x loops, one line
per layer count, L, modulus and width; where a configuration was run at several learning rates or
step counts, the plot uses the setting with the best mean.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# Settings that define a group: everything but the seed and the measurements.
GROUP_KEYS = ("config", "max_ops", "modulus", "hidden_size", "objective", "lr", "steps", "batch_size")


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if row.get("config") == "config":
                    continue  # a repeated header: two first rows raced on a lock-less filesystem
                rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per group, sorted by L, depth, layers, then the rest."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k, "") for k in GROUP_KEYS)].append(row)
    summary = []
    for key, members in groups.items():
        accuracies = [float(m["accuracy"]) for m in members]
        entry = dict(zip(GROUP_KEYS, key))
        entry.update(
            layers=int(members[0]["layers"]), loops=int(members[0]["loops"]), depth=int(members[0]["depth"]),
            seeds=len(members), mean=statistics.fmean(accuracies),
            std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0, best=max(accuracies),
            params=int(members[0]["params"]), seconds=statistics.fmean(float(m["seconds"]) for m in members),
        )
        summary.append(entry)
    summary.sort(key=lambda e: (int(e["max_ops"]), e["depth"], e["layers"], float(e["lr"]), int(e["steps"])))
    return summary


def print_table(summary: list[dict]) -> None:
    print("| config | L | p | hidden | objective | lr | steps | seeds | accuracy % (mean ± std) | best | params | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in summary:
        print(f"| {e['config']} | {e['max_ops']} | {e['modulus']} | {e['hidden_size']} | {e['objective']} | {float(e['lr']):g} | "
              f"{e['steps']} | {e['seeds']} | "
              f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f} | {100 * e['best']:.1f} | {e['params']:,} | "
              f"{e['seconds']:.0f} |")


def plot(summary: list[dict], path: str | Path) -> None:
    """Accuracy (mean ± std over seeds, best seed as x) against layers x loops."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: the plot needs matplotlib (pip install matplotlib), or leave out --plot") from None
    best: dict[tuple, dict] = {}  # (line, config) -> the group with the best mean
    for e in summary:
        key = (e["layers"], int(e["max_ops"]), e["modulus"], e["hidden_size"], e["config"])
        if key not in best or e["mean"] > best[key]["mean"]:
            best[key] = e
    lines: dict[tuple, list[dict]] = defaultdict(list)  # one line per layer count, L, modulus, width
    for key, e in best.items():
        lines[key[:-1]].append(e)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (layers, max_ops, modulus, hidden), entries in sorted(lines.items()):
        entries.sort(key=lambda e: e["depth"])
        depth = [e["depth"] for e in entries]
        line = ax.errorbar(depth, [100 * e["mean"] for e in entries], yerr=[100 * e["std"] for e in entries],
                           marker="o", capsize=3, label=f"{layers} layers, L={max_ops}, p={modulus}, hidden {hidden}")
        ax.scatter(depth, [100 * e["best"] for e in entries], marker="x", color=line[0].get_color())
        for e in entries:
            ax.annotate(e["config"], (e["depth"], 100 * e["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xlabel("total depth (layers x loops)")
    ax.set_ylabel("test accuracy (%)  [o mean ± std, x best seed]")
    ax.set_title("Mano")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    except (csv.Error, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {args.csv}: {e}")
    needed = {"config", "layers", "loops", "depth", "accuracy", "seed", "params", "seconds", *GROUP_KEYS}
    bad = [row for row in rows if not needed <= row.keys() or any(row[k] in ("", None) for k in needed)]
    if bad:
        sys.exit(f"error: {len(bad)} rows lack columns of {sorted(needed)}; first: {bad[0]}")
    if not rows:
        sys.exit(f"error: no result rows in {', '.join(args.csv)}")
    summary = summarise(rows)
    print_table(summary)
    if args.plot:
        plot(summary, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
