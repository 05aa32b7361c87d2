#!/usr/bin/env python
"""Convert checkpoints.

    # consolidate a training checkpoint (ZeRO 0-3 shards, any number of ranks) into one model
    python tools/convert_checkpoint.py --checkpoint runs/tiny/checkpoints [--tag step00000200] --output runs/tiny/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.training.consolidate import consolidate  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoints/ directory")
    parser.add_argument("--tag", default=None, help="checkpoint to convert (default: the latest)")
    parser.add_argument("--output", required=True, help="directory for model.safetensors and config.yaml")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.output, args.tag)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.yaml'}")


if __name__ == "__main__":
    main()
