"""Document readers: raw corpora (JSONL, plain text, Parquet, Hugging Face datasets) turned into a
stream of documents, each carrying the file and line (or row) it came from, so that bad input can
be reported where it is.

    reader = DocumentReader("corpus/*.jsonl.zst", keys=("text",), skip_invalid=True)
    for document in reader:
        ...  # document.texts, document.source, document.line
    reader.skipped  # Counter of skipped records by reason

Everything streams: JSONL and text are read line by line through the decompressor, Parquet row
group by row group, Hugging Face datasets with streaming=True; memory stays bounded however large
the input (except for text read one document per file, where a file is one document).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Literal, Mapping, NamedTuple, Sequence

log = logging.getLogger(__name__)

InputFormat = Literal["auto", "jsonl", "text", "parquet", "hf"]
TextMode = Literal["file", "line"]

FORMAT_OF_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                    ".txt": "text", ".text": "text", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".zst")
# Builders of `datasets.load_dataset` for local files given with --input-format hf.
HF_BUILDER_OF_FORMAT = {"jsonl": "json", "text": "text", "parquet": "parquet", "csv": "csv"}

# Reasons a record is skipped; every one but "empty" is an error unless skip_invalid is set.
SKIP_REASONS = ("malformed_json", "not_an_object", "missing_key", "not_a_string", "invalid_utf8", "empty")
_WARNINGS_PER_REASON = 3  # skipped records logged with their location, per reason
_PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: bounded memory even for very long documents
# json.loads turns "\ud800" escapes into lone surrogates, which are not Unicode text and make
# the Rust tokenizer raise deep inside a worker; catch them where the line is still known.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidInputError(ValueError):
    """A record that cannot be read; the message names the file and the line or row at fault."""


class Document(NamedTuple):
    texts: tuple[str, ...]  # one text per requested key, in the order of the keys
    source: str  # the file (or dataset name) it came from
    line: int  # 1-based line of a JSONL/text file, or row of a Parquet file / Hugging Face dataset

    @property
    def text(self) -> str:
        return self.texts[0]


def detect_format(path: str | Path) -> str:
    """The format of a file from its name: data.jsonl.zst -> "jsonl"."""
    name = Path(path).name.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    suffix = Path(name).suffix
    if suffix not in FORMAT_OF_SUFFIX:
        raise InvalidInputError(
            f"{path}: cannot tell the format from the suffix {suffix!r} (known: {', '.join(FORMAT_OF_SUFFIX)}, "
            f"optionally with {' or '.join(COMPRESSION_SUFFIXES)}); give the input format explicitly")
    return FORMAT_OF_SUFFIX[suffix]


def _has_known_suffix(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except InvalidInputError:
        return False


def expand_inputs(inputs: str | Path | Sequence[str | Path], input_format: InputFormat = "auto") -> list[Path]:
    """Files named by `inputs`: each a file, a directory (searched recursively, hidden files
    left out, and with input_format "auto" only files of a known suffix) or a glob pattern.
    Sorted within each input, so that the order of documents is the same on every run."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and (input_format != "auto" or _has_known_suffix(p)))
            if not found:
                known = f" with a known suffix ({', '.join(FORMAT_OF_SUFFIX)})" if input_format == "auto" else ""
                raise FileNotFoundError(f"{path}: the directory holds no input files{known}")
        elif path.exists():  # a file, or a named pipe streaming one
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if not Path(p).is_dir())
            if not found:
                raise FileNotFoundError(f"{spec}: no such file or directory, and no file matches it as a glob")
        files.extend(found)
    return list(dict.fromkeys(files))  # an input named twice is read once


@contextlib.contextmanager
def open_binary(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(decompressed stream, raw file): the raw file's position tells how much input was read."""
    with open(path, "rb") as raw:
        name = path.name.lower()
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream, raw
        elif name.endswith(".zst"):
            import zstandard

            # read_across_frames: files from pzstd or `cat a.zst b.zst` hold several frames;
            # max_window_size: files compressed with --long need windows beyond the default 128 MB.
            decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
            with io.BufferedReader(decompressor.stream_reader(raw, read_across_frames=True)) as stream:
                yield stream, raw
        else:
            yield raw, raw


class DocumentReader:
    """Iterates the documents of `inputs` (files, directories, globs; or for "hf" a dataset name
    or local data files). Records that cannot be read raise InvalidInputError naming the file and
    line, or with skip_invalid are skipped and counted by reason in `skipped`; empty documents
    (nothing but whitespace) are always skipped and counted as "empty". With several keys a record
    is skipped as a whole, so that document i of every key comes from the same record."""

    def __init__(self, inputs: str | Path | Sequence[str | Path], keys: Sequence[str] = ("text",),
                 input_format: InputFormat = "auto", text_mode: TextMode = "file",
                 skip_invalid: bool = False, hf_split: str = "train", hf_name: str | None = None,
                 hf_data_dir: str | None = None):
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        self.inputs = [str(spec) for spec in inputs]
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError("at least one key is needed")
        self.input_format = input_format
        self.text_mode = text_mode
        self.skip_invalid = skip_invalid
        # A Hugging Face dataset's split, configuration (subset) and folder within the dataset.
        self.hf_split, self.hf_name, self.hf_data_dir = hf_split, hf_name, hf_data_dir
        self.skipped: Counter[str] = Counter()
        self.files = [] if input_format == "hf" else expand_inputs(self.inputs, input_format)
        self.formats = [input_format if input_format != "auto" else detect_format(f) for f in self.files]
        # Size on disk (compressed where compressed): the denominator of progress and ETA.
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        self._done_bytes = 0
        self._position: Callable[[], int] = lambda: 0

    @property
    def bytes_read(self) -> int:
        """Input bytes consumed so far (compressed bytes for compressed files)."""
        return self._done_bytes + self._position()

    def __iter__(self) -> Iterator[Document]:
        if self.input_format == "hf":
            yield from self._read_hf()
            return
        readers = {"jsonl": self._read_jsonl, "text": self._read_text, "parquet": self._read_parquet}
        for path, fmt in zip(self.files, self.formats):
            try:
                yield from readers[fmt](path)
            finally:  # the position function may refer to a file now closed
                self._position = lambda: 0
            self._done_bytes += path.stat().st_size

    # -- bad records ------------------------------------------------------------------------------

    def _invalid(self, reason: str, where: str, detail: str, count: int = 1) -> None:
        """Raise for a bad record, or with skip_invalid count it (and log the first few)."""
        if not self.skip_invalid:
            raise InvalidInputError(f"{where}: {detail} (skip such records with --skip-invalid)")
        self.skipped[reason] += count
        if self.skipped[reason] <= _WARNINGS_PER_REASON:
            log.warning("skipped %s: %s", where, detail)

    def _texts_of(self, record: Mapping, where: str) -> tuple[str, ...] | None:
        """The texts of `keys` in a record, or None when it is skipped."""
        texts = []
        for key in self.keys:
            if key not in record:
                self._invalid("missing_key", where, f"no key {key!r} (keys: {', '.join(map(repr, list(record)[:10]))})")
                return None
            value = record[key]
            if not isinstance(value, str):
                self._invalid("not_a_string", where, f"{key!r} is {type(value).__name__} {_preview(value)}, not a string")
                return None
            texts.append(value)
        if any(not text or text.isspace() for text in texts):
            self.skipped["empty"] += 1
            return None
        return tuple(texts)

    # -- formats ----------------------------------------------------------------------------------

    def _read_jsonl(self, path: Path) -> Iterator[Document]:
        source = str(path)
        with open_binary(path) as (stream, raw):
            self._position = _position_of(raw)
            for number, line in enumerate(stream, 1):
                where = f"{path}:{number}"
                try:
                    # utf-8-sig on the first line: editors on Windows start files with a BOM.
                    text = line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    self._invalid("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})")
                    continue
                if not text or text.isspace():
                    self.skipped["empty"] += 1
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    self._invalid("malformed_json", where, f"malformed JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(record, dict):
                    self._invalid("not_an_object", where, f"expected a JSON object, got {type(record).__name__} {_preview(record)}")
                    continue
                texts = self._texts_of(record, where)
                if texts is None:
                    continue
                if any(_LONE_SURROGATE.search(t) for t in texts):
                    self._invalid("invalid_utf8", where, "a \\u escape encodes a lone surrogate, which is not valid Unicode text")
                    continue
                yield Document(texts, source, number)

    def _read_text(self, path: Path) -> Iterator[Document]:
        if len(self.keys) != 1:
            raise InvalidInputError(f"{path}: plain text has one text per document, but {len(self.keys)} keys were asked for")
        source = str(path)
        with open_binary(path) as (stream, raw):
            self._position = _position_of(raw)
            if self.text_mode == "file":
                data = stream.read()
                try:
                    text = data.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    line = data.count(b"\n", 0, e.start) + 1
                    self._invalid("invalid_utf8", f"{path}:{line}", f"invalid UTF-8 ({e.reason})")
                    return
                if not text or text.isspace():
                    self.skipped["empty"] += 1
                    return
                yield Document((text,), source, 1)
                return
            for number, line in enumerate(stream, 1):
                try:
                    text = line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    self._invalid("invalid_utf8", f"{path}:{number}", f"invalid UTF-8 at byte {e.start} of the line ({e.reason})")
                    continue
                if not text or text.isspace():
                    self.skipped["empty"] += 1
                    continue
                yield Document((text,), source, number)

    def _read_parquet(self, path: Path) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = str(path)
        parquet = pq.ParquetFile(path)
        num_rows, size = parquet.metadata.num_rows, path.stat().st_size
        schema = parquet.schema_arrow
        for key in self.keys:
            # A missing or non-text column makes every row of the file bad: report it once.
            if key not in schema.names:
                self._invalid("missing_key", str(path), f"no column {key!r} (columns: {', '.join(schema.names)})", num_rows)
                return
            column_type = schema.field(key).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                self._invalid("not_a_string", str(path), f"column {key!r} holds {column_type}, not strings", num_rows)
                return
        rows_read = 0
        self._position = lambda: size * rows_read // max(num_rows, 1)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(self.keys)):
            columns = [batch.column(key).to_pylist() for key in self.keys]
            for offset, values in enumerate(zip(*columns)):
                row = rows_read + offset + 1
                for key, value in zip(self.keys, values):
                    if value is None:
                        self._invalid("not_a_string", f"{path}, row {row}", f"{key!r} is null, not a string")
                        break
                else:
                    if any(not text or text.isspace() for text in values):
                        self.skipped["empty"] += 1
                    else:
                        yield Document(tuple(values), source, row)
            rows_read += batch.num_rows

    def _read_hf(self) -> Iterator[Document]:
        """A Hugging Face dataset, streamed: local data files (or a directory of them), else a hub
        name (which needs the network)."""
        import datasets

        try:
            local = expand_inputs(self.inputs, "hf")
        except FileNotFoundError:
            local = []
        if len(self.inputs) == 1 and Path(self.inputs[0]).is_dir():
            source = self.inputs[0]
            dataset = datasets.load_dataset(source, self.hf_name, data_dir=self.hf_data_dir, split=self.hf_split,
                                            streaming=True)
        elif local:
            source = ", ".join(self.inputs)
            formats = {_hf_file_format(p) for p in local}
            if len(formats) != 1:
                raise InvalidInputError(f"{source}: data files of one format are needed, got {sorted(formats)}")
            builder = HF_BUILDER_OF_FORMAT[formats.pop()]
            dataset = datasets.load_dataset(builder, data_files=[str(p) for p in local], split=self.hf_split, streaming=True)
        else:
            source = self.inputs[0]
            if len(self.inputs) != 1:
                raise InvalidInputError(f"{', '.join(self.inputs)}: one Hugging Face dataset name at a time")
            dataset = datasets.load_dataset(source, self.hf_name, data_dir=self.hf_data_dir, split=self.hf_split,
                                            streaming=True)
        for row, record in enumerate(dataset, 1):
            texts = self._texts_of(record, f"{source}, row {row}")
            if texts is not None:
                yield Document(texts, source, row)


def _position_of(raw: BinaryIO) -> Callable[[], int]:
    """How far into a file reading has got; a pipe cannot tell (progress then shows no bytes)."""
    return raw.tell if raw.seekable() else (lambda: 0)


def _hf_file_format(path: Path) -> str:
    name = path.name.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    if name.endswith(".csv"):
        return "csv"
    return detect_format(path)


def _preview(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
