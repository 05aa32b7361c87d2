import pytest

from looplm_mega.data.stdlib_corpus import stdlib_documents, write_stdlib_jsonl
import json

from looplm_mega.data.tokenizer import (EOD_TOKEN, declared_eos_token, eod_token_id, gpt2_bpe_tokenizer, load_tokenizer,
                                        train_bpe_tokenizer)


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


def test_missing_tokenizer_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json \(nor vocab.json \+ merges.txt\) in this directory"):
        load_tokenizer(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    # Not on the hub's path: a file that does not exist, with or without .json, fails at once.
    for missing in (tmp_path / "nope.json", tmp_path / "nope", "./nope", "data/nope", "data/nope.json"):
        with pytest.raises(FileNotFoundError, match=f"{missing}: tokenizer file or directory does not exist"):
            load_tokenizer(missing)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")


def test_gpt2_style_vocab_and_merges_give_the_same_ids(tmp_path):
    texts = list(stdlib_documents(max_bytes=100_000))
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    tokenizer.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    sample = texts[3][:2000] + EOD_TOKEN + " tail"
    for loaded in (gpt2_bpe_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt"),
                   load_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt"), load_tokenizer(tmp_path)):
        assert loaded.encode(sample).ids == tokenizer.encode(sample).ids
    with pytest.raises(FileNotFoundError, match="merges.txt: merge file does not exist"):
        gpt2_bpe_tokenizer(tmp_path / "vocab.json", tmp_path / "missing" / "merges.txt")


def test_declared_eos_token(tmp_path):
    assert declared_eos_token(tmp_path) is None
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert declared_eos_token(tmp_path) == "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>", "lstrip": False}}))
    assert declared_eos_token(tmp_path) == "<|im_end|>"
