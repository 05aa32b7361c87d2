#!/usr/bin/env python
"""Convert checkpoints and model directories.

    # a training checkpoint (ZeRO 0-3 shards, any number of ranks, any TP degree) -> one model
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints [--tag step00000200] --output runs/tiny/model

    # ... or straight into the shards of another TP degree
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints --output runs/tiny/model_tp4 --tp 4

    # with Adam's moments: a run started from it continues exactly, at any parallel layout
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints --output runs/tiny/model --optimizer

    # re-split (or, with --tp 1, merge) a model directory
    python tools/convert_checkpoint.py --model runs/tiny/model_tp4 --output runs/tiny/model --tp 1

A run starts from any of these outputs with `--training.init_from DIR`, at any TP / PP / DP layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.training.consolidate import consolidate  # noqa: E402
from looplm_mega.training.model_dir import (  # noqa: E402
    read_config, read_full_state, read_trainer_state, tensor_parallel_degree, write_model_dir,
)
from looplm_mega.training.optimizer import read_moments  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's checkpoints/ directory")
    source.add_argument("--model", help="a model directory written by this tool")
    parser.add_argument("--tag", default=None, help="checkpoint to convert (default: the latest)")
    parser.add_argument("--output", required=True, help="the model directory to write")
    parser.add_argument("--tp", type=int, default=1, help="split the output into this many TP shards (default 1: whole)")
    parser.add_argument("--optimizer", action="store_true",
                        help="--checkpoint: also write Adam's moments (optimizer.safetensors) and step")
    args = parser.parse_args(argv)
    if args.tp < 1:
        parser.error(f"--tp {args.tp}: must be at least 1")
    try:
        if args.checkpoint:
            out = consolidate(args.checkpoint, args.output, args.tag, args.tp, optimizer=args.optimizer)
        else:
            if Path(args.model).resolve() == Path(args.output).resolve():
                parser.error("--output must differ from --model")
            tensor_parallel_degree(Path(args.model))  # a clear error for a directory that is not one
            saved = read_moments(args.model)
            out = write_model_dir(args.output, read_full_state(args.model), read_config(args.model),
                                  read_trainer_state(args.model), args.tp, saved[0] if saved else None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {', '.join(files)}, config.yaml")


if __name__ == "__main__":
    main()
