"""Pretraining entry point, for every launcher:

    deepspeed --num_gpus 8 --module looplm_mega.pretrain --config run.yaml [--section.field value ...]
    torchrun --nproc_per_node 8 -m looplm_mega.pretrain --config run.yaml
    srun python -m looplm_mega.pretrain --config run.yaml
    python -m looplm_mega.pretrain --config run.yaml
"""

from __future__ import annotations

import argparse
import sys

from looplm_mega.training import stop_signals  # light: nothing but the signal module


def main(argv=None) -> None:
    # First of all: a scheduler's stop signal during the slow start-up must not kill the rank.
    stop_signals.install()
    from looplm_mega.config import ConfigError
    from looplm_mega.training.config import load_run_config  # imports torch

    parser = argparse.ArgumentParser(description="Pretrain a looped language model (LoopLM / Ouro).")
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    from looplm_mega.data.indexed import IndexedDatasetError

    try:
        config = load_run_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
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
