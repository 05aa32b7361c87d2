#!/usr/bin/env python
"""Benchmark of the dataset index build: document / sample / shuffle indices of a synthetic
dataset (1B tokens by default, realistic document lengths), split 969,30,1, built cold, then
loaded from the cache, then read at random; plus the blend schedule of a 3-dataset mixture. Before
that, the checks every run makes on opening a dataset: the validation of every index entry, and
the token-id range (one pass over the .bin, then from its cache).

Index building reads only the .idx, so the .bin is a sparse file of the right size (truncate):
the benchmark needs no disk space for tokens and its sample reads return zeros (they measure the
per-sample overhead, not the disk); the token-id scan then reads zero pages, memory speed, not
disk speed. --dense_bin writes random tokens instead (2 bytes a token on disk), for a scan of real
pages (just written, so from the page cache when memory allows).

    python tools/benchmark_dataset_index.py                       # 1B tokens, seq 4096
    python tools/benchmark_dataset_index.py --num_tokens 1e6 --seq_length 128 --blend_samples 1e5
    python tools/benchmark_dataset_index.py --dense_bin --workdir /big/disk/bench   # 2 GB of tokens
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.data.blended import build_blend_indices  # noqa: E402
from looplm_mega.data.builder import build_datasets  # noqa: E402
from looplm_mega.data.config import DataConfig  # noqa: E402
from looplm_mega.data.gpt_dataset import split_document_ranges  # noqa: E402
from looplm_mega.data.indexed import CODE_OF_DTYPE, MAGIC, VERSION, IndexedDataset, data_path, index_path  # noqa: E402
from looplm_mega.data.token_ids import token_id_range  # noqa: E402


def synthetic_document_lengths(num_tokens: int, mean_doc_tokens: float, seed: int) -> np.ndarray:
    """Log-normal document lengths (web text has a long tail: many short pages, a few books),
    scaled to the mean and cut so that they sum to exactly num_tokens."""
    rng = np.random.default_rng(seed)
    sigma = 1.2
    mu = np.log(mean_doc_tokens) - sigma**2 / 2  # the mean of a log-normal is exp(mu + sigma^2 / 2)
    count = int(num_tokens / mean_doc_tokens * 1.2) + 16
    lengths = np.clip(rng.lognormal(mu, sigma, size=count), 1, 1_000_000).astype(np.int64)
    while lengths.sum() < num_tokens:
        lengths = np.concatenate([lengths, lengths])
    ends = np.cumsum(lengths)
    keep = int(np.searchsorted(ends, num_tokens)) + 1
    lengths = lengths[:keep]
    lengths[-1] -= ends[keep - 1] - num_tokens
    return lengths[lengths > 0]


def write_sparse_dataset(prefix: Path, lengths: np.ndarray, dtype=np.uint16, dense: bool = False,
                         vocab_size: int = 50_000, seed: int = 0) -> None:
    """The .idx of one-sequence documents with these lengths, and a sparse .bin of matching size
    (dense: random tokens below vocab_size, written in chunks)."""
    dtype = np.dtype(dtype)
    nbytes = lengths * dtype.itemsize
    pointers = np.cumsum(nbytes) - nbytes
    with open(index_path(prefix), "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[dtype], len(lengths), len(lengths) + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    with open(data_path(prefix), "wb") as f:
        if not dense:
            f.truncate(int(nbytes.sum()))
            return
        rng = np.random.default_rng(seed)
        for start in range(0, int(lengths.sum()), 1 << 26):
            f.write(rng.integers(0, vocab_size, min(1 << 26, int(lengths.sum()) - start), dtype=dtype).tobytes())


def measure(step):
    """(result, (wall seconds, CPU seconds of this process), peak bytes allocated during the step:
    numpy arrays and Python objects). The CPU time shows what a step costs when other jobs share
    the machine and stretch the wall time."""
    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    result = step()
    seconds = (time.perf_counter() - start, time.process_time() - cpu)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def run(args: argparse.Namespace, workdir: Path) -> dict:
    num_tokens = int(args.num_tokens)
    lengths = synthetic_document_lengths(num_tokens, args.mean_doc_tokens, args.seed)
    prefix = workdir / "synthetic_text_document"
    write_sparse_dataset(prefix, lengths, dense=args.dense_bin, seed=args.seed)
    config = DataConfig(prefixes=[str(prefix)], split="969,30,1", seq_length=args.seq_length, seed=args.seed,
                        cache_dir=str(workdir / "cache"))
    # Samples per split: the asked number of epochs of the split's tokens (samples overlap by one).
    ranges = split_document_ranges(len(lengths), config.split_ratios)
    split_tokens = [int(lengths[first:last].sum()) for first, last in ranges]
    num_samples = {name: max(1, int(args.epochs * (tokens - 1) / args.seq_length))
                   for name, tokens in zip(("train", "valid", "test"), split_tokens)}
    print(f"{num_tokens:,} tokens in {len(lengths):,} documents (mean {lengths.mean():.0f}, "
          f"median {np.median(lengths):.0f}, max {lengths.max():,} tokens); seq {args.seq_length}; "
          f"samples {num_samples}", flush=True)

    rows = []
    _, seconds, peak = measure(lambda: IndexedDataset(prefix))
    rows.append(("open the dataset: validate every index entry", seconds, peak, f"{len(lengths):,} sequences"))
    found, seconds, peak = measure(lambda: token_id_range(prefix, workdir / "cache"))
    kind = "random tokens" if args.dense_bin else "sparse .bin: zero pages"
    rows.append(("token-id range: scan the .bin", seconds, peak,
                 f"{num_tokens / seconds[0] / 1e9:.2f} G tokens/s ({kind})"))
    assert found == token_id_range(prefix, workdir / "cache")
    _, seconds, peak = measure(lambda: token_id_range(prefix, workdir / "cache"))
    rows.append(("token-id range: cached", seconds, peak, ""))
    (train, _, _), seconds, peak = measure(lambda: build_datasets(config, num_samples))
    assert train.built_indices, "the cold build found a cache: the work folder is not fresh"
    note = f"{train.num_epochs} epoch(s), {len(train):,} train samples"
    rows.append(("build indices (cold, train+valid+test)", seconds, peak, note))
    (train, _, _), seconds, peak = measure(lambda: build_datasets(config, num_samples))
    assert not train.built_indices, "the second build did not load the cache"
    rows.append(("load cached indices (mmap)", seconds, peak, ""))

    reads = min(args.reads, len(train))
    picks = np.random.default_rng(args.seed).integers(0, len(train), size=reads)
    _, seconds, peak = measure(lambda: sum(len(train[int(i)]["tokens"]) for i in picks))
    rows.append((f"read {reads:,} random samples", seconds, peak, f"{reads / seconds[0]:,.0f} samples/s"))

    blend_samples = int(args.blend_samples)
    _, seconds, peak = measure(lambda: build_blend_indices([0.5, 0.3, 0.2], blend_samples))
    rows.append((f"blend schedule, 3 datasets, {blend_samples:,} samples", seconds, peak, ""))
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"num_tokens": num_tokens, "num_documents": int(len(lengths)), "seq_length": args.seq_length,
            "dense_bin": args.dense_bin, "token_id_range": list(found),
            "num_samples": num_samples, "max_rss_bytes": max_rss,
            "rows": [{"step": s, "seconds": t, "cpu_seconds": c, "peak_bytes": p, "note": n} for s, (t, c), p, n in rows]}


def format_table(result: dict) -> str:
    lines = ["| step | time (s) | CPU time (s) | peak memory (MiB) | note |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['step']} | {row['seconds']:.3f} | {row['cpu_seconds']:.3f} | "
                     f"{row['peak_bytes'] / 2**20:.1f} | {row['note']} |")
    lines.append(f"\nProcess peak RSS: {result['max_rss_bytes'] / 2**20:.0f} MiB "
                 "(peak memory per step: numpy and Python allocations, tracemalloc; memory-mapped files excluded)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--num_tokens", type=float, default=1e9, help="dataset size in tokens")
    parser.add_argument("--seq_length", type=int, default=4096, help="tokens per sample")
    parser.add_argument("--mean_doc_tokens", type=float, default=1000.0, help="mean document length")
    parser.add_argument("--epochs", type=float, default=1.0, help="samples asked of each split, in epochs")
    parser.add_argument("--reads", type=int, default=1000, help="random sample reads to time")
    parser.add_argument("--blend_samples", type=float, default=1e7, help="samples of the 3-dataset blend schedule")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the document lengths, shuffles and reads")
    parser.add_argument("--dense_bin", action="store_true", help="write random tokens, not a sparse .bin")
    parser.add_argument("--workdir", help="folder for the synthetic dataset and cache (default: a temporary one)")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("num_tokens", "seq_length", "mean_doc_tokens", "epochs", "blend_samples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.workdir:
        workdir = Path(args.workdir)
        if workdir.exists() and any(workdir.iterdir()):
            parser.error(f"--workdir {workdir} is not empty (the cold build needs a fresh folder)")
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="dataset_index_bench_") as tmp:
            result = run(args, Path(tmp))
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
