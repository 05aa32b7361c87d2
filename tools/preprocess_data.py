#!/usr/bin/env python
"""Tokenize raw corpora into Megatron-compatible `{output_prefix}_{key}_document.bin/.idx`.

    python tools/preprocess_data.py --input corpus/ --tokenizer tokenizer.json \\
        --output-prefix data/corpus --workers 8 --append-eod
    python tools/preprocess_data.py --input 'shards/*.jsonl.zst' --json-keys text title ...
    python tools/preprocess_data.py --input books/ --input-format text --text-mode file ...
    python tools/preprocess_data.py --input HuggingFaceFW/fineweb-edu --input-format hf ...

Inputs: JSONL (plain, .gz, .zst), plain text, Parquet, or a Hugging Face dataset. A bad record
stops the run with its file and line, unless --skip-invalid skips and counts it.
The logic lives in looplm_mega/data/preprocess.py; this file only parses flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.config import ConfigError  # noqa: E402
from looplm_mega.data.indexed import IndexedDatasetError  # noqa: E402
from looplm_mega.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from looplm_mega.data.readers import InputFormat, InvalidInputError, TextMode  # noqa: E402
from looplm_mega.data.tokenizer import EOD_TOKEN  # noqa: E402


def parse_args(argv=None) -> PreprocessConfig:
    defaults = PreprocessConfig(input=["-"], output_prefix="", tokenizer="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (a dataset name with --input-format hf)")
    p.add_argument("--json-keys", nargs="+", default=defaults.json_keys, help="keys to tokenize, one output each")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a local Hugging Face tokenizer directory, or a hub name")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="tokenizing processes, one core each (TOKENIZERS_PARALLELISM=true lets each use more)")
    p.add_argument("--partitions", type=int, default=defaults.partitions,
                   help="split the input files into N groups processed concurrently, then merged")
    p.add_argument("--append-eod", action="store_true", help=f"end every document with the EOD token ({EOD_TOKEN})")
    p.add_argument("--eod-token", default=defaults.eod_token, help="the token --append-eod appends")
    p.add_argument("--log-interval", type=int, default=defaults.log_interval, help="documents between progress lines")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--input-format", choices=get_args(InputFormat), default=defaults.input_format)
    p.add_argument("--text-mode", choices=get_args(TextMode), default=defaults.text_mode,
                   help="plain text: one document per file or per line")
    p.add_argument("--hf-split", default=defaults.hf_split, help="split of a Hugging Face dataset")
    p.add_argument("--hf-name", default=None, help="configuration (subset) of a Hugging Face dataset")
    p.add_argument("--hf-data-dir", default=None, help="folder within a Hugging Face dataset")
    p.add_argument("--batch-documents", type=int, default=defaults.batch_documents, help="documents per encoding batch")
    args = p.parse_args(argv)
    return PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer, json_keys=args.json_keys,
        input_format=args.input_format, text_mode=args.text_mode, hf_split=args.hf_split, hf_name=args.hf_name,
        hf_data_dir=args.hf_data_dir, workers=args.workers,
        partitions=args.partitions, append_eod=args.append_eod, eod_token=args.eod_token,
        skip_invalid=args.skip_invalid, batch_documents=args.batch_documents, log_interval=args.log_interval)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        config = parse_args(argv)
        summary = preprocess(config)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        sys.exit(130)  # the shell's code for death by SIGINT
    except (ConfigError, InvalidInputError, IndexedDatasetError, FileNotFoundError, ConnectionError) as e:
        sys.exit(f"error: {e}")
    print(summary.format())


if __name__ == "__main__":
    main()
