"""A built-in corpus that needs no download: the Python standard library's own source files.

Every Python installation carries a few hundred thousand lines of real, varied text (code,
docstrings, comments), enough to train a small tokenizer and a tiny model end to end.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator


def stdlib_documents(max_bytes: int | None = None, max_file_bytes: int = 200_000) -> Iterator[str]:
    """The text of each stdlib .py file (sorted, so the corpus is the same on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > max_file_bytes:
            continue
        yield text
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def write_stdlib_jsonl(path: str | Path, max_bytes: int | None = None) -> int:
    """Write the corpus as JSONL ({"text": ...} per line), atomically; returns the document count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for text in stdlib_documents(max_bytes):
            f.write(json.dumps({"text": text}) + "\n")
            count += 1
    tmp.replace(path)
    return count
