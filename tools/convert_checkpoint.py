#!/usr/bin/env python
"""Convert checkpoints, model directories and the released Ouro (Hugging Face) format.

    # a training checkpoint (ZeRO 0-3 shards, any number of ranks, any TP / PP degree) -> one model
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints [--tag step00000200] --output runs/tiny/model

    # ... or straight into the shards of another TP degree; --optimizer adds Adam's moments, so that
    # a run started from it continues exactly, at any parallel layout
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints --output runs/tiny/model_tp4 --tp 4 --optimizer

    # re-split (or, with --tp 1, merge) a model directory
    python tools/convert_checkpoint.py --model runs/tiny/model_tp4 --output runs/tiny/model --tp 1

    # export to the released format (config.json, safetensors, tokenizer, generation config),
    # loadable by the released remote code and vLLM's OuroForCausalLM
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints --to-hf runs/tiny/hf --tokenizer tokenizer.json

    # import a released checkpoint (a local copy of ByteDance/Ouro-1.4B) to continue pretraining it
    python tools/convert_checkpoint.py --from-hf Ouro-1.4B --output runs/ouro_1_4b_init

A run starts from any model directory with `--training.init_from DIR`, at any TP / PP / DP layout.
An existing output is replaced only with --overwrite, and only if this tool wrote it (the rules of
looplm_mega/outputs.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_dir, exit_with  # noqa: E402
from looplm_mega.training.consolidate import consolidate  # noqa: E402
from looplm_mega.training.hf_format import DTYPES, RELEASED_DIR, export_hf, import_hf  # noqa: E402
from looplm_mega.training.model_dir import (  # noqa: E402
    MODEL_DIR, full_model_files, lazy_tensors, read_config, read_full_state, read_trainer_state,
    tensor_parallel_degree, write_model_dir,
)
from looplm_mega.training.optimizer import read_moments  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's checkpoints/ directory")
    source.add_argument("--model", help="a model directory written by this tool")
    source.add_argument("--from-hf", help="a released-format (Hugging Face) Ouro directory")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="the model directory to write")
    target.add_argument("--to-hf", help="the released-format directory to write")
    parser.add_argument("--tag", default=None, help="checkpoint to convert (default: the latest)")
    parser.add_argument("--tp", type=int, default=1, help="split the output into this many TP shards (1: whole)")
    parser.add_argument("--optimizer", action="store_true",
                        help="--checkpoint: also write Adam's moments (optimizer.safetensors) and step")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="--to-hf: tensor dtype")
    parser.add_argument("--tokenizer", default=None, help="--to-hf: a tokenizer.json (or a directory holding one)")
    parser.add_argument("--eos-token", default="<|endoftext|>", help="--to-hf: the end-of-text token")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="--to-hf: largest safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace an output this tool wrote earlier")
    args = parser.parse_args(argv)
    if args.tp < 1:
        parser.error(f"--tp {args.tp}: must be at least 1")
    if args.to_hf and args.from_hf:
        parser.error("--from-hf with --to-hf: nothing to convert")
    source = args.checkpoint or args.model or args.from_hf
    inputs = [source] + ([args.tokenizer] if args.tokenizer else [])
    output, kind = (args.output, MODEL_DIR) if args.output else (args.to_hf, RELEASED_DIR)
    try:
        check_output_dir(output, kind, inputs, args.overwrite)  # before any work
        with tempfile.TemporaryDirectory() as scratch:
            model_dir = Path(args.model) if args.model else None
            if args.checkpoint:
                if args.to_hf:  # consolidated first; lazily, so one tensor at a time
                    model_dir = consolidate(args.checkpoint, Path(scratch) / "model", args.tag)
                else:
                    out = consolidate(args.checkpoint, args.output, args.tag, args.tp, optimizer=args.optimizer,
                                      overwrite=args.overwrite)
            elif args.from_hf:
                if args.tp == 1:
                    out = import_hf(args.from_hf, args.output, overwrite=args.overwrite)
                else:
                    model_dir = import_hf(args.from_hf, Path(scratch) / "model")
            if model_dir is not None:
                if tensor_parallel_degree(model_dir) > 1:  # a clear error for a directory that is not one, too
                    tensors = read_full_state(model_dir)
                else:
                    tensors = lazy_tensors(full_model_files(model_dir))
                if args.to_hf:
                    out = export_hf(tensors, read_config(model_dir), args.to_hf, args.dtype, args.tokenizer,
                                    args.eos_token, int(args.max_shard_gb * 2**30), overwrite=args.overwrite,
                                    inputs=inputs)
                else:
                    saved = read_moments(model_dir)
                    out = write_model_dir(args.output, tensors, read_config(model_dir), read_trainer_state(model_dir),
                                          args.tp, saved[0] if saved else None, overwrite=args.overwrite, inputs=inputs)
    except OutputError as e:
        exit_with(parser.prog, e)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".json", ".yaml")
                   and not p.name.startswith("."))
    print(f"wrote {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
