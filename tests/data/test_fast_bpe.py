import json
import sys

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from looplm_mega.data.fast_bpe import fast_encoder, first_mismatch, vocabulary_texts
from looplm_mega.data.stdlib_corpus import stdlib_documents
from looplm_mega.data.tokenizer import EOD_TOKEN, train_bpe_tokenizer


@pytest.fixture(scope="module")
def texts():
    return list(stdlib_documents(max_bytes=150_000))


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_bpe_tokenizer(texts[::2], vocab_size=800)


def test_tiktoken_gives_the_tokenizers_ids(tokenizer, texts):
    encoder, reason = fast_encoder(tokenizer)
    assert encoder is not None, reason
    tricky = ["", "   \n\n\t  x", "é ü 東京 🙂 \u00a0nbsp", f"end{EOD_TOKEN}start{EOD_TOKEN}", "x" * 5000, " " * 3000 + "y",
              "don't we'll I'M 123 4567.89"]
    samples = texts[1::2] + tricky + vocabulary_texts(tokenizer)
    assert first_mismatch(tokenizer, encoder, samples) is None
    assert encoder.encode([f"a{EOD_TOKEN}"])[0].tolist()[-1] == tokenizer.token_to_id(EOD_TOKEN)  # matched whole


def _with(tokenizer, change):
    spec = json.loads(tokenizer.to_str())
    change(spec)
    return Tokenizer.from_str(json.dumps(spec))


def _lowercase(spec):
    spec["normalizer"] = json.loads(normalizers.Lowercase().__getstate__())


def _prefix_space(spec):
    spec["pre_tokenizer"]["add_prefix_space"] = True


def _extra_token(spec):
    spec["model"]["vocab"]["qq"] = len(spec["model"]["vocab"])


@pytest.mark.parametrize("change, reason", [
    (_lowercase, "the tokenizer has a normalizer"),
    (_prefix_space, "the pre-tokenizer is not byte-level BPE's"),
    (_extra_token, "1 tokens of the vocabulary come from no merge"),
])
def test_shapes_tiktoken_cannot_express_are_refused_with_the_reason(tokenizer, change, reason):
    encoder, why = fast_encoder(_with(tokenizer, change))
    assert encoder is None and why.startswith(reason)


def test_ids_out_of_merge_order_are_refused():
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"ab": 257, "bc": 256})  # "ab" is merged first but has the higher id
    tokenizer = Tokenizer(models.BPE(vocab, [("a", "b"), ("b", "c")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert fast_encoder(tokenizer) == (None, "token ids do not rise in merge order (at 'bc')")


def test_merges_that_tiktoken_would_order_differently_are_found():
    # "bc" merges before "ab", so `tokenizers` encodes "abc" as [a, bc] (no rule joins them);
    # tiktoken joins any two parts that make a token, and gives [abc].
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"bc": 256, "ab": 257, "abc": 258})
    tokenizer = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    encoder, reason = fast_encoder(tokenizer)
    assert encoder is not None, reason  # the shape passes; only the comparison tells them apart
    assert first_mismatch(tokenizer, encoder, ["xyz"]) is None
    mismatch = first_mismatch(tokenizer, encoder, vocabulary_texts(tokenizer))
    assert f"'abc'...: tokenizers gives [{vocab['a']}, 256] at token 0, tiktoken [258]" in mismatch


def test_without_tiktoken_the_reason_is_given(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert fast_encoder(tokenizer) == (None, "tiktoken is not installed")
