"""The range of token ids a dataset holds, checked against the model's vocabulary before training.

An id at or above vocab_size (data made with another tokenizer, or a model configured too small)
crashes the embedding inside the first step, after the whole start-up, with an IndexError (a
device-side assert on GPUs) that names neither the data nor the numbers; a negative id likewise.
The check runs before any engine exists and names the file and both numbers.

The range comes from one vectorised pass over the memory-mapped .bin, in chunks (bounded memory),
and is cached as a small JSON file among the dataset's index caches (data.cache_dir, else
`index_cache/` beside the data), keyed by the sizes and modification times of the .bin and .idx:
a rewritten dataset is scanned again. A cache that cannot be read is scanned again and rewritten;
one that cannot be written is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from looplm_mega.config import ConfigError
from looplm_mega.data.index_cache import cache_key, default_cache_dir
from looplm_mega.data.indexed import IndexedDataset, data_path, index_path

logger = logging.getLogger(__name__)

_SCAN_BYTES = 1 << 26  # per chunk: large enough for full memory bandwidth, small enough to stay bounded


def cache_path(prefix: str | Path, cache_dir: Optional[str | Path] = None) -> Path:
    """Where the range of `prefix` is cached (the name carries a hash of the dataset's full path,
    so that datasets of one name in different folders may share a cache_dir)."""
    prefix = Path(prefix)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir(prefix)
    return directory / f"{prefix.name}_token_ids_{cache_key({'prefix': str(prefix.resolve())})}.json"


def _identity(prefix: Path) -> dict:
    """What the cached range is valid for: both files' sizes and modification times."""
    stats = {name: path.stat() for name, path in (("bin", data_path(prefix)), ("idx", index_path(prefix)))}
    return {name: [s.st_size, s.st_mtime_ns] for name, s in stats.items()}


def scan_token_ids(dataset: IndexedDataset) -> Optional[tuple[int | float, int | float]]:
    """(smallest, largest) token of the dataset's .bin, read once in chunks; None when it is empty."""
    path, dtype = data_path(dataset.prefix), dataset.dtype
    if path.stat().st_size == 0:
        return None
    tokens = np.memmap(path, mode="r", dtype=dtype)
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        tokens._mmap.madvise(mmap.MADV_SEQUENTIAL)  # read ahead: the pass is one sweep
    step = max(1, _SCAN_BYTES // dtype.itemsize)
    low, high = None, None
    for start in range(0, len(tokens), step):
        chunk = tokens[start : start + step]
        chunk_low, chunk_high = chunk.min(), chunk.max()
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
    return low.item(), high.item()


def token_id_range(prefix: str | Path, cache_dir: Optional[str | Path] = None) -> Optional[tuple]:
    """(smallest, largest) token id of the dataset `prefix` (validated on opening), from the cache
    when it matches the files, else scanned and cached; None for a dataset without tokens."""
    prefix = Path(prefix)
    dataset = IndexedDataset(prefix)
    identity = _identity(prefix)
    path = cache_path(prefix, cache_dir)
    try:
        cached = json.loads(path.read_text())
        if cached["files"] == identity:
            return None if cached["range"] is None else tuple(cached["range"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: unreadable token-id cache (%s); scanning %s again", path, e, data_path(prefix))
    found = scan_token_ids(dataset)
    # Host and pid in the temporary name: the ranks of several nodes may scan at once.
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"prefix": str(prefix), "files": identity, "range": found}))
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("%s: cannot cache the token-id range (%s); set data.cache_dir to a writable folder", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # ours, if the write got as far as creating it
    return found


def check_token_ids(prefixes: Sequence[str | Path], vocab_size: int, cache_dir: Optional[str | Path] = None) -> None:
    """ConfigError naming the file and both numbers unless every token id of every dataset lies
    in [0, vocab_size)."""
    for prefix in prefixes:
        found = token_id_range(prefix, cache_dir)
        if found is None:
            continue
        low, high = found
        if high >= vocab_size:
            raise ConfigError(f"{data_path(prefix)}: holds token id {high}, but the model's vocab_size is {vocab_size} "
                              "(ids must be below it): the data was tokenized for another vocabulary, or "
                              "model.vocab_size is too small")
        if low < 0:
            raise ConfigError(f"{data_path(prefix)}: holds token id {low}, but ids must lie in [0, {vocab_size}) "
                              "(vocab_size)")
