#!/usr/bin/env python
"""Train LoopLMs on the Mano task over a grid of settings; one CSV row per trained model.

    python tools/mano_sweep.py --out runs/mano/results.csv                  # the default grid (the study)
    python tools/mano_sweep.py --configs 2x1,2x4,8x1 --L 5 --objectives last --steps 1000 --out r.csv
    python tools/mano_sweep.py --list                                       # the grid, numbered
    python tools/mano_sweep.py --task-id 3 --out r.csv                      # only entry 3 (SLURM arrays)

The grid is every combination of --configs, --L, --objectives, --lrs, --steps and --seeds,
enumerated in that order with the last (the seed) varying fastest, except that a one-loop shape
runs only the first objective (with one loop they are the same loss); --list prints it with the
task ids. Each finished run appends one row to --out (tools/mano_collect.py summarises the file),
so many array tasks can share one CSV. The default grid is the CPU study of README "Mano", the
paper's comparison in miniature: k layers x 1 loop, the same k layers x m loops (same parameters)
and k x m layers x 1 loop (same compute), each at three learning rates and three seeds, at two
values of L, the looped shape trained with both objectives: 72 runs, about two hours on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.tasks import mano  # noqa: E402
from looplm_mega.tasks.mano_train import OBJECTIVES, ManoRun, append_row, sweep_grid, train_mano  # noqa: E402
from looplm_mega.training.metrics import format_duration  # noqa: E402

DEFAULTS = ManoRun()
KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _list(kind, text: str) -> list:
    """'1,2,3' -> [1, 2, 3]; a bad item is named in the error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
    values = []
    for item in items:
        try:
            values.append(kind(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not {KIND_NAMES[kind]}") from None
    return values


def _objectives(text: str) -> list[str]:
    objectives = _list(str, text)
    for objective in objectives:
        if objective not in OBJECTIVES:
            raise argparse.ArgumentTypeError(f"{objective!r} in {text!r} is not one of {', '.join(OBJECTIVES)}")
    return objectives


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--configs", type=lambda s: _list(str, s), default=["2x1", "2x3", "6x1"],
                   help="model shapes LAYERSxLOOPS, comma-separated")
    p.add_argument("--L", dest="max_ops", type=lambda s: _list(int, s), default=[5, 6],
                   help="operators: training draws 1..L, the test uses exactly L")
    p.add_argument("--lrs", type=lambda s: _list(float, s), default=[1e-3, DEFAULTS.lr, 1e-2],
                   help="peak learning rates")
    p.add_argument("--steps", type=lambda s: _list(int, s), default=[DEFAULTS.steps], help="training steps")
    p.add_argument("--seeds", type=lambda s: _list(int, s), default=[0, 1, 2], help="seeds, comma-separated (weights and training batches)")
    p.add_argument("--modulus", type=int, default=DEFAULTS.modulus, help="numbers mod this (the paper: 23)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="examples per training step")
    p.add_argument("--hidden-size", type=int, default=DEFAULTS.hidden_size, help="model width")
    p.add_argument("--num-heads", type=int, default=DEFAULTS.num_heads, help="attention heads")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: 2 x hidden size)")
    p.add_argument("--entropy-beta", type=float, default=DEFAULTS.entropy_beta, help="beta of the Stage I objective")
    p.add_argument("--sublayer-norm-init", type=float, default=DEFAULTS.sublayer_norm_init,
                   help="initial weight of the norms on the attention and MLP outputs")
    p.add_argument("--objectives", type=_objectives, default=list(OBJECTIVES),
                   help="last: the last loop's answer only; stage1: Ouro's Stage I loss over every loop "
                        "(a one-loop shape runs the first only: with one loop they are the same loss)")
    p.add_argument("--test-size", type=int, default=DEFAULTS.test_size, help="held-out examples at exactly L operators")
    p.add_argument("--out", default="runs/mano/results.csv", help="the CSV that rows are appended to")
    p.add_argument("--task-id", type=int, default=None, help="run only this entry of the grid (see --list)")
    p.add_argument("--list", action="store_true", help="print the grid with task ids and exit")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: SLURM_CPUS_PER_TASK, else 1: these models are too small "
                        "to gain from more, and on a shared machine extra threads only contend)")
    p.add_argument("--log-every", type=int, default=100, help="progress line every this many steps")
    p.add_argument("--eval-every", type=int, default=0, help="test accuracy every this many steps (0: at the end)")
    args = p.parse_args(argv)

    try:
        grid = sweep_grid(args.configs, args.max_ops, args.objectives, args.lrs, args.steps, args.seeds,
                          modulus=args.modulus, batch_size=args.batch_size, hidden_size=args.hidden_size,
                          num_heads=args.num_heads, intermediate_size=args.intermediate_size,
                          entropy_beta=args.entropy_beta, sublayer_norm_init=args.sublayer_norm_init,
                          test_size=args.test_size)
        for run in grid:
            run.model_config()  # a bad model setting fails now, not after the first runs
    except ValueError as e:
        p.error(str(e))
    if args.task_id is not None and not 0 <= args.task_id < len(grid):
        p.error(f"--task-id {args.task_id} is outside the grid's 0..{len(grid) - 1} (see --list)")
    if args.list:
        for i, run in enumerate(grid):
            print(f"{i}\t{run.config_name}\tL={run.max_ops}\t{run.objective}\tlr={run.lr:g}\tsteps={run.steps}"
                  f"\tseed={run.seed}")
        print(f"{len(grid)} runs (SLURM: --array=0-{len(grid) - 1})")
        return
    if args.task_id is not None:
        grid = [grid[args.task_id]]

    threads = args.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or 1
    torch.set_num_threads(threads)
    for max_ops in sorted({run.max_ops for run in grid}):
        space = mano.count_expressions(max_ops, args.modulus)
        print(f"L={max_ops} over Z_{args.modulus}: {space:,} expressions with {max_ops} operators; the test set holds "
              f"{args.test_size:,} ({100 * args.test_size / space:.2g}%), never drawn in training", flush=True)
    start = time.perf_counter()
    for i, run in enumerate(grid):
        row = train_mano(run, log=lambda line: print(line, flush=True), log_every=args.log_every,
                         eval_every=args.eval_every)
        append_row(args.out, row)
        print(f"run {i + 1}/{len(grid)}: {row['config']} seed {row['seed']} accuracy {row['accuracy']:.4f} "
              f"-> {args.out}", flush=True)
    print(f"{len(grid)} runs in {format_duration(time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
