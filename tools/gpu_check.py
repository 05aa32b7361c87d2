#!/usr/bin/env python
"""The GPU paths checked in one prepared run on one GPU, within a time limit (8 minutes by default).

Each part runs in its own process under its own limit, so a part that fails or runs out of time
still leaves the others' results; the report (gpu_check.json, gpu_check.md) is rewritten after
every part, beside each part's log.

  attention  flash-attn (when installed) and SDPA in bf16, causal and with document masking, at
             sequence 4096 with the 1.4B model's heads: output and gradient errors against a
             float32 reference, each no more than twice the error of the plain formula computed in
             bf16; forward and forward+backward times
  benchmark  tools/benchmark.py on ouro_1_4b (configs/benchmark/gpu_1_4b.yaml: sequence 4096,
             bf16, layer checkpointing): tokens/s, TFLOP/s, MFU against the data-sheet dense bf16
             peak (model/flops.py), peak memory; the fused and the naive cross-entropy
  pretrain   the `small` preset under the deepspeed launcher on 1 GPU (NCCL, bf16, DeepSpeed's
             fused Adam): 30 steps under ZeRO-2 with a checkpoint at step 15, a resume from it
             (steps 16-30 again, compared), 30 steps under ZeRO-3, consolidation, and greedy
             generation with the KV cache (equal to recomputing every sequence, in fp32)
  compile    the benchmark's fused path with torch.compile of LoopLM.loop_step, against the eager
             row of `benchmark`; given whatever time the other parts left

    python tools/gpu_check.py                     # a CUDA machine; the report goes to $OUT or runs/gpu_check
    python tools/gpu_check.py --dry-run           # every part at a tiny size (on the CPU here)
    python tools/gpu_check.py --parts attention pretrain --out report/
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from looplm_mega.cli import HelpFormatter, raise_on_sigterm  # noqa: E402
from looplm_mega.config import from_dict, save_yaml  # noqa: E402
from looplm_mega.data.indexed import IndexedDatasetWriter  # noqa: E402
from looplm_mega.inference.generate import GenerationConfig, generate  # noqa: E402
from looplm_mega.inference.loading import load_model  # noqa: E402
from looplm_mega.model import LoopLMConfig  # noqa: E402
from looplm_mega.model.attention import AttentionMask, attention, flash_attn_module, segment_ids_from_eod  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_dir, exit_with, mark_output_dir  # noqa: E402
from looplm_mega.training.config import RunConfig  # noqa: E402
from looplm_mega.training.consolidate import consolidate  # noqa: E402
from looplm_mega.training.distributed import free_port  # noqa: E402

KIND = "GPU check report"
# Seconds each part may run on the GPU (8 minutes in all); never past the whole check's limit, which
# alone bounds a dry run (a slow CPU shared with other jobs must not fail it).
LIMITS = {"attention": 60, "benchmark": 150, "pretrain": 200, "compile": 300}
REPORT = ("gpu_check.json", "gpu_check.md")
FILES = REPORT + tuple(f"{part}.log" for part in LIMITS)


# ---------------------------------------------------------------------------------------------
# Sizes: the check on a GPU, and its dry run.

def sizes(dry_run: bool) -> dict:
    if dry_run:
        return {
            "attention": {"preset": "tiny", "batch": 2, "seq": 128, "repeats": 2},
            # fp32: a CPU without a bf16 matrix unit takes minutes for the benchmark's bf16 matmul peak.
            "benchmark": ["--preset", "tiny", "--model.vocab_size", "512", "--model.num_hidden_layers", "1",
                          "--seq_len", "64", "--batch_size", "2", "--warmup", "1", "--steps", "1", "--dtypes", "[fp32]"],
            "pretrain": {"model": {"preset": "tiny", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4},
                         "seq": 32, "batch": 4, "steps": 6, "lr": 1e-2, "documents": 300, "prompt": 8, "new_tokens": 8},
        }
    return {
        "attention": {"preset": "ouro_1_4b", "batch": 2, "seq": 4096, "repeats": 20},
        "benchmark": [],  # configs/benchmark/gpu_1_4b.yaml as it is
        "pretrain": {"model": {"preset": "small"}, "seq": 1024, "batch": 8, "steps": 30, "lr": 1e-3, "documents": 4000,
                     "prompt": 16, "new_tokens": 32},
    }


class Record(dict):
    """A part's result, saved after every change: a part stopped at its limit still reports what it did."""
    def __init__(self, path: Path):
        super().__init__(checks={})
        self.path = path

    def save(self) -> None:
        _write_text(self.path, json.dumps(self, indent=1))

    def check(self, name: str, passed: bool) -> None:
        self["checks"][name] = bool(passed)
        self.save()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Part: attention.

def _plain_attention(q, k, v, allowed, dtype):
    """softmax(q k^T / sqrt(d), masked) v computed in `dtype` (the softmax in fp32); [B, S, H, D]."""
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), dim=-1).to(dtype)
    return (weights @ v).transpose(1, 2)


def _output_and_grads(fn, inputs, grad_out) -> list:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _milliseconds(fn, device: str, repeats: int) -> float:
    fn(), fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def attention_part(record: Record, size: dict, device: str) -> None:
    config = LoopLMConfig.from_preset(size["preset"])
    b, s = size["batch"], size["seq"]
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    backends = ["sdpa"] + (["flash"] if flash_attn_module() is not None and device == "cuda" else [])
    record.update(shape={"batch": b, "seq": s, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim},
                  flash_attn=_version("flash-attn"), rows=[])
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    q, k, v = randn(b, s, heads, head_dim), randn(b, s, kv_heads, head_dim), randn(b, s, kv_heads, head_dim)
    grad_out = randn(b, s, heads, head_dim)
    # About 8 documents a row, at random boundaries (end-of-document tokens, id 0).
    ids = (torch.rand(b, s, generator=generator) > 8 / s).long().to(device)
    for masking, segments in (("causal", None), ("documents", segment_ids_from_eod(ids, 0))):
        allowed = torch.ones(s, s, dtype=torch.bool, device=device).tril().expand(b, 1, s, s)
        if segments is not None:
            allowed = allowed & (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)
        reference = _output_and_grads(lambda *t: _plain_attention(*t, allowed, torch.float32),
                                      [t.float() for t in (q, k, v)], grad_out)  # fp32 leaves: fp32 gradients
        plain = _output_and_grads(lambda *t: _plain_attention(*t, allowed, torch.bfloat16), [q, k, v], grad_out)
        plain_error = [(p - r).abs().max().item() for p, r in zip(plain, reference)]
        del plain
        for backend in backends:
            mask = AttentionMask(segments)  # built once per model forward, reused by every layer and loop
            got = _output_and_grads(lambda *t: attention(*t, mask, backend=backend), [q, k, v], grad_out)
            error = [(g - r).abs().max().item() for g, r in zip(got, reference)]
            del got
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            with torch.no_grad():
                forward = _milliseconds(lambda: attention(q, k, v, mask, backend=backend), device, size["repeats"])
            both = _milliseconds(lambda: attention(*leaves, mask, backend=backend).backward(grad_out), device,
                                 size["repeats"])
            names = ("out", "dq", "dk", "dv")
            record["rows"].append({"backend": backend, "masking": masking, "forward_ms": forward,
                                   "forward_backward_ms": both, "max_abs_error": dict(zip(names, error)),
                                   "plain_bf16_max_abs_error": dict(zip(names, plain_error))})
            record.check(f"{backend} {masking}: errors <= 2x the plain bf16 formula's",
                         all(e <= 2 * p for e, p in zip(error, plain_error)))
        del reference


# ---------------------------------------------------------------------------------------------
# Parts: benchmark and compile (tools/benchmark.py, one process per measurement).

def _benchmark(record: Record, overrides: list, output: Path, device: str, *extra: str) -> dict:
    command = [sys.executable, "tools/benchmark.py", "--config", "configs/benchmark/gpu_1_4b.yaml", *overrides,
               "--device", device, *extra]
    record["command"] = " ".join(command[1:])
    record.save()
    subprocess.run(command + ["--output", str(output)], check=True, cwd=ROOT)
    summary = json.loads(output.read_text())
    record.update(summary=summary)
    for row in summary["results"]:
        name = f"{row['path']}{' compiled' if row['compiled'] else ''}"
        record.check(f"{name}: trained (tokens/s > 0)", row["tokens_per_s"] > 0 and math.isfinite(row["flops_per_s"]))
        if device == "cuda":
            record.check(f"{name}: MFU against the device's data-sheet peak", "mfu" in row)
    return summary


def benchmark_part(record: Record, overrides: list, device: str, work: Path) -> None:
    _benchmark(record, overrides, work / "benchmark_summary.json", device)


def compile_part(record: Record, overrides: list, device: str, work: Path) -> None:
    summary = _benchmark(record, overrides, work / "compile_summary.json", device, "--compile", "true", "--paths", "[fused]")
    compiled = summary["results"][0]
    record["compilation_s"] = compiled["warmup_step_s"][0]  # the first warm-up step compiles
    eager = work / "benchmark_summary.json"
    if eager.exists():  # the benchmark part's eager fused row, from the same check
        row = next(r for r in json.loads(eager.read_text())["results"] if r["path"] == "fused")
        ratio = compiled["tokens_per_s"] / row["tokens_per_s"]
        verdict = "helps" if ratio >= 1.03 else "slower" if ratio <= 0.97 else "no clear difference (within 3%)"
        record.update(speedup_vs_eager=ratio, verdict=verdict)
    record.save()


# ---------------------------------------------------------------------------------------------
# Part: pretrain (the deepspeed launcher, a checkpoint, a resume, generation).

def _write_dataset(prefix: Path, vocab_size: int, documents: int) -> None:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(documents):
            # A skewed unigram distribution (most ids below a few hundred): the loss has room to fall.
            writer.add_document(np.minimum(rng.geometric(0.01, rng.integers(20, 1200)), vocab_size - 1))


def _max_relative_difference(a: dict, b: dict) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def _build_fused_adam(record: Record) -> bool:
    """DeepSpeed's fused Adam (its GPU optimizer), compiled at first use, for this device only; the
    runs then load it from torch's extension cache."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability()))
    start = time.perf_counter()
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load()
        built = True
    except Exception as e:  # a failed build is a finding to report, not the end of the part
        print(f"DeepSpeed's fused Adam did not build: {type(e).__name__}: {e}", flush=True)
        built = False
    record["fused_adam_build_s"] = time.perf_counter() - start
    record.check("DeepSpeed's fused Adam builds and loads", built)
    return built


def _launch(record: Record, name: str, config, work: Path) -> dict:
    """Train `config` under `deepspeed --num_gpus 1` (the launcher's module: a wheel installed with
    --target has no `deepspeed` script on PATH); returns the training losses by step."""
    path = work / f"{name}.yaml"
    save_yaml(config, path)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
                    "--module", "looplm_mega.pretrain", "--config", str(path)], check=True, cwd=ROOT)
    records = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    steady = train[len(train) // 4:] or train  # past the first steps (start-up, compilation)
    record["runs"][name] = {
        "seconds": time.perf_counter() - start, "steps": [train[0]["step"], train[-1]["step"]],
        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
        "valid_loss": next((r["loss"] for r in records if r["split"] == "valid"), None),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in steady),
        "memory_gb": max(r["memory_gb"] for r in train),
    }
    record.save()
    return {r["step"]: r["loss"] for r in train}


def _uncached_greedy(model, prompts: list, new_tokens: int) -> list:
    """Greedy decoding that recomputes every sequence from its start for each new token."""
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    with torch.inference_mode():
        for _ in range(new_tokens):
            last = model(ids).hidden_states[-1][:, -1]
            ids = torch.cat([ids, model.lm_head(last).argmax(-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]):].tolist()


def pretrain_part(record: Record, size: dict, device: str, work: Path) -> None:
    steps, checkpoint_step = size["steps"], size["steps"] // 2
    base = {"model": size["model"], "wandb": {"mode": "disabled"},
            "data": {"prefixes": [str(work / "data" / "random_text_document")], "seq_length": size["seq"], "split": "95,5"},
            "training": {"micro_batch_size": size["batch"], "global_batch_size": size["batch"], "train_steps": steps,
                         "precision": "bf16", "log_interval": 1, "eval_iters": 2, "save_interval": checkpoint_step},
            "optimizer": {"lr": size["lr"], "min_lr": size["lr"] / 10}, "schedule": {"kind": "cosine", "warmup_steps": 2}}

    if device == "cuda" and not _build_fused_adam(record):
        # The rest still gets checked, with torch's AdamW in DeepSpeed's place.
        base["deepspeed"] = {"extra": {"optimizer": {"params": {"torch_adam": True}}}}

    def config(name: str, zero: int) -> RunConfig:
        section = {**base.get("deepspeed", {}), "config_file": str(ROOT / f"configs/deepspeed/zero{zero}.json")}
        return from_dict(RunConfig, {**base, "run_dir": str(work / name), "deepspeed": section})

    zero2 = config("zero2", 2)
    (work / "data").mkdir()
    _write_dataset(work / "data" / "random_text_document", zero2.model_config().vocab_size, size["documents"])
    record.update(steps=steps, checkpoint_step=checkpoint_step, runs={})

    # ZeRO-2, with a checkpoint halfway.
    losses = _launch(record, "zero2", zero2, work)
    record.check(f"ZeRO-2: steps 1-{steps} logged, finite", sorted(losses) == list(range(1, steps + 1))
                 and all(map(math.isfinite, losses.values())))
    record.check("ZeRO-2: the loss fell", losses[steps] < losses[1])

    # The resume: the halfway checkpoint alone in a new run directory, trained to the end again.
    tag = f"step{checkpoint_step:08d}"
    checkpoints = work / "resume" / "checkpoints"
    shutil.copytree(work / "zero2" / "checkpoints" / tag, checkpoints / tag)
    (checkpoints / "latest").write_text(tag)
    resumed = _launch(record, "resume", config("resume", 2), work)
    record.check(f"resume: steps {checkpoint_step + 1}-{steps} logged",
                 sorted(resumed) == list(range(checkpoint_step + 1, steps + 1)))
    record["resume_max_relative_difference"] = _max_relative_difference(resumed, losses)
    record.check("resume: losses within 1% of the uninterrupted run", record["resume_max_relative_difference"] <= 0.01)

    # ZeRO-3 from scratch: the same losses as ZeRO-2, up to reduction order in bf16.
    zero3 = _launch(record, "zero3", config("zero3", 3), work)
    record.check(f"ZeRO-3: steps 1-{steps} logged", sorted(zero3) == list(range(1, steps + 1)))
    record["zero3_max_relative_difference"] = _max_relative_difference(zero3, losses)
    record.check("ZeRO-3: losses within 5% of ZeRO-2", record["zero3_max_relative_difference"] <= 0.05)

    # Consolidation of the ZeRO-3 checkpoint, then generation with the KV cache on the device.
    model_dir = consolidate(work / "zero3" / "checkpoints", work / "model")
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 300, (4, size["prompt"]), generator=generator).tolist()
    greedy = GenerationConfig(max_new_tokens=size["new_tokens"])
    model = load_model(model_dir, device, torch.float32)
    cached = generate(model, prompts, greedy).tokens
    record.check("generation: KV-cached greedy tokens equal recomputing every sequence (fp32)",
                 cached == _uncached_greedy(model, prompts, size["new_tokens"]))
    model = load_model(model_dir, device, torch.bfloat16)
    generate(model, prompts, greedy)  # warm-up
    result = generate(model, prompts, greedy)
    record["generation"] = {"dtype": "bf16", "batch": len(prompts), "prompt": size["prompt"], "new_tokens": size["new_tokens"],
                            "tokens_per_s": result.tokens_per_second, "loops_per_token": result.loops_per_token,
                            "kv_cache_mib": result.cache_bytes / 2**20}
    record.check("generation: bf16 produced every token", result.num_tokens == len(prompts) * size["new_tokens"])


# ---------------------------------------------------------------------------------------------
# The check: parts as processes, the report.

def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "deepspeed": _version("deepspeed"), "flash-attn": _version("flash-attn"), "triton": _version("triton")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   nccl=".".join(map(str, torch.cuda.nccl.version())), cuda_home=cpp_extension.CUDA_HOME)
    else:
        env["device"] = "cpu"
    return env


def run_part(name: str, work: Path, limit: float, log: Path, dry_run: bool) -> dict:
    command = [sys.executable, __file__, "--part", name, "--work", str(work)] + (["--dry-run"] if dry_run else [])
    start = time.monotonic()
    with open(log, "w") as out:
        # A session of its own: on a timeout the whole tree (the deepspeed launcher's ranks too) is killed.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        code = None
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:  # what is left of the part's session: all of it after a timeout, strays after an exit
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    record_file = work / f"{name}.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {"checks": {}}
    checks = record.pop("checks")
    if code is None:
        status = "timed out"
    elif code != 0:
        status = "error"
    else:
        status = "passed" if all(checks.values()) else "failed"
    part = {"status": status, "seconds": round(time.monotonic() - start, 1), "limit_s": round(limit),
            "log": log.name, "checks": checks, "result": record}
    if status in ("error", "timed out"):
        part["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    return part


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default=None, help="report folder (default: $OUT when set, else runs/gpu_check)")
    parser.add_argument("--parts", nargs="+", choices=list(LIMITS), default=list(LIMITS),
                        help="which parts to run (always in the order of the default)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every part at a tiny size (on the CPU where there is no GPU)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole check (default: 480, or 900 with --dry-run)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report this tool wrote earlier")
    parser.add_argument("--part", choices=list(LIMITS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return part_main(args.part, Path(args.work), args.dry_run)

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here; --dry-run runs every part at a tiny size on the CPU")
    out = Path(args.out or os.environ.get("OUT") or "runs/gpu_check")
    try:
        check_output_dir(out, KIND, overwrite=args.overwrite)
    except OutputError as e:
        exit_with("gpu_check.py", e)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # with --overwrite: the earlier report, all of it ours (check_output_dir made sure)
        (out / name).unlink(missing_ok=True)
    # Written in place, file by file, each complete under its name: the machine's time limit may
    # stop this process, and the parts done by then must be in the folder.
    mark_output_dir(out, KIND, FILES)
    time_limit = args.time_limit or (900 if args.dry_run else 480)
    deadline = time.monotonic() + time_limit
    report = {"kind": KIND, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "time_limit_s": time_limit, "environment": environment(), "parts": {}}
    _save(out, report)
    raise_on_sigterm()  # unwinds through run_part, which then kills the running part's process tree
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as work:
        for name in sorted(args.parts, key=list(LIMITS).index):
            left = deadline - time.monotonic()
            limit = left if args.dry_run else min(LIMITS[name], left)
            if limit < 10:
                report["parts"][name] = {"status": "not run", "reason": "the check's time limit was reached"}
            else:
                print(f"{name}: up to {limit:.0f} s", flush=True)
                report["parts"][name] = run_part(name, Path(work), limit, out / f"{name}.log", args.dry_run)
                print(f"{name}: {report['parts'][name]['status']} in {report['parts'][name]['seconds']} s", flush=True)
            _save(out, report)
    print(markdown(report))
    sys.exit(0 if report["passed"] else 1)


def _save(out: Path, report: dict) -> None:
    report["passed"] = bool(report["parts"]) and all(p["status"] == "passed" for p in report["parts"].values())
    _write_text(out / "gpu_check.json", json.dumps(report, indent=1))
    _write_text(out / "gpu_check.md", markdown(report))


def part_main(name: str, work: Path, dry_run: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = sizes(dry_run)
    record = Record(work / f"{name}.json")
    record.update(device=device)
    record.save()
    if name == "attention":
        attention_part(record, size["attention"], device)
    elif name == "benchmark":
        benchmark_part(record, size["benchmark"], device, work)
    elif name == "compile":
        compile_part(record, size["benchmark"], device, work)
    else:
        pretrain_part(record, size["pretrain"], device, work)


# ---------------------------------------------------------------------------------------------
# Markdown.

def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {report['started']}{' (dry run)' if report['dry_run'] else ''}", "",
             "| " + " | ".join(env) + " |", "|" + "---|" * len(env), "| " + " | ".join(map(str, env.values())) + " |", "",
             "| part | status | seconds | limit (s) |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '-')} | {part.get('limit_s', '-')} |")
    for name, part in report["parts"].items():
        lines += ["", f"## {name}: {part['status']}", ""]
        if "reason" in part:
            lines.append(part["reason"])
            continue
        result = part["result"]
        lines += [f"- {'pass' if ok else 'FAIL'}: {check}" for check, ok in part["checks"].items()]
        lines += SECTIONS[name](result) if result.get("device") else []
        if "log_tail" in part:
            lines += ["", f"Last lines of {part['log']}:", "", "```", *part["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def _attention_section(result: dict) -> list:
    if "shape" not in result:
        return []
    shape = result["shape"]
    lines = ["", f"bf16, batch {shape['batch']} x sequence {shape['seq']}, {shape['heads']} heads ({shape['kv_heads']} "
             f"KV) x {shape['head_dim']}; flash-attn: {result['flash_attn']}. Max abs error against fp32 "
             "(out / dq / dk / dv), the plain formula in bf16 beside it.", "",
             "| backend | masking | forward ms | forward+backward ms | error | plain bf16 error |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        error = " / ".join(f"{e:.2e}" for e in r["max_abs_error"].values())
        plain = " / ".join(f"{e:.2e}" for e in r["plain_bf16_max_abs_error"].values())
        lines.append(f"| {r['backend']} | {r['masking']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | "
                     f"{error} | {plain} |")
    return lines


def _benchmark_section(result: dict) -> list:
    if "summary" not in result:
        return []
    summary = result["summary"]
    config = summary["config"]
    lines = ["", f"`{result['command']}`", "",
             f"{summary['device']}; preset {config['preset']}, batch {config['batch_size']} x sequence {config['seq_len']}; "
             "MFU against the device's data-sheet dense peak (model/flops.py), in TFLOP/s.", "",
             "| precision | path | tokens/s | TFLOP/s | MFU | of measured matmul peak | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        mfu = f"{r['mfu']:.1%} of {r['flops_per_s'] / r['mfu'] / 1e12:.0f}" if "mfu" in r else "-"
        path = f"{r['path']} (compiled)" if r["compiled"] else r["path"]
        lines.append(f"| {r['dtype']} | {path} | {r['tokens_per_s']:.0f} | {r['flops_per_s'] / 1e12:.3g} | {mfu} | "
                     f"{r['fraction_of_matmul_peak']:.1%} of {r['matmul_peak_flops'] / 1e12:.3g} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} |")
    if "compilation_s" in result:
        lines.append(f"\nFirst warm-up step (compilation included): {result['compilation_s']:.1f} s.")
    if "verdict" in result:
        lines.append(f"torch.compile of the loop step: {result['speedup_vs_eager']:.2f}x the eager tokens/s: "
                     f"{result['verdict']}.")
    return lines


def _pretrain_section(result: dict) -> list:
    lines = ["", "| run | steps | first loss | last loss | valid loss | tokens/s | TFLOP/s | memory GB | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result.get("runs", {}).items():
        valid = f"{r['valid_loss']:.3f}" if r["valid_loss"] is not None else "-"
        lines.append(f"| {name} | {r['steps'][0]}-{r['steps'][1]} | {r['first_loss']:.3f} | {r['last_loss']:.3f} | {valid} | "
                     f"{r['tokens_per_s']:.0f} | {r['tflops_per_device']:.3g} | {r['memory_gb']:.1f} | {r['seconds']:.0f} |")
    for key, label in (("resume_max_relative_difference", "resume vs uninterrupted"),
                       ("zero3_max_relative_difference", "ZeRO-3 vs ZeRO-2")):
        if key in result:
            lines.append(f"\n{label}: max relative loss difference {result[key]:.2e}")
    if "generation" in result:
        g = result["generation"]
        lines.append(f"\nGeneration ({g['dtype']}, batch {g['batch']}, prompt {g['prompt']}, {g['new_tokens']} new tokens, "
                     f"KV cache): {g['tokens_per_s']:.0f} tokens/s, {g['loops_per_token']:.2f} loops per token, "
                     f"cache {g['kv_cache_mib']:.1f} MiB")
    return lines


SECTIONS = {"attention": _attention_section, "benchmark": _benchmark_section, "compile": _benchmark_section,
            "pretrain": _pretrain_section}


if __name__ == "__main__":
    main()
