#!/usr/bin/env python
"""The quickstart: the whole pipeline on this machine's CPU, with no download.

1. corpus: the Python standard library's sources as JSONL (every Python installation has them);
2. a 4096-token byte-level BPE tokenizer trained on it with `tokenizers`;
3. tools/preprocess_data.py: the corpus to Megatron .bin/.idx shards;
4. `deepspeed --num_gpus 2 --module looplm_mega.pretrain` with configs/run/tiny_cpu.yaml: the tiny
   LoopLM (1 shared layer x 4 loops), ZeRO-2, two gloo processes, validation CE per loop step;
5. tools/convert_checkpoint.py: the checkpoint to one safetensors model, and to the released Ouro
   (Hugging Face) format; tools/plot_run.py: the run's figures (loss and CE per loop, the exit
   distribution, LR, gradient norm, throughput) as PNG files;
6. a few lines generated from two prompts (KV cache, Q-exit early exit), with loops per token.

Steps 1 to 5 write under a temporary name beside --out, renamed to it when they succeed; an
existing --out is replaced only with --overwrite, and only if a quickstart wrote it.

    python examples/quickstart.py [--out runs/quickstart] [--overwrite] [--steps 300] [--processes 2] [--section.field value ...]
    python examples/quickstart.py --config configs/curriculum/tiny_cpu.yaml    # Ouro's curriculum in miniature
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from looplm_mega.data.stdlib_corpus import stdlib_documents, write_stdlib_jsonl  # noqa: E402
from looplm_mega.data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from looplm_mega.inference.exit_rules import ExitRule  # noqa: E402
from looplm_mega.inference.generate import GenerationConfig  # noqa: E402
from looplm_mega.inference.loading import load_model  # noqa: E402
from looplm_mega.inference.text import generate_text  # noqa: E402
from looplm_mega.outputs import OutputError, exit_with, staged_output_dir  # noqa: E402
from looplm_mega.training.distributed import free_port  # noqa: E402

KIND = "quickstart"  # the kind of output (looplm_mega/outputs.py)


def run(command: list[str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def build(out: Path, args: argparse.Namespace, overrides: list[str]) -> None:
    """Steps 1 to 5, everything written under `out`."""
    (out / "data").mkdir(parents=True)
    start = time.time()
    max_bytes = None if args.corpus_mb is None else int(args.corpus_mb * 1e6)

    documents = write_stdlib_jsonl(out / "corpus.jsonl", max_bytes)
    train_bpe_tokenizer(stdlib_documents(max_bytes), args.vocab_size, out / "tokenizer.json")
    print(f"corpus: {documents} documents; tokenizer: {args.vocab_size} tokens ({time.time() - start:.0f}s)")
    run([sys.executable, "tools/preprocess_data.py", "--input", str(out / "corpus.jsonl"),
         "--tokenizer", str(out / "tokenizer.json"), "--output-prefix", str(out / "data" / "stdlib"),
         "--append-eod", "--workers", str(min(2, args.processes))])

    run_dir = out / "run"
    # A port of our own: the launcher's default (29500) may be taken by another job on this box.
    run(["deepspeed", "--num_gpus", str(args.processes), "--master_port", str(free_port()), "--module", "looplm_mega.pretrain",
         "--config", args.config, "--run_dir", str(run_dir),
         f"--data.prefixes=[{out / 'data' / 'stdlib_text_document'}]", "--model.vocab_size", str(args.vocab_size),
         *(["--training.train_steps", str(args.steps)] if args.steps else []), *overrides])

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_loop = [r for r in records if r["split"] == "valid"][-1]["ce_per_loop"]
    print("\nvalidation CE per loop: " + "  ".join(f"loop {t + 1}: {v:.3f}" for t, v in enumerate(per_loop)))
    print(f"loop {len(per_loop)} vs loop 1: {per_loop[-1] - per_loop[0]:+.3f} nats")

    run([sys.executable, "tools/convert_checkpoint.py", "--checkpoint", str(run_dir / "checkpoints"), "--output", str(out / "model")])
    run([sys.executable, "tools/convert_checkpoint.py", "--checkpoint", str(run_dir / "checkpoints"), "--to-hf", str(out / "hf"),
         "--tokenizer", str(out / "tokenizer.json")])
    run([sys.executable, "tools/plot_run.py", str(run_dir), "--output", str(out / "plots")])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out an earlier quickstart wrote")
    parser.add_argument("--config", default="configs/run/tiny_cpu.yaml", help="the run config (a curriculum's too)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run config's)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--corpus-mb", type=float, default=None, help="use only this much of the corpus")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args, overrides = parser.parse_known_args(argv)  # the rest: run-config flags, e.g. --training.micro_batch_size=4
    out = (ROOT / args.out).resolve()
    start = time.time()
    try:
        with staged_output_dir(out, KIND, overwrite=args.overwrite) as staging:
            build(staging, args, overrides)
    except OutputError as e:
        exit_with(parser.prog, e)

    model = load_model(out / "model")
    tokenizer = load_tokenizer(out / "tokenizer.json")
    prompts = ["def ", "import "]
    config = GenerationConfig(max_new_tokens=48, temperature=0.7, top_p=0.95, exit=ExitRule("q_exit", threshold=0.9))
    texts, result = generate_text(model, tokenizer, prompts, config)
    for prompt, text in zip(prompts, texts):
        print(f"\n--- {prompt!r} ->\n{prompt}{text}")
    print(f"\n[generation with Q-exit (q = 0.9): {result.loops_per_token:.2f} loops per token of "
          f"{model.config.total_ut_steps}, {result.tokens_per_second:.0f} tokens/s]")
    print("\nfigures of the run (tools/plot_run.py): " + ", ".join(str(p) for p in sorted((out / "plots").glob("*.png"))))
    print(f"\ndone in {time.time() - start:.0f}s; run directory {out / 'run'}")


if __name__ == "__main__":
    main()
