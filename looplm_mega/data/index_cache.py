"""Index arrays built once and memory-mapped everywhere.

Every rank of a run needs the same shuffle and sample indices. Building them on every rank wastes
minutes and memory on big datasets, so (as Megatron does) rank 0 builds them and writes .npy files,
the other ranks wait at a barrier and memory-map the files; so do later runs with the same
parameters. A file name carries a hash of everything the arrays depend on, so a changed parameter
gives a new name and a rebuild, never a stale index. A cache file that is missing, cannot be read
(truncated, overwritten) or fails the caller's check of its contents is rebuilt the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)

_HASH_CHUNK_ITEMS = 1 << 22


def fingerprint(*arrays: np.ndarray) -> str:
    """A hash of the arrays' contents (and shapes), read in chunks so that memory-mapped index
    arrays of any size hash in bounded memory."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        digest.update(f"{flat.dtype.str}:{flat.shape[0]};".encode())
        for start in range(0, len(flat), _HASH_CHUNK_ITEMS):
            digest.update(np.ascontiguousarray(flat[start : start + _HASH_CHUNK_ITEMS]).tobytes())
    return digest.hexdigest()


def cache_key(params: dict) -> str:
    """A short hash of JSON-serialisable parameters; the key in a cache file's name."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(prefix: str | Path) -> Path:
    """Where a dataset's index caches go when no cache_dir is configured: next to its files."""
    return Path(prefix).parent / "index_cache"


def _distributed() -> tuple[bool, int]:
    """(whether torch.distributed is initialised, this rank)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False, 0
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _save_atomically(path: Path, array: np.ndarray) -> None:
    # Host and pid in the temporary name: ranks of several nodes may write to a shared folder.
    tmp = path.with_name(f"{path.stem}.{socket.gethostname()}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write(directory: Path, name: str, arrays: dict[str, np.ndarray], description: dict) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for array_name, array in arrays.items():
            _save_atomically(directory / f"{name}_{array_name}.npy", array)
        # For people reading the cache folder: what the hash in the names stands for.
        summary = directory / f"{name}_description.json"
        tmp = summary.with_name(f"{summary.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(description, indent=2, sort_keys=True))
        os.replace(tmp, summary)
    except OSError as e:
        raise OSError(f"{directory}: cannot write the index cache ({e}); "
                      "set data.cache_dir to a writable folder") from None


Check = Callable[[dict[str, np.ndarray]], Optional[str]]


def _load(paths: dict[str, Path], check: Optional[Check]) -> tuple[Optional[dict[str, np.ndarray]], Optional[str]]:
    """(the arrays, memory-mapped, None) or (None, why they cannot be used; None when simply missing)."""
    if not all(p.exists() for p in paths.values()):
        return None, None
    arrays = {}
    for a, p in paths.items():
        try:
            arrays[a] = np.load(p, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            return None, f"{p}: unreadable ({e})"
    problem = check(arrays) if check is not None else None
    return (None, problem) if problem else (arrays, None)


def load_or_build(
    directory: str | Path,
    name: str,
    array_names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
    description: dict,
    check: Optional[Check] = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays `{directory}/{name}_{array}.npy`, memory-mapped read-only; built first by `build`
    (on rank 0 only when torch.distributed is initialised) when any is missing, unreadable, or
    rejected by `check` (which returns what is wrong, or None). Returns the arrays and whether this
    process built them."""
    directory = Path(directory)
    paths = {a: directory / f"{name}_{a}.npy" for a in array_names}
    is_distributed, rank = _distributed()

    def build_and_write() -> None:
        start = time.perf_counter()
        arrays = build()
        if set(arrays) != set(array_names):
            raise ValueError(f"index {name}: build returned {sorted(arrays)}, expected {sorted(array_names)}")
        _write(directory, name, arrays, description)
        logger.info("built index %s in %.2f s (%s)", name, time.perf_counter() - start, directory)

    def load_or_none() -> Optional[dict[str, np.ndarray]]:
        arrays, problem = _load(paths, check)
        if problem:
            logger.warning("index %s: %s; building it again", name, problem)
        return arrays

    arrays, built = None, False
    if rank == 0:
        try:
            arrays = load_or_none()
            if arrays is None:
                build_and_write()
                built = True
        finally:
            # Reached even when the build fails, so that the other ranks never wait forever.
            if is_distributed:
                _barrier()
    elif is_distributed:
        _barrier()
    if arrays is None:
        arrays = load_or_none()
    if arrays is None:
        # Rank 0 failed, or wrote to a node-local folder this rank cannot see: build here. The
        # build is deterministic, so every rank ends up with the same arrays.
        logger.warning("index %s not usable in %s after rank 0's build; building it on rank %d", name, directory, rank)
        build_and_write()
        built = True
        arrays, problem = _load(paths, check)
        if arrays is None:
            raise ValueError(f"index {name} in {directory}: {problem or 'missing'} right after building it")
    return arrays, built


def arrays_for_pickling(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray | Path]:
    """Memory-mapped arrays as their file paths: pickling a memmap copies its whole contents, and
    a dataset is pickled into every DataLoader worker under the spawn and forkserver start methods."""
    return {k: Path(v.filename) if isinstance(v, np.memmap) and v.filename else v for k, v in arrays.items()}


def arrays_from_pickling(arrays: dict[str, np.ndarray | Path]) -> dict[str, np.ndarray]:
    return {k: np.load(v, mmap_mode="r") if isinstance(v, Path) else v for k, v in arrays.items()}
