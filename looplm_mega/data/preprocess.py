"""Preprocessing: raw corpora -> tokenized Megatron-compatible `{prefix}_{key}_document.bin/.idx`.

One pass, three stages that overlap:

    main process: read documents (readers.py) -> batches of texts
    N workers:    tokenize a batch -> (flat token array, lengths)
    main process: write the arrays in input order (IndexedDatasetWriter.add_documents)

Byte-level BPE tokenizers encode through tiktoken (fast_bpe.py) when it gives exactly the
tokenizer's ids on a verification sample, else through the `tokenizers` library's batch encoder.
The sample is every token of the vocabulary, checked before the run, and the first verify_chars
characters of the input, which the main process encodes both ways (and writes as `tokenizers`
gives them) before it hands the rest to tiktoken; so a stream is read once.

With workers=1 the encoding runs in the main process (no inter-process copies). Nothing holds
more than a few batches at once, so inputs larger than memory stream through. With partitions=N
the input files are split into N contiguous groups of about equal size, processed concurrently
(each with workers // N encoders) into partial outputs and merged in order, so the result equals
that of one partition byte for byte; this parallelises the reading and JSON parsing too, which
one main process does alone otherwise. Outputs appear only when complete: on an error or Ctrl-C
the writers abort and partial outputs are removed.

tools/preprocess_data.py is the command line over `preprocess(PreprocessConfig(...))`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import time
from collections import Counter, deque
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from looplm_mega.config import ConfigError
from looplm_mega.data.fast_bpe import FastEncoder, fast_encoder, first_mismatch, vocabulary_texts
from looplm_mega.data.indexed import (IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, data_path, index_path,
                                      token_dtype)
from looplm_mega.data.readers import Document, DocumentReader, InputFormat, InvalidInputError, TextMode
from looplm_mega.data.tokenizer import EOD_TOKEN, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    input: list[str]  # files, directories or globs; for input_format "hf" a dataset name or local data files
    output_prefix: str
    tokenizer: str  # tokenizer.json, a local Hugging Face tokenizer directory, or a hub name ...
    merge_file: Optional[str] = None  # ... or a GPT-2 style vocab.json, with this merges.txt
    json_keys: list[str] = field(default_factory=lambda: ["text"])  # one output per key
    input_format: InputFormat = "auto"
    text_mode: TextMode = "file"  # plain text: one document per file, or one per line
    hf_split: str = "train"
    hf_name: Optional[str] = None  # a Hugging Face dataset's configuration (subset)
    hf_data_dir: Optional[str] = None  # a folder within a Hugging Face dataset
    workers: int = 1
    partitions: int = 1
    append_eod: bool = False
    eod_token: str = EOD_TOKEN
    skip_invalid: bool = False
    allow_empty: bool = False  # write empty outputs when no document is left, instead of failing
    batch_documents: int = 512  # documents per encoding batch ...
    batch_chars: int = 4_000_000  # ... or fewer, when they are long
    log_interval: int = 100_000  # documents between progress lines
    fast_bpe: bool = True  # tiktoken for byte-level BPE where it verifiably gives the same ids
    verify_chars: int = 1_000_000  # characters at the head of each partition's input that verify tiktoken

    def __post_init__(self) -> None:
        if isinstance(self.input, (str, Path)):
            self.input = [str(self.input)]
        if not self.input:
            raise ConfigError("input: no input given")
        for name in ("workers", "partitions", "batch_documents", "batch_chars", "log_interval", "verify_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.json_keys:
            raise ConfigError("json_keys: at least one key is needed")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise ConfigError(f"json_keys: a key is given twice in {self.json_keys}")
        if self.input_format == "text" and len(self.json_keys) != 1:
            raise ConfigError(f"json_keys: plain text has one text per document, got {self.json_keys}")
        if self.input_format == "hf" and self.partitions > 1:
            raise ConfigError("partitions: a Hugging Face dataset streams as one source; use partitions 1")


def output_prefix(prefix: str | Path, key: str) -> str:
    """Megatron's naming: `{prefix}_{key}_document`."""
    return f"{prefix}_{key}_document"


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # per key
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # per reason
    outputs: dict[str, str] = field(default_factory=dict)  # key -> output prefix

    def add(self, other: "PreprocessSummary") -> None:
        """Fold in the summary of another partition."""
        self.documents += other.documents
        self.tokens = dict(Counter(self.tokens) + Counter(other.tokens))
        self.input_bytes += other.input_bytes
        self.skipped = dict(Counter(self.skipped) + Counter(other.skipped))

    def format(self) -> str:
        seconds = max(self.seconds, 1e-9)
        total_tokens = sum(self.tokens.values())
        skipped = ", ".join(f"{reason} {count:,}" for reason, count in sorted(self.skipped.items())) or "none"
        lines = [f"documents: {self.documents:,} in {self.seconds:.1f} s ({self.documents / seconds:,.0f} docs/s)",
                 f"tokens: {total_tokens:,} ({total_tokens / seconds:,.0f} tokens/s)"
                 + (f": {', '.join(f'{k} {v:,}' for k, v in self.tokens.items())}" if len(self.tokens) > 1 else ""),
                 f"input: {self.input_bytes / 1e6:,.1f} MB ({self.input_bytes / 1e6 / seconds:,.1f} MB/s)",
                 f"skipped: {skipped}"]
        lines += [f"output: {prefix}.bin/.idx" for prefix in self.outputs.values()]
        return "\n".join(lines)


class BatchEncoder:
    """Tokenizes a batch of texts into one flat token array and the length of each document,
    through `fast` (a verified tiktoken encoder) when given, else the tokenizer's batch encoder."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, eod_id: Optional[int] = None,
                 fast: Optional[FastEncoder] = None):
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        self.eod_id = eod_id
        self.fast = fast
        # encode_batch_fast (tokenizers >= 0.20) gives the same ids without computing offsets.
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.fast is not None:
            arrays = self.fast.encode(texts)
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            tokens = np.concatenate(arrays).astype(self.dtype) if arrays else np.zeros(0, self.dtype)
        else:
            ids = [encoding.ids for encoding in self._encode(texts)]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        if self.eod_id is not None:
            tokens = np.insert(tokens, np.cumsum(lengths), self.eod_id)  # after the end of each document
            lengths += 1
        return tokens, lengths


# -- encoding workers ----------------------------------------------------------------------------

_worker_encoder: Optional[BatchEncoder] = None


def _init_worker(tokenizer_json: str, dtype: str, eod_id: Optional[int], fast: bool) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and terminates the pool;
    # workers that raised too would only print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool stops its workers with SIGTERM: take its default action, whatever the parent set.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # see _one_thread_per_encoder
    global _worker_encoder
    tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_encoder = BatchEncoder(tokenizer, np.dtype(dtype), eod_id, fast_encoder(tokenizer)[0] if fast else None)


def _encode_in_worker(texts_per_key: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [_worker_encoder(texts) for texts in texts_per_key]


@contextlib.contextmanager
def _one_thread_per_encoder() -> Iterator[None]:
    """The Rust tokenizer spreads a batch over every core unless told otherwise; here `workers`
    alone says how many cores the encoding takes (N workers, N cores, as in Megatron), so each
    encoding process runs one thread. A TOKENIZERS_PARALLELISM set by the user wins."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def ordered_map(fn: Callable, items: Iterable, pool=None, max_pending: int = 4) -> Iterator:
    """fn over items, results in input order, through `pool` when given. Unlike Pool.imap, whose
    feeder thread reads the whole input ahead (unbounded memory on a corpus larger than RAM),
    this reads the next item only when fewer than `max_pending` results are outstanding. Results
    already done are handed on at once, so that a slow input (a pipe) still flows to the output."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        while pending and (len(pending) >= max_pending or pending[0].ready()):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def batch_texts(documents: Iterable[Document], num_keys: int, max_documents: int, max_chars: int) -> Iterator[list[list[str]]]:
    """Documents grouped into batches: per key, the list of texts of the batch's documents."""
    batch: list[list[str]] = [[] for _ in range(num_keys)]
    chars = 0
    for document in documents:
        for texts, text in zip(batch, document.texts):
            texts.append(text)
            chars += len(text)
        if len(batch[0]) >= max_documents or chars >= max_chars:
            yield batch
            batch, chars = [[] for _ in range(num_keys)], 0
    if batch[0]:
        yield batch


# -- progress ------------------------------------------------------------------------------------

class Progress:
    """A periodic log line with rates, and an ETA from the input bytes read against their total."""

    def __init__(self, total_bytes: int, interval: int, label: str = ""):
        self.total_bytes, self.interval, self.label = total_bytes, interval, label
        self.start = time.perf_counter()
        self.documents = self.tokens = self.bytes_read = 0
        self._next_log = interval
        self._logged_documents = -1

    def update(self, documents: int, tokens: int, bytes_read: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes_read = bytes_read
        if self.documents >= self._next_log:
            self._next_log = (self.documents // self.interval + 1) * self.interval
            self.log()

    def finish(self) -> None:
        """The last line, unless the last update just logged it."""
        if self._logged_documents != self.documents:
            self.log()

    def log(self) -> None:
        self._logged_documents = self.documents
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        line = (f"{self.label}{self.documents:,} docs ({self.documents / elapsed:,.0f} docs/s), "
                f"{self.tokens:,} tokens ({self.tokens / elapsed:,.0f} tokens/s), "
                f"{self.bytes_read / 1e6:,.1f} MB ({self.bytes_read / 1e6 / elapsed:,.1f} MB/s)")
        if self.total_bytes and self.bytes_read:
            remaining = max(self.total_bytes - self.bytes_read, 0) * elapsed / self.bytes_read
            line += f", {self.bytes_read / self.total_bytes:.0%} of {self.total_bytes / 1e6:,.1f} MB, " \
                    f"ETA {datetime.timedelta(seconds=round(remaining))}"
        log.info(line)


# -- one partition -------------------------------------------------------------------------------

@dataclass
class _Job:
    """What one partition needs; plain data, so that it can travel to another process."""
    config: PreprocessConfig
    inputs: list[str]
    prefix: str
    workers: int
    tokenizer_json: str
    eod_id: Optional[int]
    fast_bpe: bool  # tiktoken can express the tokenizer and agrees on its vocabulary; the input's head decides
    label: str = ""
    partial: bool = False  # one partition of several: emptiness is judged on their sum


class PartitionCancelled(RuntimeError):
    """Another partition failed; this one stopped early."""


_stop_event: Optional[multiprocessing.synchronize.Event] = None


def _set_stop_event(event) -> None:
    global _stop_event
    _stop_event = event


def _preprocess_job(job: _Job) -> PreprocessSummary:
    config = job.config
    keys = config.json_keys
    tokenizer = Tokenizer.from_str(job.tokenizer_json)
    dtype = token_dtype(tokenizer.get_vocab_size())
    reader = DocumentReader(job.inputs, keys, config.input_format, config.text_mode, config.skip_invalid, config.hf_split,
                            config.hf_name, config.hf_data_dir)
    # The input position when each batch was cut: progress reports it when the batch is written,
    # not the reader's position, which runs ahead by the batches in flight.
    positions: deque[int] = deque()

    def batches() -> Iterator[list[list[str]]]:
        for batch in batch_texts(reader, len(keys), config.batch_documents, config.batch_chars):
            positions.append(reader.bytes_read)
            yield batch

    progress = Progress(reader.total_bytes, config.log_interval, job.label)
    summary = PreprocessSummary(outputs={key: output_prefix(job.prefix, key) for key in keys})
    with ExitStack() as stack:
        # Writers first, so that they exit (finalize, or abort on an error) after the pool is gone.
        writers = [stack.enter_context(IndexedDatasetWriter(summary.outputs[key], dtype)) for key in keys]
        stack.enter_context(_one_thread_per_encoder())
        for encoded in _encoded_batches(job, tokenizer, dtype, batches(), stack):
            if _stop_event is not None and _stop_event.is_set():
                raise PartitionCancelled(f"{job.label}stopped because another partition failed")
            for writer, (tokens, lengths) in zip(writers, encoded):
                writer.add_documents(tokens, lengths)
            progress.update(len(encoded[0][1]), sum(len(tokens) for tokens, _ in encoded), positions.popleft())
        progress.finish()
        summary.documents = writers[0].num_documents
        summary.tokens = {key: writer.num_tokens for key, writer in zip(keys, writers)}
        summary.skipped = dict(reader.skipped)
        if not job.partial:
            check_not_empty(summary, config)  # before the writers finish: an empty run leaves nothing
    summary.input_bytes = reader.total_bytes
    summary.seconds = time.perf_counter() - progress.start
    return summary


def _encoded_batches(job: _Job, tokenizer: Tokenizer, dtype: np.dtype, batches: Iterator[list[list[str]]],
                     stack: ExitStack) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """The batches encoded, in order: the head by the main process both ways (tiktoken must agree
    with `tokenizers`), the rest by the workers (a pool entered into `stack`) or in-process."""
    plain = BatchEncoder(tokenizer, dtype, job.eod_id)
    encoder = BatchEncoder(tokenizer, dtype, job.eod_id, fast_encoder(tokenizer)[0]) if job.fast_bpe else plain
    checked, start = 0, time.perf_counter()
    while encoder is not plain and checked < job.config.verify_chars:
        batch = next(batches, None)
        if batch is None:
            log.info("%sthe input ended within tiktoken's verification sample: encoded with the tokenizers library "
                     "(tiktoken agreed on all of it)", job.label)
            return
        expected = [plain(texts) for texts in batch]
        for texts, (tokens, lengths) in zip(batch, expected):
            fast_tokens, fast_lengths = encoder(texts)
            if not (np.array_equal(tokens, fast_tokens) and np.array_equal(lengths, fast_lengths)):
                log.warning("%sencoding with the tokenizers library: tiktoken differs on the input's head: %s",
                            job.label, first_mismatch(tokenizer, encoder.fast, texts))
                encoder = plain
                break
            checked += sum(map(len, texts))
        yield expected
    if encoder is not plain:
        log.info("%sencoding with tiktoken: the same ids as the tokenizer on the input's first %.1f MB of text "
                 "(checked in %.1f s)", job.label, checked / 1e6, time.perf_counter() - start)
    if job.workers > 1:
        pool = stack.enter_context(multiprocessing.Pool(
            job.workers, initializer=_init_worker,
            initargs=(job.tokenizer_json, dtype.str, job.eod_id, encoder is not plain)))
        yield from ordered_map(_encode_in_worker, batches, pool, max_pending=2 * job.workers + 2)
    else:
        yield from ([encoder(texts) for texts in batch] for batch in batches)


# -- the whole run -------------------------------------------------------------------------------

def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize `config.input` into `{output_prefix}_{key}_document.bin/.idx` for each key."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(config.tokenizer, config.merge_file)
    eod_id = None
    if config.append_eod:
        eod_id = tokenizer.token_to_id(config.eod_token)
        if eod_id is None:
            raise ConfigError(f"eod_token: the tokenizer {config.tokenizer} has no token {config.eod_token!r} to append")
    log.info("tokenizer %s: vocabulary %d, tokens stored as %s", config.tokenizer, tokenizer.get_vocab_size(),
             token_dtype(tokenizer.get_vocab_size()))
    if config.input_format == "hf":
        groups = [list(config.input)]
    else:
        # Build a reader over everything first: it checks that the inputs exist and have a known format.
        files = DocumentReader(config.input, config.json_keys, config.input_format, config.text_mode).files
        groups = [[str(f) for f in group] for group in split_files(files, config.partitions)]
        log.info("%d input files, %.1f MB%s", len(files), sum(f.stat().st_size for f in files) / 1e6,
                 f", in {len(groups)} partitions" if len(groups) > 1 else "")
    fast_bpe = config.fast_bpe and _fast_bpe_possible(tokenizer)
    if len(groups) == 1:
        summary = _preprocess_job(_Job(config, groups[0], config.output_prefix, config.workers, tokenizer.to_str(), eod_id,
                                       fast_bpe))
    else:
        jobs = [_Job(config, group, f"{config.output_prefix}_part{i}", max(1, config.workers // len(groups)),
                     tokenizer.to_str(), eod_id, fast_bpe, label=f"[part {i + 1}/{len(groups)}] ", partial=True)
                for i, group in enumerate(groups)]
        summary = _run_partitions(jobs, config)
    summary.seconds = time.perf_counter() - start
    return summary


def _fast_bpe_possible(tokenizer: Tokenizer) -> bool:
    """Whether tiktoken can encode for `tokenizer` (fast_bpe.py): a shape it can express, and the
    same ids for every token of the vocabulary. The head of the input is checked as it is read."""
    encoder, reason = fast_encoder(tokenizer)
    if encoder is None:
        log.info("encoding with the tokenizers library: %s", reason)
        return False
    mismatch = first_mismatch(tokenizer, encoder, vocabulary_texts(tokenizer))
    if mismatch:
        log.warning("encoding with the tokenizers library: tiktoken differs on a token of the vocabulary: %s", mismatch)
        return False
    return True


def check_not_empty(summary: PreprocessSummary, config: PreprocessConfig) -> None:
    """A run that leaves no document is an error (a wrong key, format or glob), unless allowed."""
    if summary.documents == 0 and not config.allow_empty:
        skipped = ", ".join(f"{reason} {count:,}" for reason, count in sorted(summary.skipped.items()) if count)
        raise InvalidInputError(f"{', '.join(config.input[:3])}{' ...' if len(config.input) > 3 else ''}: no documents "
                                f"to write (skipped: {skipped or 'none'}); nothing written (--allow-empty writes empty outputs)")


def split_files(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """Up to `parts` groups of consecutive files, of about equal bytes each. Consecutive, so that
    merging the groups' outputs in order gives the documents in the order of the files."""
    sizes = np.array([max(Path(f).stat().st_size, 1) for f in files], dtype=np.float64)
    middles = np.cumsum(sizes) - sizes / 2  # a file goes to the group its middle byte falls in
    group_of = np.minimum((middles / sizes.sum() * parts).astype(np.int64), parts - 1)
    return [[f for f, g in zip(files, group_of) if g == group] for group in np.unique(group_of)]


def _run_partitions(jobs: list[_Job], config: PreprocessConfig) -> PreprocessSummary:
    """Run the partitions concurrently, then merge their outputs key by key."""
    stop = multiprocessing.Event()
    try:
        with ProcessPoolExecutor(len(jobs), initializer=_set_stop_event, initargs=(stop,)) as executor:
            futures = [executor.submit(_preprocess_job, job) for job in jobs]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    raise failed[0].exception()
            except BaseException:
                stop.set()  # the other partitions abort at their next batch
                raise
            parts = [f.result() for f in futures]
        summary = PreprocessSummary()
        for part in parts:
            summary.add(part)
        check_not_empty(summary, config)
        for key in config.json_keys:
            summary.outputs[key] = output_prefix(config.output_prefix, key)
            log.info("merging %d partitions into %s", len(jobs), summary.outputs[key])
            merge_datasets([part.outputs[key] for part in parts], summary.outputs[key])
        return summary
    finally:
        for job in jobs:
            for key in config.json_keys:
                remove_dataset_files(output_prefix(job.prefix, key))


def remove_dataset_files(prefix: str | Path) -> None:
    """Delete a pair and the temporary files an unfinished IndexedDatasetWriter leaves."""
    for suffix in (".bin", ".idx", ".bin.tmp", ".idx.tmp", ".lengths.tmp", ".docs.tmp"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)


def merge_datasets(inputs: Sequence[str | Path], output: str | Path) -> tuple[int, int]:
    """Concatenate datasets (in order) into `output`; returns (documents, tokens). All inputs are
    checked before anything is written: they must exist, be valid and share one token dtype."""
    if not inputs:
        raise ValueError("no datasets to merge")
    prefixes = [_strip_extension(p) for p in inputs]
    datasets = [IndexedDataset(p) for p in prefixes]
    for prefix, dataset in zip(prefixes[1:], datasets[1:]):
        if dataset.dtype != datasets[0].dtype:
            raise IndexedDatasetError(
                f"{prefix}.idx: tokens of dtype {dataset.dtype}, but {prefixes[0]}.idx holds {datasets[0].dtype}; "
                f"datasets made with tokenizers of different vocabulary sizes cannot be merged")
    del datasets  # add_dataset opens each one again
    with IndexedDatasetWriter(output, np.dtype(IndexedDataset(prefixes[0]).dtype)) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
    return writer.num_documents, writer.num_tokens


def datasets_in(directory: str | Path) -> list[str]:
    """The prefixes of the .bin/.idx pairs in `directory`, in the order of their names (as
    Megatron-LM's merge_datasets.py --input); a .bin or .idx without its other half is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexedDatasetError(f"{directory}: not a directory")
    halves = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".idx") and p.is_file())
    prefixes = sorted({str(p.with_suffix("")) for p in halves})
    for prefix in prefixes:
        for path in (data_path(prefix), index_path(prefix)):
            if not path.is_file():
                raise IndexedDatasetError(f"{path}: missing, but {directory} holds the other half of its pair")
    if not prefixes:
        raise IndexedDatasetError(f"{directory}: no .bin/.idx datasets in this directory")
    return prefixes


def _strip_extension(prefix: str | Path) -> str:
    """Accept `name.bin` or `name.idx` for the prefix `name`."""
    text = str(prefix)
    return text[:-4] if text.endswith((".bin", ".idx")) else text
