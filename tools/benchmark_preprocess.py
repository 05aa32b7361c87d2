#!/usr/bin/env python
"""Preprocessing benchmark: tools/preprocess_data.py encoding through tiktoken (its default for
byte-level BPE) against the plain `tokenizers` path, and Megatron-LM's own tools/preprocess_data.py
with --megatron, on one corpus with 1 and 2 (or more) workers, measured side by side in one run.

The corpus is synthetic but made of real text: windows of varied length (a log-normal around
4 KB) cut at line starts from the Python standard library's sources, shuffled and repeated up to
the size asked for, as JSONL. It and the tokenizer (byte-level BPE trained on a sample of the same
sources) are built once into the cache directory. Each measured run is a fresh process; its peak
memory is the largest sum of RSS over its whole process tree (main process and encoding workers),
sampled every 50 ms; shared pages count once per process, so this overstates a little. Every tool
gets the same Megatron-style command line (--tokenizer-type HuggingFaceTokenizer, --append-eod) and
is timed from start to exit, imports included. All runs must write byte-identical .bin/.idx
files, which the benchmark checks.

    python tools/benchmark_preprocess.py                    # 200 MB corpus, vocab 32768, workers 1 and 2
    python tools/benchmark_preprocess.py --corpus-mb 1 --vocab-size 400 --tokenizer-sample-mb 0.3
    python tools/benchmark_preprocess.py --repeats 3        # on a shared machine: alternate, report medians
    python tools/benchmark_preprocess.py --megatron ../Megatron-LM   # and Megatron-LM's tool, side by side
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.data.indexed import IndexedDataset  # noqa: E402
from looplm_mega.data.preprocess import PreprocessConfig, output_prefix  # noqa: E402
from looplm_mega.data.stdlib_corpus import stdlib_documents  # noqa: E402
from looplm_mega.data.tokenizer import EOD_TOKEN, train_bpe_tokenizer  # noqa: E402

OUR_TOOL = Path(__file__).resolve().parent / "preprocess_data.py"

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "looplm_mega" / "benchmark_preprocess"
_SAMPLE_SECONDS = 0.05


def build_corpus(path: Path, target_bytes: int, seed: int = 0) -> None:
    """Write the JSONL corpus (atomically): documents cut from random stdlib files until
    `target_bytes` of JSONL are written."""
    sources = list(stdlib_documents())
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    written, next_report, start = 0, 0, time.perf_counter()
    with tmp.open("w", encoding="utf-8") as f:
        while written < target_bytes:
            # Draw in chunks: a vectorised draw per 1,000 documents rather than per document.
            files = rng.integers(len(sources), size=1000)
            lengths = np.clip(rng.lognormal(np.log(4000), 1.0, size=1000), 200, 200_000).astype(np.int64)
            starts = rng.random(1000)
            for file_index, length, start_fraction in zip(files, lengths, starts):
                text = sources[file_index]
                first = text.find("\n", int(start_fraction * max(len(text) - length, 0))) + 1  # a line start
                window = text[first : first + length]
                if window.isspace() or not window:  # kept by Megatron-LM, skipped by us: not comparable
                    continue
                line = json.dumps({"text": window}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target_bytes:
                    break
            if written >= next_report:
                print(f"corpus: {written / 1e6:.0f} / {target_bytes / 1e6:.0f} MB "
                      f"({written / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s)", file=sys.stderr, flush=True)
                next_report += 50_000_000
    tmp.replace(path)


def prepare(cache_dir: Path, corpus_mb: float, vocab_size: int, sample_mb: float, seed: int) -> tuple[Path, Path]:
    """The cached corpus and tokenizer, built when missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = cache_dir / f"corpus_{corpus_mb:g}MB_seed{seed}.jsonl"
    if not corpus.exists():
        build_corpus(corpus, int(corpus_mb * 1e6), seed)
    tokenizer = cache_dir / f"tokenizer_bpe{vocab_size}_sample{sample_mb:g}MB.json"
    if not tokenizer.exists():
        start = time.perf_counter()
        train_bpe_tokenizer(stdlib_documents(max_bytes=int(sample_mb * 1e6)), vocab_size, tokenizer)
        print(f"tokenizer: vocab {vocab_size} trained on {sample_mb:g} MB in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    return corpus, tokenizer


def tree_rss_bytes(root: int) -> int:
    """Sum of the resident memory of `root` and all its descendants (Linux /proc)."""
    children = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            children[parent].append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        stack.extend(children[pid])
    return total


def megatron_tokenizer_dir(tokenizer: Path) -> Path:
    """A Hugging Face tokenizer directory around `tokenizer` (tokenizer.json, and the eos token that
    Megatron's HuggingFaceTokenizer appends as EOD), for the Megatron-style command line."""
    directory = tokenizer.with_suffix("")
    if not (directory / "tokenizer_config.json").exists():
        directory.mkdir(exist_ok=True)
        (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def command(variant: str, corpus: Path, tokenizer_dir: Path, prefix: Path, workers: int, args) -> list[str]:
    """The same Megatron-LM command line for every variant; ours adds only --no-fast-bpe for the
    plain `tokenizers` path, and --batch-documents."""
    tool = {"megatron": args.megatron / "tools/preprocess_data.py" if args.megatron else None}.get(variant, OUR_TOOL)
    line = [sys.executable, str(tool), "--input", str(corpus), "--output-prefix", str(prefix), "--json-keys", "text",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir), "--append-eod",
            "--workers", str(workers), "--log-interval", "100000000"]
    if variant != "megatron":
        line += ["--batch-documents", str(args.batch_documents), "--verify-chars", str(args.verify_chars)]
    if variant == "tokenizers":
        line.append("--no-fast-bpe")
    return line


def measure(variant: str, cmd: list[str], prefix: Path, input_bytes: int) -> dict:
    """One run in a fresh process: wall time of the whole command, CPU time and peak RSS of its
    process tree, and the digests of its outputs."""
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty tool never blocks on it
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(_SAMPLE_SECONDS)
        seconds = time.perf_counter() - start
        log.seek(0)
        stderr = log.read()
    # CPU time of the whole tree (workers are reaped by the run's process, and it by us): on a
    # shared machine, CPU seconds / wall seconds shows how many cores the run actually got.
    cpu_seconds = _children_cpu_seconds() - cpu_before
    if process.returncode != 0:
        raise RuntimeError(f"{variant} run failed (exit {process.returncode}): {stderr[-2000:]}")
    output = Path(output_prefix(prefix, "text"))
    dataset = IndexedDataset(output)
    tokens, documents = dataset.num_tokens, dataset.num_documents
    del dataset
    digests = {}
    for suffix in (".bin", ".idx"):
        digest = hashlib.sha256()
        with open(f"{output}{suffix}", "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        digests[suffix] = digest.hexdigest()
    return {"variant": variant, "documents": documents, "tokens": tokens, "input_bytes": input_bytes,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "mb_per_s": input_bytes / 1e6 / seconds,
            "cpu_seconds": cpu_seconds, "peak_rss_bytes": peak, "sha256": digests,
            "encoder": "tiktoken" if "encoding with tiktoken" in stderr else "tokenizers" if variant != "megatron" else "transformers"}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_all(corpus: Path, tokenizer: Path, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(the median run of each worker count and variant, every run)."""
    variants = ["tokenizers", "tiktoken"] + (["megatron"] if args.megatron else [])
    tokenizer_dir = megatron_tokenizer_dir(tokenizer)
    runs: dict[tuple[int, str], list[dict]] = {(w, v): [] for w in args.workers for v in variants}
    # Variants and worker counts alternate over the repeats, so that load from elsewhere on a
    # shared machine hits each alike; each reports its median run.
    for repeat in range(args.repeats):
        for workers in args.workers:
            for variant in variants:
                prefix = args.cache_dir / f"run_{variant}_workers{workers}"
                try:
                    r = measure(variant, command(variant, corpus, tokenizer_dir, prefix, workers, args), prefix,
                                corpus.stat().st_size)
                finally:
                    for suffix in (".bin", ".idx"):
                        Path(output_prefix(prefix, "text") + suffix).unlink(missing_ok=True)
                r["workers"] = workers
                runs[workers, variant].append(r)
                print(f"workers {workers}, {variant}, repeat {repeat + 1}/{args.repeats}: {r['seconds']:.1f} s, "
                      f"{r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB",
                      file=sys.stderr, flush=True)
    results = []
    for (workers, variant), variant_runs in runs.items():
        median = dict(sorted(variant_runs, key=lambda r: r["seconds"])[(len(variant_runs) - 1) // 2])
        median["seconds_all"] = [round(r["seconds"], 2) for r in variant_runs]
        median["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in variant_runs)
        base = {v: statistics.median(r["seconds"] for r in runs[workers, v]) for v in variants}
        median["speedup_vs_tokenizers"] = base["tokenizers"] / statistics.median(r["seconds"] for r in variant_runs)
        if args.megatron:
            median["speedup_vs_megatron"] = base["megatron"] / statistics.median(r["seconds"] for r in variant_runs)
        results.append(median)
    return results, [r for variant_runs in runs.values() for r in variant_runs]


def format_table(results: list[dict]) -> str:
    megatron = any("speedup_vs_megatron" in r for r in results)
    lines = ["| workers | tool | encoder | seconds | CPU seconds | tokens/s | MB/s | peak RSS, process tree (MiB) | vs tokenizers"
             + (" | vs Megatron-LM |" if megatron else " |"),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if megatron else "")]
    for r in results:
        tool = "Megatron-LM" if r["variant"] == "megatron" else "ours"
        line = (f"| {r['workers']} | {tool} | {r['encoder']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r['mb_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:,.0f} | "
                f"{r['speedup_vs_tokenizers']:.2f}x |")
        if megatron:
            line += f" {r['speedup_vs_megatron']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the corpus and tokenizer are kept")
    p.add_argument("--corpus-mb", type=float, default=200.0, help="size of the JSONL corpus")
    p.add_argument("--vocab-size", type=int, default=32768, help="of the byte-level BPE tokenizer trained for it")
    p.add_argument("--tokenizer-sample-mb", type=float, default=10.0, help="text the tokenizer is trained on")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--repeats", type=int, default=1, help="runs per worker count and tool; the median is reported")
    p.add_argument("--batch-documents", type=int, default=PreprocessConfig.batch_documents, help="documents per encoding batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus's documents")
    p.add_argument("--verify-chars", type=int, default=PreprocessConfig.verify_chars,
                   help="our tool's --verify-chars: text encoded both ways before tiktoken takes over")
    p.add_argument("--megatron", type=Path, help="a Megatron-LM checkout: also run its tools/preprocess_data.py "
                   "(with this interpreter, which then needs transformers and Megatron's imports)")
    p.add_argument("--output", type=Path, help="write the results as JSON here too")
    args = p.parse_args(argv)
    if min(args.workers) < 1 or args.repeats < 1 or args.corpus_mb <= 0 or args.vocab_size < 257:
        sys.exit("error: --workers and --repeats must be at least 1, --corpus-mb positive and --vocab-size above 256")
    if args.megatron and not (args.megatron / "tools/preprocess_data.py").is_file():
        sys.exit(f"error: --megatron {args.megatron}: no tools/preprocess_data.py in this directory")
    corpus, tokenizer = prepare(args.cache_dir, args.corpus_mb, args.vocab_size, args.tokenizer_sample_mb, args.seed)
    results, all_runs = measure_all(corpus, tokenizer, args)
    identical = len({json.dumps(r["sha256"]) for r in all_runs}) == 1
    summary = {"corpus": str(corpus), "corpus_bytes": corpus.stat().st_size, "vocab_size": args.vocab_size,
               "cpus": os.cpu_count(), "results": results, "runs": all_runs, "identical_outputs": identical}
    print(f"corpus {summary['corpus_bytes'] / 1e6:.1f} MB JSONL, {results[0]['documents']:,} documents, "
          f"{results[0]['tokens']:,} tokens; byte-level BPE vocab {args.vocab_size}; {os.cpu_count()} CPUs; "
          f"median of {args.repeats}; outputs {'byte-identical' if identical else 'DIFFERENT'} across all runs\n")
    print(format_table(results))
    if args.output:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(args.output)
    if not identical:
        sys.exit("error: the runs produced different outputs")


if __name__ == "__main__":
    main()
