#!/usr/bin/env python
"""Host memory per rank of a pretraining run, by phase, against what its ZeRO stage must hold.

N processes on this machine (gloo) run the trainer on random tokens: each rank records its peak
resident memory (ru_maxrss) once the runtime is up, after the model and engine are built, after
the training steps, and after the final checkpoint. The runtime is what any run holds whatever its
model: torch, DeepSpeed, the process groups, and the code and kernels a run loads on first use
(DeepSpeed's first initialize alone imports some 600 modules, about 45 MiB). Each rank therefore
first runs the same configuration with a negligible model (hidden size 8, one layer: one step and a
checkpoint), and the runtime is its peak after that run. "Must hold" is what the optimizer states
need at the stage, per rank: ZeRO-3 splits the fp32 weights, gradients and Adam's two moments
(16 bytes a parameter) over the ranks; ZeRO-1/2 keep the weights and gradients whole (8) and split
the moments (8); ZeRO-0 keeps all 16.

    python tools/benchmark_memory.py --preset medium --model num_hidden_layers=12 --zero-stage 3 --processes 2
    python tools/benchmark_memory.py --preset small --processes 2 4 --output memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.training.distributed import free_port  # noqa: E402

MIB = 2**20
NEGLIGIBLE = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
              "num_key_value_heads": 1}  # the warm-up run's model: the vocabulary stays the data's


def must_hold(parameters: int, zero_stage: int, ranks: int) -> float:
    """Bytes per rank of fp32 weights, gradients and Adam's moments at this ZeRO stage."""
    split = {0: 0, 1: 8, 2: 8, 3: 16}[zero_stage]
    return (16 - split) * parameters + split * parameters / ranks


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _rank(rank: int, world: int, port: int, run: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from looplm_mega.config import from_dict
    from looplm_mega.training import trainer as trainer_module
    from looplm_mega.training.config import RunConfig
    from looplm_mega.training.distributed import init_distributed

    init_distributed()
    warm_up = {**run, "run_dir": f"{run['run_dir']}_warm_up", "model": {**run["model"], **NEGLIGIBLE},
               "training": {**run["training"], "train_steps": 1, "log_interval": 1}}
    warm = trainer_module.Trainer(from_dict(RunConfig, warm_up))
    warm.train()
    warm.engine.close()
    del warm
    gc.collect()
    phases = {"runtime": peak_rss()}
    config = from_dict(RunConfig, run)
    start = time.perf_counter()
    trainer = trainer_module.Trainer(config)
    phases["built"] = peak_rss()
    save = trainer.save
    trainer.save = lambda: (phases.setdefault("trained", peak_rss()), save())[1]
    trainer.train()
    phases["saved"] = peak_rss()
    phases["seconds"] = time.perf_counter() - start
    phases["parameters"] = trainer.num_parameters
    Path(out, f"rank{rank}.json").write_text(json.dumps(phases))


def measure(preset: str, overrides: dict, zero_stage: int, processes: int, steps: int, workdir: Path) -> dict:
    from looplm_mega.data.indexed import IndexedDatasetWriter
    from looplm_mega.model import LoopLMConfig

    model = LoopLMConfig.from_preset(preset).replace(**overrides)
    prefix = workdir / "tokens"
    if not Path(f"{prefix}.idx").exists():
        rng = np.random.default_rng(0)
        with IndexedDatasetWriter(prefix, np.uint16 if model.vocab_size < 65500 else np.int32) as writer:
            for _ in range(200):
                writer.add_document(rng.integers(1, model.vocab_size, 300))
    shape = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    run_dir = workdir / f"{preset}_{shape}_zero{zero_stage}_dp{processes}"
    run = {"run_dir": str(run_dir), "model": {"preset": preset, **overrides},
           "data": {"prefixes": [str(prefix)], "seq_length": 64, "split": "100,0,0"}, "wandb": {"mode": "disabled"},
           "tensorboard": False, "deepspeed": {"zero_stage": zero_stage},
           "training": {"micro_batch_size": 1, "global_batch_size": processes, "train_steps": steps,
                        "log_interval": steps}}
    out = workdir / f"out_{run_dir.name}"
    out.mkdir()
    mp.start_processes(_rank, args=(processes, free_port(), run, str(out)), nprocs=processes, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    parameters = ranks[0]["parameters"]
    hold = must_hold(parameters, zero_stage, processes)
    worst = max(ranks, key=lambda r: r["saved"] - r["runtime"])
    return {"preset": preset, "model": overrides, "layers": model.num_hidden_layers, "zero_stage": zero_stage, "processes": processes, "parameters": parameters,
            "must_hold_mib": hold / MIB, "runtime_mib": worst["runtime"] / MIB,
            "built_mib": worst["built"] / MIB, "trained_mib": worst["trained"] / MIB, "saved_mib": worst["saved"] / MIB,
            "above_runtime_mib": (worst["saved"] - worst["runtime"]) / MIB,
            "ratio": (worst["saved"] - worst["runtime"]) / hold, "seconds": worst["seconds"],
            "ranks_above_runtime_mib": [round((r["saved"] - r["runtime"]) / MIB) for r in ranks]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset")
    parser.add_argument("--model", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="overrides of the preset's fields, e.g. num_hidden_layers=12 vocab_size=8192")
    parser.add_argument("--zero-stage", type=int, nargs="+", default=[3], choices=[0, 1, 2, 3], help="ZeRO stages to measure")
    parser.add_argument("--processes", type=int, nargs="+", default=[2], help="data-parallel sizes to measure")
    parser.add_argument("--steps", type=int, default=2, help="training steps before the final checkpoint")
    parser.add_argument("--output", help="write the results as JSON here too")
    args = parser.parse_args(argv)
    from looplm_mega.model import LoopLMConfig

    overrides = {}
    for item in args.model:
        field, _, value = item.partition("=")
        if not value:
            parser.error(f"--model {item}: expected FIELD=VALUE")
        overrides[field] = yaml.safe_load(value)
    try:
        LoopLMConfig.from_preset(args.preset).replace(**overrides)
    except (TypeError, ValueError) as e:
        parser.error(f"--model: {e}")
    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark_memory.") as workdir:
        for stage in args.zero_stage:
            for processes in args.processes:
                results.append(measure(args.preset, overrides, stage, processes, args.steps, Path(workdir)))
                r = results[-1]
                print(f"{r['preset']} x{r['layers']} layers ({r['parameters']:,} parameters), ZeRO-{stage}, {processes} ranks: "
                      f"runtime {r['runtime_mib']:.0f} MiB, built {r['built_mib']:.0f}, trained {r['trained_mib']:.0f}, "
                      f"saved {r['saved_mib']:.0f}; above the runtime {r['above_runtime_mib']:.0f} MiB = "
                      f"{r['ratio']:.2f} x the {r['must_hold_mib']:.0f} MiB ZeRO-{stage} must hold", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
