#!/usr/bin/env python
"""Decoding benchmark: the KV-cached generator with each cache-sharing mode and exit rule, against
recomputing the whole sequence for every new token, measured side by side in one process.

Every variant decodes the same batch of prompts greedily for the same number of new tokens (no
EOS); variants alternate over the repeats so that drift of a noisy machine hits all alike. Reported
per variant: new tokens/s (median over repeats), loops per token, KV cache size, and the ratio of
its tokens/s to the full cache without early exit. With --data the prompts are windows of held-out
text (the documents of the validation split), and two measures of quality come beside the speed:
the share of greedy tokens equal to the full cache's at the same position, and the cross-entropy
of the text's own continuation fed token by token through the variant's cache (the uncached row:
one plain forward pass, which the full cache must equal).

    python tools/benchmark_generation.py                          # the small preset, random weights
    python tools/benchmark_generation.py --model runs/quickstart/model --q 0.9
    python tools/benchmark_generation.py --model runs/quickstart/model --data runs/quickstart/data/stdlib_text_document
    python tools/benchmark_generation.py --preset ouro_1_4b --device cuda --dtype bf16 --prompt-len 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.data.config import DataConfig  # noqa: E402
from looplm_mega.data.gpt_dataset import split_document_ranges  # noqa: E402
from looplm_mega.data.indexed import IndexedDataset  # noqa: E402
from looplm_mega.inference.exit_rules import ExitRule  # noqa: E402
from looplm_mega.inference.generate import GenerationConfig, _run_chunk, generate  # noqa: E402
from looplm_mega.inference.kv_cache import LoopKVCache  # noqa: E402
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
def uncached(model: LoopLM, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds to decode by recomputing every sequence from its start for each new token, and the tokens."""
    ids, start = prompts, time.perf_counter()
    for _ in range(new_tokens):
        last = model(ids).hidden_states[-1][:, -1]
        ids = torch.cat([ids, model.lm_head(last).argmax(-1, keepdim=True)], dim=1)
    _sync(ids.device)
    return time.perf_counter() - start, ids[:, prompts.shape[1]:].tolist()


def text_windows(prefix: str, split: str, count: int, length: int) -> torch.Tensor:
    """[count, length] consecutive non-overlapping windows of the validation split's documents."""
    dataset = IndexedDataset(prefix)
    first, last = split_document_ranges(dataset.num_documents, DataConfig(prefixes=[prefix], split=split).split_ratios)[1]
    windows: list[np.ndarray] = []
    for i in range(int(dataset.document_indices[first]), int(dataset.document_indices[last])):
        tokens = np.asarray(dataset[i], dtype=np.int64)
        windows.extend(tokens[: len(tokens) // length * length].reshape(-1, length))
        if len(windows) >= count:
            break
    if len(windows) < count:
        raise SystemExit(f"error: {prefix}: the validation split ({split}) holds {len(windows)} windows of "
                         f"{length} tokens, {count} asked")
    return torch.from_numpy(np.stack(windows[:count]))


@torch.inference_mode()
def continuation_ce(model: LoopLM, windows: torch.Tensor, prompt_len: int, config: GenerationConfig) -> float:
    """Mean cross-entropy of each window's tokens after the prompt, fed one at a time through a
    cache of `config`'s sharing and exit rule (teacher forcing: the text, not the model's choice)."""
    batch, length = windows.shape
    device = next(model.parameters()).device
    windows = windows.to(device)
    cache = LoopKVCache(model.config, config.num_loops or model.config.total_ut_steps, batch, length,
                        config.kv_sharing, dtype=next(model.parameters()).dtype, device=device)
    rows, one = torch.arange(batch, device=device), torch.ones(batch, 1, dtype=torch.bool, device=device)
    positions = torch.arange(prompt_len, device=device).expand(batch, -1)
    logits, _ = _run_chunk(model, cache, windows[:, :prompt_len], positions, one.expand(-1, prompt_len), rows,
                           config.exit, skip=False)
    losses = []
    for i in range(prompt_len, length):
        losses.append(F.cross_entropy(logits.float(), windows[:, i], reduction="none"))
        if i + 1 < length:
            logits, _ = _run_chunk(model, cache, windows[:, i:i + 1], torch.full((batch, 1), i, device=device), one,
                                   rows, config.exit, skip=True)
    return torch.stack(losses).mean().item()


@torch.inference_mode()
def forward_ce(model: LoopLM, windows: torch.Tensor, prompt_len: int) -> float:
    """The same cross-entropy from one forward pass over the whole windows (no cache)."""
    windows = windows.to(next(model.parameters()).device)
    logits = model.lm_head(model(windows).hidden_states[-1][:, prompt_len - 1:-1])
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, prompt_len:].flatten()).item()


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
    if args.data:
        windows = text_windows(args.data, args.split, args.batch, args.prompt_len + args.new_tokens)
        prompts = windows[:, :args.prompt_len]
    else:
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt_len), generator=generator)
    configs = variants(args.q, args.static_step or max(1, steps // 2))
    times: dict[str, list[float]] = {name: [] for name in [*configs, "uncached"]}
    facts: dict[str, dict] = {}
    tokens: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, config in configs.items():
            config.max_new_tokens = args.new_tokens
            result = generate(model, prompts.tolist(), config)
            _sync(device)
            if repeat:
                times[name].append(result.seconds)
            facts[name] = {"loops_per_token": result.loops_per_token, "cache_mib": result.cache_bytes / 2**20}
            tokens[name] = result.tokens
        seconds, tokens["uncached"] = uncached(model, prompts.to(device), args.new_tokens)
        if repeat:
            times["uncached"].append(seconds)
    facts["uncached"] = {"loops_per_token": float(steps), "cache_mib": 0.0}
    if args.data:
        reference = np.array(tokens["full"])
        for name in facts:
            facts[name]["agreement"] = float((np.array(tokens[name]) == reference).mean())
            facts[name]["text_ce"] = (forward_ce(model, windows, args.prompt_len) if name == "uncached" else
                                      continuation_ce(model, windows, args.prompt_len, configs[name]))
    tokens = args.batch * args.new_tokens
    rows = {name: {**facts[name], "tokens_per_s": tokens / statistics.median(t)} for name, t in times.items()}
    for row in rows.values():
        row["vs_full"] = row["tokens_per_s"] / rows["full"]["tokens_per_s"]
    return {"model": args.model or args.preset, "loops": steps, "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "data": args.data,
            "results": rows}


def format_table(summary: dict) -> str:
    quality = summary.get("data") is not None
    extra = " greedy tokens as full | CE of the text |" if quality else ""
    lines = ["| variant | new tokens/s | vs full | loops per token | KV cache MiB |" + extra,
             "|---|---|---|---|---|" + ("---|---|" if quality else "")]
    for name, r in summary["results"].items():
        row = f"| {name} | {r['tokens_per_s']:.1f} | {r['vs_full']:.2f} | {r['loops_per_token']:.2f} | {r['cache_mib']:.2f} |"
        if quality:
            row += f" {100 * r['agreement']:.1f}% | {r['text_ce']:.4f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: --preset with random weights)")
    parser.add_argument("--preset", default="small", help="model preset (configs/model/) used without --model")
    parser.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per (random) prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt")
    parser.add_argument("--q", type=float, default=0.5, help="Q-exit threshold of the q_exit variant")
    parser.add_argument("--static-step", type=int, default=0, help="loops of the static variant (default: T / 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per variant, after one warm-up round; the median is reported")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and activations dtype")
    parser.add_argument("--data", default=None,
                        help="a dataset prefix (.bin/.idx): prompts from its held-out text, and the quality columns")
    parser.add_argument("--split", default="95,5", help="--data's train/valid split (the quickstart's by default)")
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
