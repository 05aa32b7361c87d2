"""Loads the suite's JSONL files (next to this file) as a test split, for lm-eval's custom_dataset."""

from pathlib import Path

import datasets


def load(file: str, **_metadata) -> datasets.DatasetDict:
    path = Path(__file__).with_name(file)
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
