#!/usr/bin/env python
"""What the checkpoint manifest costs: a save of the engine's files (model, optimizer states
after one AdamW step, RNG) timed against the manifest's work on them (each file's size and xxh3
checksum, read back right after the write, as training/checkpoint.py does), side by side in one
process, alternating over repeats, for each preset.

    python tools/benchmark_checkpoint.py                          # tiny and small, ZeRO-2, 3 repeats
    python tools/benchmark_checkpoint.py --presets small --zero-stage 3 --repeats 5 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.config import from_dict  # noqa: E402
from looplm_mega.model import LoopLM, LoopLMConfig  # noqa: E402
from looplm_mega.parallel.state import initialize_parallel  # noqa: E402
from looplm_mega.training.checkpoint import file_entry  # noqa: E402
from looplm_mega.training.config import RunConfig  # noqa: E402
from looplm_mega.training.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from looplm_mega.training.distributed import init_distributed  # noqa: E402
from looplm_mega.training.optimizer import parameter_groups  # noqa: E402


def measure(preset: str, zero_stage: int, repeats: int, workdir: Path) -> dict:
    device = init_distributed()
    parallel = initialize_parallel()
    config = from_dict(RunConfig, {"data": {"prefixes": ["unused"], "seq_length": 64}, "model": {"preset": preset},
                                   "training": {"global_batch_size": 1, "train_steps": 1},
                                   "deepspeed": {"zero_stage": zero_stage}, "wandb": {"mode": "disabled"}})
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig.from_preset(preset))
    engine = DeepSpeedEngine(model, parameter_groups(model, 0.1), config, parallel, device, 1, 1)
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    engine.train_batch([{"input_ids": ids, "labels": ids}])  # Adam's moments exist, as in a real save
    saves, manifests, sizes = [], [], 0
    for repeat in range(repeats):
        start = time.perf_counter()
        written = engine.save(workdir, f"{preset}_{repeat}")
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        entries = [file_entry(path, workdir) for path in written]
        manifests.append(time.perf_counter() - start)
        sizes = sum(e["size"] for e in entries)
    engine.close()
    save, manifest = statistics.median(saves), statistics.median(manifests)
    return {"preset": preset, "zero_stage": zero_stage, "parameters": model.num_parameters(), "bytes": sizes,
            "save_s": save, "manifest_s": manifest, "manifest_share": manifest / save, "saves_s": saves,
            "manifests_s": manifests}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model presets to save")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2, help="DeepSpeed ZeRO stage")
    parser.add_argument("--repeats", type=int, default=3, help="saves per preset (medians reported)")
    parser.add_argument("--output", help="write the results as JSON here too")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark_checkpoint.") as workdir:
        for preset in args.presets:
            results.append(measure(preset, args.zero_stage, args.repeats, Path(workdir)))
    print("| preset | parameters | files | save (s) | manifest (s) | manifest / save |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['preset']} | {r['parameters']:,} | {r['bytes'] / 2**20:,.1f} MiB | {r['save_s']:.3f} | "
              f"{r['manifest_s']:.3f} | {r['manifest_share']:.1%} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
