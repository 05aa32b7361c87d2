#!/usr/bin/env python
"""Concatenate indexed datasets (.bin/.idx pairs) into one, in the order given.

    python tools/merge_datasets.py --inputs data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document

Every input is validated, and must hold tokens of the same dtype, before anything is written;
the output appears only when complete. An existing output dataset is replaced only with
--overwrite, and never by one of the inputs (looplm_mega/outputs.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.cli import HelpFormatter, os_error_message  # noqa: E402
from looplm_mega.data.indexed import IndexedDatasetError, data_path, index_path  # noqa: E402
from looplm_mega.data.preprocess import datasets_in, merge_datasets  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_prefix, exit_with  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--inputs", nargs="+", help="prefixes of the datasets (name.bin / name.idx also accepted)")
    inputs.add_argument("--input", metavar="DIR", help="every .bin/.idx pair in DIR, in name order (Megatron-LM's flag)")
    p.add_argument("--output-prefix", required=True, help="the merged dataset: OUTPUT_PREFIX.bin/.idx")
    p.add_argument("--overwrite", action="store_true", help="replace an output dataset written earlier")
    args = p.parse_args(argv)
    try:
        args.inputs = args.inputs or datasets_in(args.input)
    except IndexedDatasetError as e:
        sys.exit(f"error: {e}")
    # The inputs as merge_datasets reads them: name.bin and name.idx stand for the prefix name.
    prefixes = [name[:-4] if name.endswith((".bin", ".idx")) else name for name in args.inputs]
    inputs = [f(prefix) for prefix in prefixes for f in (data_path, index_path)]
    try:
        check_output_prefix(args.output_prefix, inputs, args.overwrite)
    except OutputError as e:
        exit_with(p.prog, e)
    start = time.perf_counter()
    try:
        documents, tokens = merge_datasets(args.inputs, args.output_prefix)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        sys.exit(130)
    except IndexedDatasetError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, an output that cannot be written
        sys.exit(f"error: {os_error_message(e, args.output_prefix)}")
    print(f"merged {len(args.inputs)} datasets into {args.output_prefix}.bin/.idx: "
          f"{documents:,} documents, {tokens:,} tokens in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
