#!/usr/bin/env python
"""Grow a LoopLM's shared layer stack by an integer factor (Ouro's 1.4B -> 2.6B: 24 -> 48 layers).

    python tools/upcycle.py --source runs/ouro_1_4b/checkpoints --output runs/ouro_2_6b_init --factor 2 \
        [--order stacked|interleaved] [--keep-progress] [--optimizer reset|carry] [--check-data data/web_text_document]

--source: a run's checkpoints/ directory (any ZeRO stage, TP or PP degree; consolidated first), a
model directory (tools/convert_checkpoint.py output) or a Hugging Face Ouro directory
(config.json + safetensors). The output is a model directory; a run starts from it with
`--training.init_from OUTPUT` at any TP / PP degree, with fresh optimizer states, or with Adam's
moments grown like the weights (--optimizer carry); --keep-progress also carries the step and
consumed samples. It then prints a function check: the CE of every loop
step of the original and the grown model on a few batches (of --check-data, else random tokens).
An existing output is replaced only with --overwrite, and only if it is a model directory this
project wrote (looplm_mega/outputs.py); the output may not be, hold or lie inside the source.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.data.token_ids import check_token_ids  # noqa: E402
from looplm_mega.inference.loading import load_model  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_dir, exit_with  # noqa: E402
from looplm_mega.training.model_dir import MODEL_DIR, read_config  # noqa: E402
from looplm_mega.training.upcycle import read_source_config, upcycle  # noqa: E402


def _batches(config, data: str | None, count: int, seq: int) -> list[torch.Tensor]:
    if data is None:
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, config.vocab_size, (2, seq + 1), generator=generator) for _ in range(count)]
    from looplm_mega.data.indexed import IndexedDataset

    check_token_ids([data], config.vocab_size)
    tokens = IndexedDataset(data)
    stream = torch.cat([torch.from_numpy(tokens[i].astype("int64")) for i in range(min(len(tokens), 200))])
    need = count * 2 * (seq + 1)
    if len(stream) < need:
        raise ValueError(f"--check-data {data}: {len(stream)} tokens in its first documents, {need} needed")
    return list(stream[:need].view(count, 2, seq + 1))


@torch.no_grad()
def per_loop_ce(model_dir: Path, batches: list[torch.Tensor]) -> list[float]:
    model = load_model(model_dir, dtype=torch.float32)
    total = torch.zeros(model.config.total_ut_steps)
    for batch in batches:
        total += model(batch[:, :-1], labels=batch[:, 1:]).ce_per_loop
    return (total / len(batches)).tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--source", required=True,
                        help="a checkpoints/ directory, a model directory or a Hugging Face Ouro directory")
    parser.add_argument("--output", required=True, help="the model directory to write")
    parser.add_argument("--factor", type=int, default=2, help="the grown stack has this many times the layers")
    parser.add_argument("--order", choices=["stacked", "interleaved"], default="stacked",
                        help="stacked: the whole stack repeated (1 2 1 2); interleaved: each layer repeated (1 1 2 2)")
    parser.add_argument("--tag", default=None, help="checkpoint of a checkpoints/ directory (default: the latest)")
    parser.add_argument("--keep-progress", action="store_true", help="carry the step and consumed samples")
    parser.add_argument("--optimizer", choices=["reset", "carry"], default="reset",
                        help="carry: Adam's moments grown like the weights (from checkpoints, or a model directory "
                             "that has optimizer.safetensors); reset: the run starts them afresh")
    parser.add_argument("--check-data", default=None, help="a .bin/.idx prefix for the function check")
    parser.add_argument("--check-batches", type=int, default=4, help="batches of the function check")
    parser.add_argument("--check-seq-length", type=int, default=128, help="tokens per sample of the function check")
    parser.add_argument("--no-check", action="store_true", help="skip the function check (it loads both models)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model directory written earlier")
    args = parser.parse_args(argv)
    source, output = Path(args.source), Path(args.output)
    try:
        check_output_dir(output, MODEL_DIR, [source], args.overwrite)  # before any work
    except OutputError as e:
        exit_with(parser.prog, e)
    output.parent.mkdir(parents=True, exist_ok=True)  # the scratch folder goes beside the output
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        try:
            if (source / "latest").exists() or any(source.glob("step*/trainer_state.json")):
                from looplm_mega.training.consolidate import consolidate

                source = consolidate(source, Path(scratch) / "consolidated", args.tag, optimizer=args.optimizer == "carry")
            out = upcycle(source, output, args.factor, args.order, args.keep_progress, args.optimizer,
                          overwrite=args.overwrite)
        except OutputError as e:
            exit_with(parser.prog, e)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        grown = read_config(out)
        print(f"wrote {out}: {grown.num_hidden_layers} layers ({args.order}, x{args.factor}), optimizer state {args.optimizer}")
        if args.no_check:
            return
        original = read_source_config(source)
        try:
            batches = _batches(original, args.check_data, args.check_batches, args.check_seq_length)
        except ValueError as e:  # IndexedDatasetError, ConfigError (token ids outside the vocabulary)
            sys.exit(f"error: {e}")
        where = args.check_data or "random tokens"
        for name, directory in (("original", source), ("upcycled", out)):
            ce = per_loop_ce(directory, batches)
            print(f"function check ({where}), {name:8}: CE per loop " + " / ".join(f"{v:.4f}" for v in ce))


if __name__ == "__main__":
    main()
