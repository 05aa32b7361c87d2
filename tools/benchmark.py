#!/usr/bin/env python
"""Training-step benchmark of the LoopLM: the fused per-step cross-entropy against the naive
reference (all T x tokens x vocab logits materialised), measured side by side in one run.

For each precision and path, a fresh subprocess builds the model and AdamW, runs warm-up steps
and timed steps (forward, backward, optimizer), and reports tokens/s, achieved FLOP/s (model
FLOPs from looplm_mega.model.flops), that as a fraction of the matmul peak measured in the same
run, and peak memory (CUDA allocator peak, or on CPU the process's peak RSS above what the model
held before the first step). Paths alternate over the repeats so that drift of a noisy machine
hits both alike. Ratios in the summary are fused / naive.

    python tools/benchmark.py                                   # configs/benchmark/cpu.yaml
    python tools/benchmark.py --config configs/benchmark/gpu_1_4b.yaml [--compile true --paths [fused]]
    python tools/benchmark.py --seq_len 256 --model.num_hidden_layers 2 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict  # noqa: E402
from looplm_mega.model import LoopLM, LoopLMConfig, training_flops_per_token  # noqa: E402
from looplm_mega.model.flops import device_peak_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchmarkConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)  # overrides of the preset's fields
    seq_len: int = 512
    batch_size: int = 4
    dtypes: list[Literal["fp32", "bf16"]] = field(default_factory=lambda: ["fp32", "bf16"])
    paths: list[Literal["fused", "naive"]] = field(default_factory=lambda: ["fused", "naive"])
    warmup: int = 1
    steps: int = 3
    repeats: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.compile the loop step (LoopLM.loop_step, which every loop runs through); compilation
    # falls in the warm-up steps, so give at least one.
    compile: bool = False
    output: Optional[str] = None  # write the results as JSON here too

    def __post_init__(self):
        if self.compile and self.warmup < 1:
            raise ConfigError("compile: needs warmup >= 1, or the compilation is timed as a step")

    def model_config(self, path: str) -> LoopLMConfig:
        try:
            config = LoopLMConfig.from_preset(self.preset).replace(**self.model)
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None
        return config.replace(fused_cross_entropy=path == "fused")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def measure_matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul: the attainable peak of this machine for this dtype."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_worker(bench: BenchmarkConfig, path: str, dtype_name: str) -> dict:
    """One path at one precision, in this (fresh) process."""
    device = bench.resolved_device()
    config = bench.model_config(path)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (on the CPU the 1.4B model takes tens of seconds)
        model = LoopLM(config).to(device)
    if bench.compile:
        model.loop_step = torch.compile(model.loop_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (bench.batch_size, bench.seq_len + 1), generator=generator).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bf16")

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = model(inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    else:
        base_memory = _rss_bytes()
    warmup_times = [step() for _ in range(bench.warmup)]  # with --compile, the first holds the compilation
    times = [step() for _ in range(bench.steps)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_memory
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_memory
    step_time = statistics.median(times)
    tokens = bench.batch_size * bench.seq_len
    flops = training_flops_per_token(config, bench.seq_len) * tokens / step_time
    return {"path": path, "dtype": dtype_name, "compiled": bench.compile, "step_s": step_time,
            "warmup_step_s": warmup_times, "tokens_per_s": tokens / step_time, "flops_per_s": flops,
            "peak_memory_bytes": peak, "device": device}


def _spawn(bench: BenchmarkConfig, path: str, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps({"bench": to_dict(bench), "path": path, "dtype": dtype_name})]
    # A fixed mmap threshold makes glibc return every freed block of 1 MiB or more to the OS, so
    # peak RSS follows the live tensors instead of the allocator's fragmentation (equal for both paths).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {path}/{dtype_name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(bench: BenchmarkConfig) -> dict:
    device = bench.resolved_device()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    config = bench.model_config("fused")
    flops_per_step = training_flops_per_token(config, bench.seq_len) * bench.batch_size * bench.seq_len
    print(f"device {device_name}; model {config.num_hidden_layers} layers x {config.total_ut_steps} loops, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}; batch {bench.batch_size} x seq {bench.seq_len}; "
          f"{flops_per_step / 1e12:.2f} TFLOP per step", flush=True)
    results = []
    for dtype_name in bench.dtypes:
        peak = measure_matmul_peak(DTYPES[dtype_name], device)
        datasheet = device_peak_flops(device_name, dtype_name) if device == "cuda" else None
        runs = {p: [] for p in bench.paths}
        for repeat in range(bench.repeats):
            for path in bench.paths:
                run = _spawn(bench, path, dtype_name)
                runs[path].append(run)
                print(f"  {dtype_name} {path:5s} repeat {repeat + 1}/{bench.repeats}: {run['tokens_per_s']:.0f} tokens/s, "
                      f"{run['flops_per_s'] / 1e9:.1f} GFLOP/s, peak memory {run['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
        for path, path_runs in runs.items():
            best = max(path_runs, key=lambda r: r["tokens_per_s"])
            best.update(matmul_peak_flops=peak, fraction_of_matmul_peak=best["flops_per_s"] / peak,
                        peak_memory_bytes=max(r["peak_memory_bytes"] for r in path_runs))
            if datasheet:
                best["mfu"] = best["flops_per_s"] / datasheet
            results.append(best)
    summary = {"device": device_name, "config": to_dict(bench), "results": results, "ratios": {}}
    for dtype_name in bench.dtypes:
        by_path = {r["path"]: r for r in results if r["dtype"] == dtype_name}
        if {"fused", "naive"} <= set(by_path):
            fused, naive = by_path["fused"], by_path["naive"]
            summary["ratios"][dtype_name] = {
                "tokens_per_s": fused["tokens_per_s"] / naive["tokens_per_s"],
                "peak_memory": fused["peak_memory_bytes"] / naive["peak_memory_bytes"],
            }
    print(format_table(summary))
    if bench.output:
        tmp = Path(bench.output + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(bench.output)
    return summary


def format_table(summary: dict) -> str:
    lines = ["| precision | path | tokens/s | GFLOP/s | of matmul peak | MFU | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        path = f"{r['path']} (compiled)" if r["compiled"] else r["path"]
        lines.append(f"| {r['dtype']} | {path} | {r['tokens_per_s']:.0f} | {r['flops_per_s'] / 1e9:.1f} | "
                     f"{r['fraction_of_matmul_peak']:.1%} (of {r['matmul_peak_flops'] / 1e9:.0f}) | {mfu} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    for dtype_name, ratio in summary["ratios"].items():
        lines.append(f"\n{dtype_name}: fused / naive tokens/s = {ratio['tokens_per_s']:.2f}x, "
                     f"peak memory = {ratio['peak_memory']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/benchmark/cpu.yaml"),
                        help="benchmark settings YAML (configs/benchmark/); --section.field VALUE flags override it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_worker(from_dict(BenchmarkConfig, job["bench"]), job["path"], job["dtype"])))
        return
    try:
        bench = apply_overrides(load_yaml(BenchmarkConfig, args.config), overrides)
        bench.model_config("fused")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run_benchmark(bench)


if __name__ == "__main__":
    main()
