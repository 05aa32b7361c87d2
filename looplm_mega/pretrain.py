"""Pretraining entry point, for every launcher:

    deepspeed --num_gpus 8 --module looplm_mega.pretrain --config run.yaml [--section.field value ...]
    torchrun --nproc_per_node 8 -m looplm_mega.pretrain --config run.yaml
    srun python -m looplm_mega.pretrain --config run.yaml
    python -m looplm_mega.pretrain --config run.yaml
    python -m looplm_mega.pretrain --help        # every field of the run config
"""

from __future__ import annotations

import argparse
import sys
import warnings

from looplm_mega.training import stop_signals  # light: nothing but the signal module

# torch 2.13 deprecates the collectives that DeepSpeed calls on every step (and that
# parallel/comm.py calls, as torch 2.7 has no replacement); the warning would repeat at every step
# because each `warnings.catch_warnings` in the libraries resets the once-per-location registry.
# Only these messages are silenced: any other deprecation still shows.
KNOWN_DEPRECATIONS = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)


def silence_known_deprecations() -> None:
    for message in KNOWN_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    """The command line; its help lists every field of the run config, read from the dataclasses
    (the config modules import torch but not DeepSpeed, so --help stays quick)."""
    from looplm_mega.config import format_fields
    from looplm_mega.model.config import LoopLMConfig
    from looplm_mega.training.config import RunConfig

    fields = format_fields(RunConfig, expand={"model": (
        LoopLMConfig, "below, LoopLMConfig's defaults; a preset sets its own")})
    parser = argparse.ArgumentParser(
        prog="python -m looplm_mega.pretrain", allow_abbrev=False,  # a short --conf must not eat a dotted flag
        usage="%(prog)s --config RUN.yaml [--section.field VALUE ...]",
        description="Pretrain a looped language model (LoopLM / Ouro) with DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run config fields: each can be set in the YAML or overridden on the command line as\n"
               "--section.field VALUE or --section.field=VALUE; VALUE is read as YAML (4, 3e-4, true, null,\n"
               "[0.9, 0.95]). A curriculum is a list of stages, written in the YAML.\n\n" + fields)
    parser.add_argument("--config", required=True, metavar="RUN.yaml", help="the run config (see configs/run/)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", metavar="FILE",
                        help="a DeepSpeed JSON, as DeepSpeed's own scripts take it: the same as "
                             "--deepspeed.config_file FILE (default: none)")
    parser.add_argument("--deepspeed", action="store_true",
                        help="accepted from DeepSpeed-style command lines; every run uses DeepSpeed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def parse_command_line(argv=None):
    """The run config from the command line; a config error ends the process with one line."""
    from looplm_mega.config import ConfigError
    from looplm_mega.training.config import load_run_config

    args, overrides = build_parser().parse_known_args(argv)
    if args.deepspeed_config is not None:
        overrides = ["--deepspeed.config_file", args.deepspeed_config, *overrides]
    try:
        return load_run_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def main(argv=None) -> None:
    # First of all: a scheduler's stop signal during the slow start-up must not kill the rank.
    stop_signals.install()
    silence_known_deprecations()
    config = parse_command_line(argv)
    from looplm_mega.config import ConfigError
    from looplm_mega.data.indexed import IndexedDatasetError
    from looplm_mega.training.checkpoint import CheckpointError
    from looplm_mega.training.trainer import pretrain  # after the config check: imports DeepSpeed

    # The trainer checks the data (and what else it can) on every rank before any process group
    # exists: a rank that stopped alone would leave the others waiting.
    try:
        pretrain(config)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except IndexedDatasetError as e:
        sys.exit(f"data error: {e}")
    except CheckpointError as e:
        sys.exit(f"checkpoint error: {e}")


if __name__ == "__main__":
    main()
