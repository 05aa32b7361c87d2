#!/usr/bin/env python
"""Decoding benchmark: the KV-cached generator with each cache-sharing mode and exit rule, against
recomputing the whole sequence for every new token, measured side by side in one process.

Every variant decodes the same batch of prompts greedily for the same number of new tokens (no
EOS); variants alternate over the repeats so that drift of a noisy machine hits all alike. Reported
per variant: new tokens/s (median over repeats), loops per token, KV cache size, and the ratio of
its tokens/s to the full cache without early exit.

    python tools/benchmark_generation.py                          # the small preset, random weights
    python tools/benchmark_generation.py --model runs/quickstart/model --q 0.9
    python tools/benchmark_generation.py --preset ouro_1_4b --device cuda --dtype bf16 --prompt-len 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.inference.exit_rules import ExitRule  # noqa: E402
from looplm_mega.inference.generate import GenerationConfig, generate  # noqa: E402
from looplm_mega.inference.loading import load_model  # noqa: E402
from looplm_mega.model import LoopLM, LoopLMConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variants(q: float, static_step: int) -> dict[str, GenerationConfig]:
    return {
        "full": GenerationConfig(),
        "last": GenerationConfig(kv_sharing="last"),
        "mean": GenerationConfig(kv_sharing="mean"),
        "first": GenerationConfig(kv_sharing="first"),
        f"q_exit {q}": GenerationConfig(exit=ExitRule("q_exit", threshold=q)),
        f"static {static_step}": GenerationConfig(exit=ExitRule("static", loops=static_step)),
    }


@torch.inference_mode()
def uncached(model: LoopLM, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds to decode by recomputing every sequence from its start for each new token."""
    ids, start = prompts, time.perf_counter()
    for _ in range(new_tokens):
        last = model(ids).hidden_states[-1][:, -1]
        ids = torch.cat([ids, model.lm_head(last).argmax(-1, keepdim=True)], dim=1)
    _sync(ids.device)
    return time.perf_counter() - start


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.model:
        model = load_model(args.model, device, dtype)
    else:
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig.from_preset(args.preset)).to(device=device, dtype=dtype).eval()
    steps = model.config.total_ut_steps
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt_len), generator=generator)
    configs = variants(args.q, args.static_step or max(1, steps // 2))
    times: dict[str, list[float]] = {name: [] for name in [*configs, "uncached"]}
    facts: dict[str, dict] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, config in configs.items():
            config.max_new_tokens = args.new_tokens
            result = generate(model, prompts.tolist(), config)
            _sync(device)
            if repeat:
                times[name].append(result.seconds)
            facts[name] = {"loops_per_token": result.loops_per_token, "cache_mib": result.cache_bytes / 2**20}
        seconds = uncached(model, prompts.to(device), args.new_tokens)
        if repeat:
            times["uncached"].append(seconds)
    facts["uncached"] = {"loops_per_token": float(steps), "cache_mib": 0.0}
    tokens = args.batch * args.new_tokens
    rows = {name: {**facts[name], "tokens_per_s": tokens / statistics.median(t)} for name, t in times.items()}
    for row in rows.values():
        row["vs_full"] = row["tokens_per_s"] / rows["full"]["tokens_per_s"]
    return {"model": args.model or args.preset, "loops": steps, "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "results": rows}


def format_table(summary: dict) -> str:
    lines = ["| variant | new tokens/s | vs full | loops per token | KV cache MiB |", "|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['vs_full']:.2f} | {r['loops_per_token']:.2f} | {r['cache_mib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory (default: --preset with random weights)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--q", type=float, default=0.5, help="Q-exit threshold of the q_exit variant")
    parser.add_argument("--static-step", type=int, default=0, help="loops of the static variant (default: T / 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--output", default=None, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    if min(args.batch, args.prompt_len, args.new_tokens, args.repeats) < 1:
        parser.error("--batch, --prompt-len, --new-tokens and --repeats must be at least 1")
    summary = run(args)
    print(f"{summary['model']} ({summary['loops']} loops) on {summary['device']} {summary['dtype']}: batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(format_table(summary))
    if args.output:
        tmp = Path(args.output).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(args.output)


if __name__ == "__main__":
    main()
