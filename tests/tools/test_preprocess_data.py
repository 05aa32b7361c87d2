import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from looplm_mega.data.indexed import IndexedDataset
from looplm_mega.data.stdlib_corpus import stdlib_documents
from looplm_mega.data.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/preprocess_data.py"


@pytest.fixture(scope="module")
def texts():
    corpus = "".join(stdlib_documents(max_bytes=60_000))
    return [corpus[1500 * i : 1500 * i + 300 + 11 * i] for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer(texts, vocab_size=350, path=path)
    return path


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _lines(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_gzipped_jsonl_to_megatron_named_outputs_with_eod(tmp_path, tokenizer_path, texts):
    (tmp_path / "corpus.jsonl.gz").write_bytes(gzip.compress(_lines(texts).encode()))
    done = _run("--input", tmp_path / "corpus.jsonl.gz", "--tokenizer", tokenizer_path,
                "--output-prefix", tmp_path / "out/c", "--append-eod", "--log-interval", "10", "--batch-documents", "4")
    assert done.returncode == 0, done.stderr
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    prefix = tmp_path / "out/c_text_document"
    assert _documents(prefix) == [tokenizer.encode(t).ids + [0] for t in texts]
    assert IndexedDataset(prefix).dtype == np.uint16
    assert "documents: 30 " in done.stdout and "skipped: none" in done.stdout
    # Progress lines every 10 documents, with rates and an ETA.
    progress = [line for line in done.stderr.splitlines() if "docs/s" in line]
    assert len(progress) == 3 and all("tokens/s" in line and "MB/s" in line and "ETA" in line for line in progress)


def test_bad_line_fails_with_file_and_line_unless_skipped(tmp_path, tokenizer_path, texts):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_lines(texts[:3]) + '{"text": "unterminated\n' + _lines(texts[3:5]) + '{"title": "x"}\n')
    done = _run("--input", path, "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "out/c")
    assert done.returncode == 1
    assert f"error: {path}:4: malformed JSON" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    done = _run("--input", path, "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "out/c", "--skip-invalid")
    assert done.returncode == 0, done.stderr
    assert "skipped: malformed_json 1, missing_key 1" in done.stdout
    assert f"skipped {path}:4: malformed JSON" in done.stderr  # the first few are logged with their place
    assert IndexedDataset(tmp_path / "out/c_text_document").num_documents == 5


def test_partitions_and_workers_match_a_single_process_run(tmp_path, tokenizer_path, texts):
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.jsonl").write_text(_lines(texts[i * 10 : (i + 1) * 10]))
    single = _run("--input", tmp_path / "in", "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "one/c")
    parts = _run("--input", tmp_path / "in/*.jsonl", "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "parts/c",
                 "--partitions", "2", "--workers", "2", "--batch-documents", "3")
    assert single.returncode == 0 and parts.returncode == 0, parts.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"parts/c_text_document{suffix}").read_bytes() == (tmp_path / f"one/c_text_document{suffix}").read_bytes()
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["c_text_document.bin", "c_text_document.idx"]
    assert "in 2 partitions" in parts.stderr and "[part 2/2]" in parts.stderr


def test_text_lines_and_json_keys(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    done = _run("--input", tmp_path / "a.txt", "--input-format", "text", "--text-mode", "line",
                "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "t", "--json-keys", "line")
    assert done.returncode == 0, done.stderr
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert _documents(tmp_path / "t_line_document") == [tokenizer.encode(t).ids for t in ("first line", "second line")]
    assert "skipped: empty 1" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "error: workers: must be at least 1"),
    (["--input-format", "text", "--json-keys", "a", "b"], "error: json_keys: plain text has one text per document"),
    (["--tokenizer", "missing/tokenizer.json"], "missing/tokenizer.json: tokenizer file or directory does not exist"),
    (["--tokenizer", "./missing_tokenizer"], "./missing_tokenizer: tokenizer file or directory does not exist"),
])
def test_bad_flags_give_a_clear_error(tmp_path, tokenizer_path, args, message):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    base = {"--input": tmp_path / "a.jsonl", "--tokenizer": tokenizer_path, "--output-prefix": tmp_path / "o"}
    flags = [str(v) for k, v in base.items() if k not in args for v in (k, v)] + args
    done = _run(*flags)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def _interruptible() -> None:
    """Ctrl-C as a terminal gives it: an ignored or blocked SIGINT is inherited across exec, and a
    test runner's worker process may hold one (seen in the full suite under xdist)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.mark.parametrize("workers, stop_signal, code, message", [
    (1, signal.SIGINT, 130, "interrupted: no output written"), (2, signal.SIGINT, 130, "interrupted: no output written"),
    (2, signal.SIGTERM, 143, "terminated: no output written")])
def test_ctrl_c_or_sigterm_leaves_no_output(tmp_path, tokenizer_path, texts, workers, stop_signal, code, message):
    # The input is a named pipe fed slowly: the tool is mid-run, waiting for input, when the
    # interruption comes, without a race against the end of a small file.
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, str(TOOL), "--input", str(fifo), "--tokenizer", str(tokenizer_path),
                                "--output-prefix", str(tmp_path / "out/c"), "--workers", str(workers),
                                "--batch-documents", "2", "--log-interval", "1"], stderr=subprocess.PIPE, text=True,
                               preexec_fn=_interruptible)
    stop = threading.Event()

    def feed():
        try:
            with open(fifo, "w") as writer:  # opens once the tool opens the pipe for reading
                for line in itertools.cycle(_lines(texts).splitlines(keepends=True)):
                    if stop.wait(0.02):
                        return
                    writer.write(line)
                    writer.flush()
        except BrokenPipeError:  # the tool has gone
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    watchdog = threading.Timer(60, process.kill)  # a hung tool fails the test instead of hanging it
    watchdog.start()
    try:
        # Wait for the first progress line: a batch is written, the run is under way.
        while "docs/s" not in (line := process.stderr.readline()):
            assert line, "the tool ended before writing anything"
        assert (tmp_path / "out/c_text_document.bin.tmp").exists()
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=30)
    finally:
        stop.set()
        watchdog.cancel()
        process.kill()
        feeder.join(timeout=5)
    assert process.returncode == code and message in stderr and "Traceback" not in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_megatron_command_lines_run_unchanged(tmp_path, tokenizer_path, texts):
    corpus = tmp_path / "corpus.json"  # Megatron's examples name their JSONL files .json
    corpus.write_text(_lines(texts))
    ours = _run("--input", corpus, "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "ours", "--append-eod")
    assert ours.returncode == 0, ours.stderr
    # GPT2BPETokenizer with a GPT-2 style vocab.json + merges.txt: the same tokenizer, the same bytes.
    Tokenizer.from_file(str(tokenizer_path)).model.save(str(tmp_path))
    gpt2 = _run("--input", corpus, "--output-prefix", tmp_path / "gpt2", "--vocab-file", tmp_path / "vocab.json",
                "--tokenizer-type", "GPT2BPETokenizer", "--merge-file", tmp_path / "merges.txt", "--append-eod",
                "--workers", "2", "--keep-sequential-samples")
    assert gpt2.returncode == 0, gpt2.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"gpt2_text_document{suffix}").read_bytes() == (tmp_path / f"ours_text_document{suffix}").read_bytes()
    # HuggingFaceTokenizer with a tokenizer directory: the EOD appended is its declared eos_token, as in Megatron.
    model = tmp_path / "hf_tokenizer"
    model.mkdir()
    (model / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "!"}))
    hf = _run("--input", corpus, "--output-prefix", tmp_path / "hf", "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", model, "--append-eod", "--workers", "1")
    assert hf.returncode == 0, hf.stderr
    eos = Tokenizer.from_file(str(tokenizer_path)).token_to_id("!")
    assert _documents(tmp_path / "hf_text_document") == [d[:-1] + [eos] for d in _documents(tmp_path / "ours_text_document")]


@pytest.mark.parametrize("args, message", [
    ([], "give --tokenizer, or Megatron's --tokenizer-type with its files"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-type HuggingFaceTokenizer takes --tokenizer-model"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"], "GPT2BPETokenizer takes --vocab-file and --merge-file"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "invalid choice: 'SentencePieceTokenizer'"),
])
def test_megatron_tokenizer_flags_need_their_files(tmp_path, args, message):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    done = _run("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def small_filesystem(tmp_path):
    """A mount point for a filesystem of a few pages (tmpfs), or a skip with the reason."""
    def mount(options):
        point = tmp_path / f"fs_{options.replace(',', '_').replace('=', '')}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point
    mounted = []
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_is_one_line_and_leaves_no_files(tmp_path, tokenizer_path, texts, small_filesystem, workers):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(_lines(texts * 20))  # about 180 KB of tokens: more than the filesystem holds
    full = small_filesystem("size=64k")
    done = _run("--input", corpus, "--tokenizer", tokenizer_path, "--output-prefix", full / "c", "--workers", workers,
                "--batch-documents", "8")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: no space left on the device holding {full}"
    assert list(full.iterdir()) == []


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, tokenizer_path, texts, small_filesystem):
    (tmp_path / "a.jsonl").write_text(_lines(texts))
    read_only = small_filesystem("ro,size=64k")
    done = _run("--input", tmp_path / "a.jsonl", "--tokenizer", tokenizer_path, "--output-prefix", read_only / "c")
    # Refused before any work, as every output whose folder cannot be written (looplm_mega/outputs.py).
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"cannot create it, {read_only} is not writable")


@pytest.mark.parametrize("lines, skipped", [("", "none"), ("\n".join(['{"text": " "}', '{"other": "x"}', "{bad"]) + "\n",
                                                               "empty 1, malformed_json 1, missing_key 1")])
def test_no_documents_left_fails_with_the_counts_unless_allowed(tmp_path, tokenizer_path, lines, skipped):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(lines)
    base = ["--input", corpus, "--tokenizer", tokenizer_path, "--skip-invalid", "--output-prefix"]
    done = _run(*base, tmp_path / "out/c")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {corpus}: no documents to write (skipped: {skipped}); nothing written" in done.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    done = _run(*base, tmp_path / "empty/c", "--allow-empty")
    assert done.returncode == 0, done.stderr
    assert _documents(tmp_path / "empty/c_text_document") == []
