"""What a tool may write over and what it may delete: the rules of every tool and library function
that writes a directory or a file prefix, so that no command destroys what a user made.

- An existing output is refused unless it is empty, or it is an output of the same kind that this
  project wrote and `overwrite` (the tools' --overwrite) is given.
- An output that equals, contains or lies inside one of the inputs is refused.
- A directory is assembled under a temporary name beside the output and renamed when complete; an
  output it replaces is moved aside first and removed only once the new one is in place.
- Nothing is removed but what the same invocation created, and (with overwrite) the old output it
  replaces. Missing parent folders of an output are created; one that cannot be is refused first.

Recognising an output this project wrote: a directory carries MARKER, naming its kind ("model
directory", "released-format directory", ...) and listing every path written into it; overwrite
replaces it only when the kind matches and it holds nothing else, so a file a user put there later
is never lost. A file prefix (`{prefix}.bin/.idx`) is recognised by its own format: an .idx that
starts with the indexed-dataset magic (data/indexed.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator, NoReturn, Optional

MARKER = ".looplm-output.json"
_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # data/indexed.py's MAGIC; not imported, to keep this module free of numpy


class OutputError(ValueError):
    """An output a tool must not write; the message names the path and what to do."""


def exit_with(prog: str, error: Exception) -> NoReturn:
    """A user error as argparse reports one: one line on stderr, exit code 2, no traceback."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


def check_inputs(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, contains or lies inside an input (paths compared resolved)."""
    out = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source:
            raise OutputError(f"{output}: is also an input; choose another output")
        if out.is_relative_to(source):
            raise OutputError(f"{output}: lies inside the input {given}; choose an output outside it")
        if source.is_relative_to(out):
            raise OutputError(f"{output}: contains the input {given}; choose an output that does not")


def check_parent(output: str | Path) -> None:
    """Refuse an output whose missing parent folders could not be created: the nearest existing
    ancestor must be a directory this process may write into."""
    ancestor = Path(output).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{output}: cannot create its folder, {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{output}: cannot create it, {ancestor} is not writable")


def _entries(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")} - {MARKER}


def _marker(directory: Path) -> Optional[dict]:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("entries"), list) else None


def check_output_dir(output: str | Path, kind: str, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> None:
    """Raise OutputError unless `output` may be written as a directory of `kind` (the rules above)."""
    output = Path(output)
    check_inputs(output, inputs)
    check_parent(output)
    if output.is_symlink():
        raise OutputError(f"{output}: is a symbolic link; give the directory itself")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory; choose another output")
    if not output.exists() or not any(output.iterdir()):
        return
    marker = _marker(output)
    if marker is None:
        raise OutputError(f"{output}: exists and was not written by looplm-mega (no {MARKER}); "
                          "choose another output, nothing in it is replaced")
    if marker.get("kind") != kind:
        raise OutputError(f"{output}: holds a {marker.get('kind')}, not a {kind}; choose another output")
    if not overwrite:
        raise OutputError(f"{output}: exists (a {kind} written earlier); pass --overwrite to replace it")
    foreign = sorted(_entries(output) - set(marker["entries"]))
    if foreign:
        raise OutputError(f"{output}: holds {foreign[0]}, which was not written with it; move it away or "
                          "choose another output")


@contextlib.contextmanager
def staged_output_dir(output: str | Path, kind: str, inputs: Iterable[str | Path] = (),
                      overwrite: bool = False) -> Iterator[Path]:
    """A directory to fill, assembled under a temporary name beside `output` and renamed to it when
    the block completes (an older output it replaces moved aside first, removed last); removed if
    the block fails. Refuses what check_output_dir refuses, before the block runs."""
    output, inputs = Path(output), list(inputs)
    check_output_dir(output, kind, inputs, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_directory(output, "tmp")
    try:
        yield staging
        mark_output_dir(staging, kind, _entries(staging))
        # Again: something may have appeared at `output` while the block ran (it may take hours),
        # and _move_into_place replaces whatever this check lets through.
        check_output_dir(output, kind, inputs, overwrite)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def mark_output_dir(directory: str | Path, kind: str, entries: Iterable[str]) -> None:
    """Mark `directory` as an output of `kind` that holds `entries` (paths relative to it)."""
    marker = Path(directory) / MARKER
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, "entries": sorted(entries)}, indent=1))
    tmp.replace(marker)


def _new_directory(output: Path, suffix: str) -> Path:
    """A new empty directory beside `output` (never an existing one). Not tempfile.mkdtemp: its
    directories are private (0700), and the output should get the permissions the umask gives."""
    path = output.parent / f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}"
    path.mkdir()
    return path


def _move_into_place(staging: Path, output: Path) -> None:
    if not output.exists():
        os.rename(staging, output)  # fails, rather than merges, if a directory appeared meanwhile
        return
    if not any(output.iterdir()):
        os.rename(staging, output)  # an empty directory is replaced
        return
    # An output check_output_dir allowed to replace. Two renames: a crash between them leaves the
    # old output complete under the name `aside`, the new one under the staging name.
    aside = _new_directory(output, "old")
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside, output)
        raise
    shutil.rmtree(aside)


def _is_indexed_dataset_index(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_INDEX_MAGIC)) == _INDEX_MAGIC
    except OSError:
        return False


def check_output_prefix(prefix: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> None:
    """Raise OutputError unless the indexed dataset `{prefix}.bin/.idx` may be written: neither file
    exists, or they are an indexed dataset and `overwrite` is given; no input is among them or
    holds them. (The writer, data/indexed.py, writes both under temporary names first.)"""
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    inputs = list(inputs)
    for path in files:
        check_inputs(path, inputs)
    check_parent(files[0])
    existing = [path for path in files if path.exists() or path.is_symlink()]
    if not existing:
        return
    if not _is_indexed_dataset_index(files[1]):
        raise OutputError(f"{existing[0]}: exists and {files[1].name} is not an indexed dataset's index; "
                          "choose another output prefix, nothing is replaced")
    if not overwrite:
        raise OutputError(f"{existing[0]}: exists; pass --overwrite to replace the dataset {prefix}")
