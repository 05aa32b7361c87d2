import pytest

from looplm_mega.data.stdlib_corpus import stdlib_documents, write_stdlib_jsonl
from looplm_mega.data.tokenizer import EOD_TOKEN, eod_token_id, load_tokenizer, train_bpe_tokenizer


def test_stdlib_corpus_is_deterministic_and_bounded(tmp_path):
    first = list(stdlib_documents(max_bytes=200_000))
    assert first == list(stdlib_documents(max_bytes=200_000))
    assert 200_000 <= sum(map(len, first)) < 400_000
    path = tmp_path / "corpus.jsonl"
    assert write_stdlib_jsonl(path, max_bytes=50_000) == len(path.read_text().splitlines())
    assert not path.with_name("corpus.jsonl.tmp").exists()


def test_trained_tokenizer_round_trips_and_loads_from_file_or_directory(tmp_path):
    texts = list(stdlib_documents(max_bytes=300_000))
    path = tmp_path / "tokenizer.json"
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600, path=path)
    assert tokenizer.get_vocab_size() == 600 and eod_token_id(tokenizer) == 0
    sample = "def f(x):\n    return x ** 2  # é\n"
    for loaded in (load_tokenizer(path), load_tokenizer(tmp_path)):
        assert loaded.decode(loaded.encode(sample).ids) == sample
    assert tokenizer.token_to_id(EOD_TOKEN) == 0


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in this directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
