#!/usr/bin/env python
"""Generate text from a trained LoopLM with a per-loop KV cache and per-token early exit.

    python tools/generate.py --model runs/quickstart/model --tokenizer runs/quickstart/tokenizer.json \
        --prompt "def " [--prompt "import " ...] [--prompts-file FILE] --max-new-tokens 64 \
        [--temperature 0.7 --top-k 50 --top-p 0.95] [--stop "\\n\\n"] [--num-loops 4] \
        [--kv-sharing full|last|mean] [--exit none|static|q_exit|hidden_diff --exit-loop 2 \
        --exit-threshold 0.9 --exit-eps 0.1]

--model: a model directory (tools/convert_checkpoint.py --output) or a released-format directory
(--to-hf, or a local copy of ByteDance/Ouro-1.4B); the tokenizer defaults to MODEL/tokenizer.json.
One prompt streams its text as it is generated; several are decoded as one padded batch and printed
at the end. Prints tokens/s, the average loops per token and the KV cache's size.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.data.tokenizer import load_tokenizer  # noqa: E402
from looplm_mega.inference.exit_rules import EXIT_KINDS, ExitRule  # noqa: E402
from looplm_mega.inference.generate import GenerationConfig  # noqa: E402
from looplm_mega.inference.kv_cache import SHARING_MODES  # noqa: E402
from looplm_mega.inference.loading import load_model  # noqa: E402
from looplm_mega.inference.text import generate_text  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (tools/convert_checkpoint.py) or a released-format directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one (default: the model's)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    parser.add_argument("--prompts-file", default=None, help="one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens of this total probability")
    parser.add_argument("--stop", action="append", default=[], help="stop string (backslash escapes allowed: \\n)")
    parser.add_argument("--num-loops", type=int, default=None, help="loop count (default: the model's total_ut_steps)")
    parser.add_argument("--kv-sharing", choices=SHARING_MODES, default="full",
                        help="full: a cache slot per loop and layer; last / mean: one per layer (1/T of the memory)")
    parser.add_argument("--exit", choices=EXIT_KINDS, default="none", help="early-exit rule: skip the remaining loops of a token")
    parser.add_argument("--exit-loop", type=int, default=0, help="--exit static: loops each token runs")
    parser.add_argument("--exit-threshold", type=float, default=1.0, help="--exit q_exit: exit at the first loop whose exit CDF reaches q")
    parser.add_argument("--exit-eps", type=float, default=0.0, help="--exit hidden_diff: exit when ||h_t - h_t-1|| < eps")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: bfloat16 on CUDA, the stored dtype on CPU)")
    args = parser.parse_args(argv)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            parser.error(f"--prompts-file {path}: no such file")
        args.prompt += [line for line in path.read_text().splitlines() if line.strip()]
    if not args.prompt:
        parser.error("give at least one --prompt or a --prompts-file")
    args.stop = [codecs.decode(s, "unicode_escape") for s in args.stop]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda") else None)
    model = load_model(args.model, args.device, dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_loops=args.num_loops, kv_sharing=args.kv_sharing, seed=args.seed,
        exit=ExitRule(args.exit, loops=args.exit_loop, threshold=args.exit_threshold, eps=args.exit_eps),
    )
    streaming = len(args.prompt) == 1
    if streaming:
        print(args.prompt[0], end="", flush=True)
    texts, result = generate_text(model, tokenizer, args.prompt, config, args.stop,
                                  stream=(lambda row, piece: print(piece, end="", flush=True)) if streaming else None)
    if streaming:
        print()
    else:
        for prompt, text in zip(args.prompt, texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"[{result.num_tokens} tokens in {result.seconds:.2f}s: {result.tokens_per_second:.1f} tokens/s; "
          f"{result.loops_per_token:.2f} loops per token of {config.num_loops or model.config.total_ut_steps}; "
          f"KV cache {result.cache_bytes / 2**20:.2f} MiB ({args.kv_sharing})]", file=sys.stderr)


if __name__ == "__main__":
    main()
