#!/usr/bin/env python
"""Validation loss and accuracy per loop step of a trained LoopLM, and its exit distribution.

    python tools/eval_loops.py --model runs/tiny/model --data data/c_text_document \\
        --seq-length 1024 --batch-size 8 --num-batches 50 --output runs/tiny/eval

Reads the validation split of the data as training does (same split ratios, seed and document
masking: pass the run's --split / --seed / --eod-token-id if it changed them); `--split 0,1,0`
evaluates every document of a held-out dataset. Writes eval_loops.json (every number),
ce_per_loop.png and exit_histogram.png into --output (a new folder; --overwrite replaces one this
tool wrote earlier: looplm_mega/outputs.py), and prints a table per loop step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.data.builder import build_datasets  # noqa: E402
from looplm_mega.data.config import SPLIT_NAMES, DataConfig  # noqa: E402
from looplm_mega.data.gpt_dataset import collate_batch  # noqa: E402
from looplm_mega.data.indexed import data_path, index_path  # noqa: E402
from looplm_mega.data.token_ids import check_token_ids  # noqa: E402
from looplm_mega.eval.per_loop import PerLoopMetrics, evaluate_per_loop  # noqa: E402
from looplm_mega.eval.plots import plot_exit_histogram, plot_ce_per_loop, require_matplotlib  # noqa: E402
from looplm_mega.inference.loading import load_model  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_dir, exit_with, staged_output_dir  # noqa: E402
from looplm_mega.training.hf_format import DTYPES  # noqa: E402

RESULTS, LOSS_PLOT, EXIT_PLOT = "eval_loops.json", "ce_per_loop.png", "exit_histogram.png"
KIND = "eval_loops result"  # the kind of output (looplm_mega/outputs.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="a model directory (tools/convert_checkpoint.py) or a released-format directory")
    p.add_argument("--data", required=True, action="append", help="dataset prefix (.bin/.idx); repeat to blend several")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sample")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    p.add_argument("--num-batches", type=int, default=10, help="batches evaluated")
    p.add_argument("--num-loops", type=int, default=None, help="loop steps T (default: the model's total_ut_steps)")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="q of the Q-exit, in [0, 1] (default: the model's early_exit_threshold)")
    p.add_argument("--output", required=True, help="folder for eval_loops.json and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace an --output this tool wrote earlier")
    p.add_argument("--split", default=DataConfig.split, help="train/valid/test document ratios")
    p.add_argument("--split-name", choices=SPLIT_NAMES, default="valid", help="which split to evaluate")
    p.add_argument("--seed", type=int, default=DataConfig.seed, help="sample shuffle seed")
    p.add_argument("--eod-token-id", type=int, default=None, help="also end a document after every EOD token")
    p.add_argument("--no-reset-attention-mask", action="store_true", help="attend across document boundaries")
    p.add_argument("--cache-dir", default=None, help="folder for the sample index caches (default: next to the data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as stored)")
    args = p.parse_args(argv)
    for name in ("seq_length", "batch_size", "num_batches", "num_loops"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.exit_threshold is not None and not 0.0 <= args.exit_threshold <= 1.0:
        p.error(f"--exit-threshold {args.exit_threshold}: must be in [0, 1]")
    return args


def print_table(metrics: PerLoopMetrics) -> None:
    print(f"{'step':>4}  {'CE':>8}  {'accuracy':>8}  {'mean p(t)':>9}  {'Q-exit tokens':>13}")
    rows = zip(metrics.ce_per_loop, metrics.accuracy_per_loop, metrics.exit_prob_per_loop, metrics.exit_loop_counts)
    for step, (ce, accuracy, p, count) in enumerate(rows, start=1):
        print(f"{step:>4}  {ce:>8.4f}  {accuracy:>8.4f}  {p:>9.4f}  {count:>13,}")
    print(f"tokens: {metrics.num_tokens:,}  mean E[t]: {metrics.mean_expected_exit_loop:.3f}  "
          f"Q-exit (q={metrics.exit_threshold:g}): mean step {metrics.mean_exit_loop:.3f}, "
          f"CE {metrics.adaptive_ce:.4f}, accuracy {metrics.adaptive_accuracy:.4f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    inputs = [args.model, *(f(prefix) for prefix in args.data for f in (data_path, index_path))]
    try:
        check_output_dir(args.output, KIND, inputs, args.overwrite)  # before the evaluation
    except OutputError as e:
        exit_with("eval_loops.py", e)
    try:
        require_matplotlib()
        model = load_model(args.model, args.device, DTYPES[args.dtype] if args.dtype else None)
        limit = model.config.max_position_embeddings
        if args.seq_length > limit:
            raise ValueError(f"--seq-length {args.seq_length}: longer than the model's max_position_embeddings={limit} "
                             f"({args.model})")
        check_token_ids(args.data, model.config.vocab_size, args.cache_dir)
        data = DataConfig(prefixes=args.data, split=args.split, seq_length=args.seq_length, seed=args.seed,
                          reset_attention_mask=not args.no_reset_attention_mask, eod_token_id=args.eod_token_id,
                          cache_dir=args.cache_dir)
        split = SPLIT_NAMES.index(args.split_name)
        if data.split_ratios[split] == 0:
            raise ValueError(f"--split {args.split}: gives the {args.split_name} split no documents")
        samples = args.batch_size * args.num_batches
        dataset = build_datasets(data, {args.split_name: samples})[split]
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate_batch)
        batches = tqdm(loader, total=args.num_batches, desc="eval", unit="batch")
        metrics = evaluate_per_loop(model, batches, args.num_loops, args.exit_threshold)
    except (ImportError, FileNotFoundError, ValueError) as e:  # IndexedDatasetError, ConfigError: ValueErrors
        sys.exit(f"error: {e}")

    results = {"model": str(args.model), "data": args.data, "split": args.split, "split_name": args.split_name,
               "seed": args.seed, "eod_token_id": args.eod_token_id, "reset_attention_mask": data.reset_attention_mask,
               "seq_length": args.seq_length, "batch_size": args.batch_size, "num_batches": args.num_batches,
               **metrics.to_dict()}
    try:
        with staged_output_dir(args.output, KIND, inputs, args.overwrite) as staging:
            (staging / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
            plot_ce_per_loop(staging / LOSS_PLOT, metrics.ce_per_loop, metrics.accuracy_per_loop,
                             metrics.adaptive_ce, metrics.exit_threshold)
            plot_exit_histogram(staging / EXIT_PLOT, metrics.exit_loop_counts, metrics.exit_prob_per_loop,
                                metrics.exit_threshold)
    except OutputError as e:
        exit_with("eval_loops.py", e)
    print_table(metrics)
    print(f"wrote {args.output}: {RESULTS}, {LOSS_PLOT}, {EXIT_PLOT}")


if __name__ == "__main__":
    main()
