#!/usr/bin/env python
"""Tensor-parallel benchmark: per-rank parameter memory, training-step time and the communication
volume per step, for TP=1, TP=2 and TP=2 with sequence parallelism, measured in one run.

Each layout runs in fresh gloo processes (the threads of this machine split between them): the
model built from one seed, then warm-up and timed steps of forward, backward and AdamW on the same
batch. The communication is what parallel.comm counted during one step, next to the analytic
figure: Megatron's 4 all-reduces of B x S x H per layer (2 forward, 2 backward; with SP the same
bytes as all-gathers and reduce-scatters), here once per loop, plus the embedding, the per-loop
read-out into the vocab-parallel head and the head's softmax statistics (and, with SP, the
replicated norms' and gate's gradients and the gathered gate logits).

    python tools/benchmark_tensor_parallel.py [--preset small] [--model.num_hidden_layers 4] \
        [--seq-len 256] [--batch-size 2] [--steps 2] [--output tp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.config import parse_overrides  # noqa: E402
from looplm_mega.model import LoopLM, LoopLMConfig  # noqa: E402
from looplm_mega.parallel import comm  # noqa: E402
from looplm_mega.parallel.state import initialize_parallel  # noqa: E402
from looplm_mega.parallel.tensor_parallel import TensorParallel, partition_dim  # noqa: E402
from looplm_mega.training.distributed import cpu_threads  # noqa: E402

LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "tp2_sp": (2, True)}


def analytic_comm_bytes(config: LoopLMConfig, batch: int, seq: int, tp: int, sequence_parallel: bool,
                        element_bytes: int = 4) -> dict:
    """Bytes one rank sends in one training step (one micro-batch, no recomputation), by source."""
    if tp == 1:
        return {"layers": 0, "embedding_and_readout": 0, "head_softmax": 0, "replicated_sp": 0, "total": 0}
    all_reduce = 2 * (tp - 1) / tp  # ring: reduce-scatter then all-gather
    steps, tokens, hidden = config.total_ut_steps, batch * seq, config.hidden_size
    activation = tokens * hidden * element_bytes
    figures = {
        # Megatron: per layer two collectives forward (attention and MLP outputs), two backward.
        "layers": config.num_hidden_layers * steps * 4 * all_reduce * activation,
        # The embedding's partial lookups (forward) and the read-out states' gradient (backward).
        "embedding_and_readout": all_reduce * activation * (1 + steps),
        # The vocab-parallel softmax: row maxima, then sums and label logits, in fp32.
        "head_softmax": all_reduce * 3 * steps * tokens * 4,
        "replicated_sp": 0.0,
    }
    if sequence_parallel:
        norms = (4 * config.num_hidden_layers + 1) * hidden + hidden + 1  # + the exit gate
        figures["replicated_sp"] = steps * (all_reduce * norms * 4 + (tp - 1) / tp * tokens * 4)
    figures["total"] = sum(figures.values())
    return {k: int(v) for k, v in figures.items()}


def _measure(rank: int, world: int, port: int, args, result_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(cpu_threads(world))
    dist.init_process_group("gloo")
    tp_size, sequence_parallel = LAYOUTS[args.layout]
    tp = TensorParallel.from_state(initialize_parallel(tp=tp_size, sequence_parallel=sequence_parallel))
    config = model_config(args)
    torch.manual_seed(0)
    model = LoopLM(config, tp)
    split = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if partition_dim(n) is not None)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
    times, comm_bytes = [], {}
    for step in range(args.warmup + args.steps):
        comm.COMM_BYTES.clear()
        dist.barrier()
        start = time.perf_counter()
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            comm_bytes = dict(comm.COMM_BYTES)
    if rank == 0:
        Path(result_file).write_text(json.dumps({
            "layout": args.layout, "ranks": world, "param_bytes_per_rank": total, "split_param_bytes_per_rank": split,
            "step_s": statistics.median(times), "comm_bytes_counted": sum(comm_bytes.values()), "comm_by_collective": comm_bytes,
            "comm_bytes_analytic": analytic_comm_bytes(config, args.batch_size, args.seq_len, tp_size, tp.sequence_parallel),
        }))
    dist.destroy_process_group()


def model_config(args) -> LoopLMConfig:
    return LoopLMConfig.from_preset(args.preset).replace(**args.model)


def measure_layout(args, layout: str) -> dict:
    """One layout in fresh processes; returns rank 0's figures."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = LAYOUTS[layout][0]
    layout_args = argparse.Namespace(**{**vars(args), "layout": layout})
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        mp.start_processes(_measure, args=(world, port, layout_args, str(result)), nprocs=world, start_method="spawn")
        return json.loads(result.read_text())


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (configs/model/); --model.field VALUE flags change it")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                        help="layouts to measure (tp2_sp: TP=2 with sequence parallelism)")
    parser.add_argument("--output", default=None, help="write the results as JSON here too")
    args, rest = parser.parse_known_args(argv)
    args.model = parse_overrides(rest).get("model", {})  # --model.field value
    config = model_config(args)
    print(f"{args.preset}: {LoopLM.__name__} {config.num_hidden_layers} layers x {config.total_ut_steps} loops, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}; batch {args.batch_size} x {args.seq_len} tokens, fp32, CPU", flush=True)
    results = [measure_layout(args, layout) for layout in args.layouts]
    base = results[0]
    print(f"{'layout':8} {'params/rank MiB':>16} {'(TP-split part)':>16} {'step s':>8} {'comm MiB counted':>17} {'analytic':>9}")
    for r in results:
        print(f"{r['layout']:8} {r['param_bytes_per_rank'] / 2**20:16.1f} {r['split_param_bytes_per_rank'] / 2**20:16.1f} "
              f"{r['step_s']:8.2f} {r['comm_bytes_counted'] / 2**20:17.2f} {r['comm_bytes_analytic']['total'] / 2**20:9.2f}")
    for r in results[1:]:
        print(f"{r['layout']} / {base['layout']}: parameter memory per rank {r['param_bytes_per_rank'] / base['param_bytes_per_rank']:.3f}x, "
              f"step time {r['step_s'] / base['step_s']:.2f}x; communication counted / analytic "
              f"{r['comm_bytes_counted'] / max(1, r['comm_bytes_analytic']['total']):.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
