#!/usr/bin/env python
"""Tokenize raw corpora into Megatron-compatible `{output_prefix}_{key}_document.bin/.idx`.

    python tools/preprocess_data.py --input corpus/ --tokenizer tokenizer.json \\
        --output-prefix data/corpus --workers 8 --append-eod
    python tools/preprocess_data.py --input 'shards/*.jsonl.zst' --json-keys text title ...
    python tools/preprocess_data.py --input books/ --input-format text --text-mode file ...
    python tools/preprocess_data.py --input HuggingFaceFW/fineweb-edu --input-format hf ...

Inputs: JSONL (plain, .gz, .zst), plain text, Parquet, or a Hugging Face dataset. A bad record
stops the run with its file and line, unless --skip-invalid skips and counts it.
An existing output dataset is replaced only with --overwrite (looplm_mega/outputs.py).
The logic lives in looplm_mega/data/preprocess.py; this file only parses flags.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter, Terminated, os_error_message, raise_on_sigterm  # noqa: E402
from looplm_mega.config import ConfigError  # noqa: E402
from looplm_mega.data.indexed import IndexedDatasetError  # noqa: E402
from looplm_mega.data.preprocess import PreprocessConfig, output_prefix, preprocess  # noqa: E402
from looplm_mega.data.readers import InputFormat, InvalidInputError, TextMode  # noqa: E402
from looplm_mega.data.tokenizer import EOD_TOKEN, declared_eos_token  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_prefix, exit_with  # noqa: E402

# Megatron-LM's --tokenizer-type values that this tool reads; its others need their own libraries.
MEGATRON_TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer")


def check_outputs(args: argparse.Namespace) -> None:
    """Every dataset the run writes, the partitions' intermediate ones too (preprocess.py merges,
    then deletes `{prefix}_partN_*`: they must not be anything the run did not write)."""
    inputs = [] if args.input_format == "hf" else [path for pattern in args.input for path in glob.glob(pattern) or [pattern]]
    prefixes = [args.output_prefix] + ([f"{args.output_prefix}_part{i}" for i in range(args.partitions)]
                                       if args.partitions > 1 else [])
    for prefix in prefixes:
        for key in args.json_keys:
            check_output_prefix(output_prefix(prefix, key), inputs, args.overwrite)


def parse_args(argv=None) -> PreprocessConfig:
    defaults = PreprocessConfig(input=["-"], output_prefix="", tokenizer="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (a dataset name with --input-format hf)")
    p.add_argument("--json-keys", nargs="+", default=defaults.json_keys, help="keys to tokenize, one output each")
    p.add_argument("--tokenizer", help="tokenizer.json, a local Hugging Face tokenizer directory (tokenizer.json, or "
                   "vocab.json + merges.txt), or a hub name; or Megatron's flags below")
    p.add_argument("--output-prefix", required=True, help="outputs are OUTPUT_PREFIX_{key}_document.bin/.idx")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="tokenizing processes, one core each (TOKENIZERS_PARALLELISM=true lets each use more)")
    p.add_argument("--partitions", type=int, default=defaults.partitions,
                   help="split the input files into N groups processed concurrently, then merged")
    p.add_argument("--append-eod", action="store_true", help=f"end every document with the EOD token ({EOD_TOKEN})")
    p.add_argument("--eod-token", help=f"the token --append-eod appends (default: {EOD_TOKEN}; with --tokenizer-type "
                   "HuggingFaceTokenizer the tokenizer's eos_token, as Megatron)")
    p.add_argument("--log-interval", type=int, default=defaults.log_interval, help="documents between progress lines")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--allow-empty", action="store_true",
                   help="write empty outputs when no document is left (else that is an error naming the counts)")
    p.add_argument("--input-format", choices=get_args(InputFormat), default=defaults.input_format,
                   help="auto: from each file's suffix (.jsonl/.json/.ndjson, .txt, .parquet, also .gz/.zst)")
    p.add_argument("--text-mode", choices=get_args(TextMode), default=defaults.text_mode,
                   help="plain text: one document per file or per line")
    p.add_argument("--hf-split", default=defaults.hf_split, help="split of a Hugging Face dataset")
    p.add_argument("--hf-name", default=None, help="configuration (subset) of a Hugging Face dataset")
    p.add_argument("--hf-data-dir", default=None, help="folder within a Hugging Face dataset")
    p.add_argument("--batch-documents", type=int, default=defaults.batch_documents, help="documents per encoding batch")
    p.add_argument("--no-fast-bpe", dest="fast_bpe", action="store_false",
                   help="encode with the tokenizers library only, never tiktoken (which is used for byte-level BPE "
                        "only where it gives the tokenizer's ids on a verification sample)")
    p.add_argument("--verify-chars", type=int, default=defaults.verify_chars,
                   help="characters at the head of the input encoded both ways to verify tiktoken")
    megatron = p.add_argument_group("Megatron-LM's tokenizer flags", "so that a Megatron-LM command line runs unchanged")
    megatron.add_argument("--tokenizer-type", choices=MEGATRON_TOKENIZER_TYPES,
                          help="HuggingFaceTokenizer: --tokenizer-model; GPT2BPETokenizer: --vocab-file and --merge-file")
    megatron.add_argument("--tokenizer-model", help="a Hugging Face tokenizer directory or hub name")
    megatron.add_argument("--vocab-file", help="GPT2BPETokenizer's vocab.json")
    megatron.add_argument("--merge-file", help="GPT2BPETokenizer's merges.txt")
    megatron.add_argument("--keep-sequential-samples", action="store_true",
                          help="accepted for Megatron's command lines: documents always keep their input order here")
    p.add_argument("--overwrite", action="store_true", help="replace output datasets written earlier")
    args = p.parse_args(argv)
    try:
        check_outputs(args)
    except OutputError as e:
        exit_with(p.prog, e)
    tokenizer, merge_file, eod_token = _tokenizer_flags(p, args)
    return PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, tokenizer=tokenizer, merge_file=merge_file,
        json_keys=args.json_keys, input_format=args.input_format, text_mode=args.text_mode, hf_split=args.hf_split,
        hf_name=args.hf_name, hf_data_dir=args.hf_data_dir, workers=args.workers, partitions=args.partitions,
        append_eod=args.append_eod, eod_token=eod_token, skip_invalid=args.skip_invalid, allow_empty=args.allow_empty,
        batch_documents=args.batch_documents, log_interval=args.log_interval, fast_bpe=args.fast_bpe,
        verify_chars=args.verify_chars)


def _tokenizer_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str | None, str]:
    """(tokenizer, merge file, EOD token) from our --tokenizer or Megatron's flags, which mean here
    what they mean in Megatron-LM's tools/preprocess_data.py."""
    if (args.tokenizer is None) == (args.tokenizer_type is None):
        p.error("give --tokenizer, or Megatron's --tokenizer-type with its files (not both)")
    if args.tokenizer is not None:
        return args.tokenizer, None, args.eod_token or EOD_TOKEN
    if args.tokenizer_type == "HuggingFaceTokenizer":
        if args.tokenizer_model is None or args.vocab_file or args.merge_file:
            p.error("--tokenizer-type HuggingFaceTokenizer takes --tokenizer-model (and no --vocab-file / --merge-file)")
        eos = declared_eos_token(args.tokenizer_model) if Path(args.tokenizer_model).is_dir() else None
        return args.tokenizer_model, None, args.eod_token or eos or EOD_TOKEN
    if args.vocab_file is None or args.merge_file is None or args.tokenizer_model:
        p.error("--tokenizer-type GPT2BPETokenizer takes --vocab-file and --merge-file (and no --tokenizer-model)")
    return args.vocab_file, args.merge_file, args.eod_token or EOD_TOKEN


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    raise_on_sigterm()
    config = None
    try:
        config = parse_args(argv)
        summary = preprocess(config)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        sys.exit(130)  # the shell's code for death by SIGINT
    except Terminated:
        print("terminated: no output written", file=sys.stderr)
        sys.exit(143)  # the shell's code for death by SIGTERM
    except (ConfigError, InvalidInputError, IndexedDatasetError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a missing input or tokenizer, a full disk, an output that cannot be written
        sys.exit(f"error: {os_error_message(e, config.output_prefix if config else '.')}")
    print(summary.format())


if __name__ == "__main__":
    main()
