import json
import multiprocessing

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from looplm_mega.config import ConfigError, from_dict
from looplm_mega.data.fast_bpe import fast_encoder
from looplm_mega.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from looplm_mega.data.preprocess import (BatchEncoder, PreprocessConfig, batch_texts, merge_datasets, ordered_map,
                                         output_prefix, preprocess, split_files)
from looplm_mega.data.readers import Document, InvalidInputError
from looplm_mega.data.stdlib_corpus import stdlib_documents
from looplm_mega.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def texts():
    # Real, varied documents: pieces of stdlib files of a few hundred to a few thousand characters.
    corpus = "".join(stdlib_documents(max_bytes=100_000))
    return [corpus[2000 * i : 2000 * i + 100 + 37 * i] for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer(texts, vocab_size=400, path=path)
    return path


def _jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


def _config(tmp_path, tokenizer_path, inputs, **kwargs):
    return PreprocessConfig(input=[str(p) for p in inputs], output_prefix=str(tmp_path / "out" / "corpus"),
                            tokenizer=str(tokenizer_path), **kwargs)


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _files(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_tokens_equal_tokenizer_encode_of_each_document(tmp_path, tokenizer_path, texts):
    config = _config(tmp_path, tokenizer_path, [_jsonl(tmp_path / "a.jsonl", texts)])
    summary = preprocess(config)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    prefix = output_prefix(config.output_prefix, "text")
    assert _documents(prefix) == [tokenizer.encode(t).ids for t in texts]
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.uint16 and dataset.num_documents == len(texts)
    assert summary.documents == len(texts) and summary.tokens == {"text": dataset.num_tokens}
    assert summary.outputs == {"text": prefix} and summary.skipped == {}
    assert _files(tmp_path / "out") == ["corpus_text_document.bin", "corpus_text_document.idx"]
    assert "documents: 40" in summary.format()


def test_append_eod_ends_every_document_with_eod(tmp_path, tokenizer_path, texts):
    config = _config(tmp_path, tokenizer_path, [_jsonl(tmp_path / "a.jsonl", texts[:5])], append_eod=True)
    preprocess(config)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert _documents(output_prefix(config.output_prefix, "text")) == [tokenizer.encode(t).ids + [0] for t in texts[:5]]


def test_append_eod_needs_the_eod_token(tmp_path, tokenizer_path, texts):
    config = _config(tmp_path, tokenizer_path, [_jsonl(tmp_path / "a.jsonl", texts[:2])], append_eod=True, eod_token="</s>")
    with pytest.raises(ConfigError, match="has no token '</s>'"):
        preprocess(config)


def test_one_output_per_key(tmp_path, tokenizer_path, texts):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t, "title": t[:20]}) + "\n" for t in texts[:6]))
    summary = preprocess(_config(tmp_path, tokenizer_path, [path], json_keys=["text", "title"]))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert _documents(summary.outputs["title"]) == [tokenizer.encode(t[:20]).ids for t in texts[:6]]
    assert _documents(summary.outputs["text"]) == [tokenizer.encode(t).ids for t in texts[:6]]
    assert set(summary.tokens) == {"text", "title"}


def _outputs_of(tmp_path, tokenizer_path, inputs, name, **kwargs):
    config = _config(tmp_path, tokenizer_path, inputs, **kwargs)
    config.output_prefix = str(tmp_path / name / "corpus")
    preprocess(config)
    prefix = output_prefix(config.output_prefix, "text")
    return (tmp_path / name), open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_workers_and_partitions_give_byte_identical_outputs(tmp_path, tokenizer_path, texts):
    inputs = [_jsonl(tmp_path / f"{i}.jsonl", texts[i * 10 : (i + 1) * 10]) for i in range(4)]
    _, bin_1, idx_1 = _outputs_of(tmp_path, tokenizer_path, inputs, "one", batch_documents=3)
    _, bin_2, idx_2 = _outputs_of(tmp_path, tokenizer_path, inputs, "two", batch_documents=3, workers=2)
    assert bin_2 == bin_1 and idx_2 == idx_1
    directory, bin_p, idx_p = _outputs_of(tmp_path, tokenizer_path, inputs, "parts", batch_documents=3, partitions=3, workers=2)
    assert bin_p == bin_1 and idx_p == idx_1
    assert _files(directory) == ["corpus_text_document.bin", "corpus_text_document.idx"]  # partial outputs removed


def test_int32_tokens_for_a_large_vocabulary(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "words.json"))
    config = _config(tmp_path, tmp_path / "words.json", [_jsonl(tmp_path / "a.jsonl", ["w69999 w1 w65535", "w3"])])
    summary = preprocess(config)
    dataset = IndexedDataset(summary.outputs["text"])
    assert dataset.dtype == np.int32 and _documents(summary.outputs["text"]) == [[69999, 1, 65535], [3]]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_stops_the_run_and_leaves_no_output(tmp_path, tokenizer_path, texts, workers):
    path = _jsonl(tmp_path / "a.jsonl", texts)
    with path.open("a") as f:
        f.write('{"text": 42}\n')
    with pytest.raises(InvalidInputError, match=f"{path}:41: 'text' is int"):
        preprocess(_config(tmp_path, tokenizer_path, [path], workers=workers, batch_documents=4))
    assert _files(tmp_path / "out") == []


def test_skip_invalid_counts_by_reason(tmp_path, tokenizer_path, texts):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": texts[0]}), "{broken", json.dumps({"text": ""}), json.dumps({"body": "x"}),
             json.dumps({"text": texts[1]}), json.dumps({"text": ["a"]})]
    path.write_text("\n".join(lines) + "\n")
    summary = preprocess(_config(tmp_path, tokenizer_path, [path], skip_invalid=True))
    assert summary.documents == 2
    assert summary.skipped == {"malformed_json": 1, "empty": 1, "missing_key": 1, "not_a_string": 1}
    assert "skipped: empty 1, malformed_json 1, missing_key 1, not_a_string 1" in summary.format()


@pytest.mark.parametrize("workers", [1, 2])
def test_interruption_while_writing_leaves_no_output(tmp_path, tokenizer_path, texts, workers, monkeypatch):
    calls = []
    original = IndexedDatasetWriter.add_documents

    def interrupted(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, tokens, lengths)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(_config(tmp_path, tokenizer_path, [_jsonl(tmp_path / "a.jsonl", texts)], workers=workers, batch_documents=5))
    assert _files(tmp_path / "out") == []


def test_a_failing_partition_leaves_no_output(tmp_path, tokenizer_path, texts):
    good = _jsonl(tmp_path / "a.jsonl", texts[:20])
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": texts[20]}) + "\n{not json\n")
    with pytest.raises(InvalidInputError, match=f"{bad}:2: malformed JSON"):
        preprocess(_config(tmp_path, tokenizer_path, [good, bad], partitions=2))
    assert _files(tmp_path / "out") == []


def test_text_and_parquet_inputs(tmp_path, tokenizer_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(texts[:3]):
        (tmp_path / "docs" / f"{i}.txt").write_text(text)
    summary = preprocess(_config(tmp_path, tokenizer_path, [tmp_path / "docs"], input_format="text"))
    assert _documents(summary.outputs["text"]) == [tokenizer.encode(t).ids for t in texts[:3]]
    pq.write_table(pa.table({"content": texts[:5]}), tmp_path / "a.parquet", row_group_size=2)
    summary = preprocess(_config(tmp_path, tokenizer_path, [tmp_path / "a.parquet"], json_keys=["content"]))
    assert _documents(summary.outputs["content"]) == [tokenizer.encode(t).ids for t in texts[:5]]


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="workers: must be at least 1"):
        PreprocessConfig(input=["a"], output_prefix="o", tokenizer="t", workers=0)
    with pytest.raises(ConfigError, match="json_keys: a key is given twice"):
        PreprocessConfig(input=["a"], output_prefix="o", tokenizer="t", json_keys=["text", "text"])
    with pytest.raises(ConfigError, match="input_format: 'csv' is not one of"):
        from_dict(PreprocessConfig, {"input": ["a"], "output_prefix": "o", "tokenizer": "t", "input_format": "csv"})
    assert PreprocessConfig(input="a.jsonl", output_prefix="o", tokenizer="t").input == ["a.jsonl"]


def test_batch_encoder_appends_eod_vectorised():
    tokenizer = Tokenizer(models.WordLevel({"<eod>": 0, "a": 1, "b": 2}, unk_token="<eod>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokens, lengths = BatchEncoder(tokenizer, np.uint16, eod_id=0)(["a b", "b", "a a a"])
    assert tokens.tolist() == [1, 2, 0, 2, 0, 1, 1, 1, 0] and lengths.tolist() == [3, 2, 4]
    assert tokens.dtype == np.uint16


def test_batch_texts_cuts_by_count_and_by_size():
    documents = [Document((t, t.upper()), "f", i) for i, t in enumerate(["aa", "bbbb", "c", "dddddd", "e"])]
    assert list(batch_texts(documents, 2, max_documents=2, max_chars=1000)) == [
        [["aa", "bbbb"], ["AA", "BBBB"]], [["c", "dddddd"], ["C", "DDDDDD"]], [["e"], ["E"]]]
    assert [b[0] for b in batch_texts(documents, 2, max_documents=10, max_chars=10)] == [["aa", "bbbb"], ["c", "dddddd"], ["e"]]


def _square(x):
    return x * x


def test_ordered_map_keeps_order_and_reads_ahead_boundedly():
    consumed = []

    def items():
        for i in range(20):
            consumed.append(i)
            yield i

    # Not forked from this process: under pytest-xdist it has threads of its own, and a child forked
    # while one of them holds a lock waits forever.
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        results = ordered_map(_square, items(), pool, max_pending=3)
        assert next(results) == 0 and 1 <= len(consumed) <= 3  # not the whole input, as Pool.imap would
        assert list(results) == [i * i for i in range(1, 20)]
    assert list(ordered_map(_square, range(4))) == [0, 1, 4, 9]


def test_split_files_gives_consecutive_groups_of_similar_size(tmp_path):
    sizes = [100, 100, 100, 700, 50, 50]
    files = []
    for i, size in enumerate(sizes):
        files.append(tmp_path / f"{i}")
        files[-1].write_bytes(b"x" * size)
    groups = split_files(files, 2)
    assert [f for group in groups for f in group] == files
    assert [[f.name for f in g] for g in groups] == [["0", "1", "2"], ["3", "4", "5"]]
    assert len(split_files(files[:2], 5)) == 2 and split_files(files, 1) == [files]


def test_merge_datasets_checks_dtypes_before_writing(tmp_path):
    for name, dtype in (("a", np.uint16), ("b", np.uint16), ("c", np.int32)):
        with IndexedDatasetWriter(tmp_path / name, dtype) as writer:
            writer.add_documents(np.arange(3), [1, 2])
    assert merge_datasets([tmp_path / "a", str(tmp_path / "b.bin")], tmp_path / "ab") == (4, 6)
    assert _documents(tmp_path / "ab") == [[0], [1, 2], [0], [1, 2]]
    with pytest.raises(IndexedDatasetError, match=f"{tmp_path / 'c'}.idx: tokens of dtype int32, but .*a.idx holds uint16"):
        merge_datasets([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
    assert not list(tmp_path.glob("ac*"))


def test_tiktoken_path_writes_the_bytes_of_the_tokenizers_path(tmp_path, tokenizer_path, texts, caplog):
    corpus = _jsonl(tmp_path / "c.jsonl", texts * 40)  # past the verified head
    outputs = {}
    for fast_bpe, workers in ((False, 1), (True, 1), (True, 2)):
        config = _config(tmp_path / f"{fast_bpe}{workers}", tokenizer_path, [corpus], append_eod=True, workers=workers,
                         fast_bpe=fast_bpe, batch_documents=16)
        with caplog.at_level("INFO", logger="looplm_mega.data.preprocess"):
            preprocess(config)
        assert ("encoding with tiktoken" in caplog.text) == fast_bpe
        caplog.clear()
        prefix = output_prefix(config.output_prefix, "text")
        outputs[fast_bpe, workers] = [open(f"{prefix}{s}", "rb").read() for s in (".bin", ".idx")]
    assert outputs[False, 1] == outputs[True, 1] == outputs[True, 2]


def test_tiktoken_that_differs_on_the_input_head_is_dropped(tmp_path, tokenizer_path, texts, monkeypatch, caplog):
    import looplm_mega.data.preprocess as module

    class Wrong:  # a fast encoder that gets one document of the head wrong
        def __init__(self, encoder):
            self.encoder, self.added_tokens = encoder, encoder.added_tokens

        def encode(self, batch):
            return [array[:-1] if text == texts[3] else array for text, array in zip(batch, self.encoder.encode(batch))]

    monkeypatch.setattr(module, "fast_encoder", lambda tokenizer: (Wrong(fast_encoder(tokenizer)[0]), ""))
    config = _config(tmp_path, tokenizer_path, [_jsonl(tmp_path / "c.jsonl", texts)], batch_documents=2)
    with caplog.at_level("INFO", logger="looplm_mega.data.preprocess"):
        preprocess(config)
    assert "tiktoken differs on the input's head" in caplog.text and "encoding with tiktoken" not in caplog.text
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert _documents(output_prefix(config.output_prefix, "text")) == [tokenizer.encode(t).ids for t in texts]
