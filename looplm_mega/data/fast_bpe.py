"""A faster exact encoder for byte-level BPE tokenizers: tiktoken, built from the tokenizer's own
vocabulary, merges, added tokens and pre-tokenizer pattern.

tiktoken encodes byte-level BPE several times faster than the `tokenizers` library (measured in
the README), which is most of the time of preprocessing. Its algorithm differs, though: it merges
any two adjacent parts whose concatenation is a token, lowest id first, where `tokenizers` merges
only the pairs of its merge list, in the list's order. The two agree when every token comes from
exactly one merge, ids rise in merge order and each piece the pre-tokenizer cuts is merged the
same way, which holds for BPE vocabularies as trained but is not guaranteed for every piece of
text. So `fast_encoder` builds the tiktoken encoder only for tokenizers of a shape it can express
(checked below, with the reason when not), and `first_mismatch` compares both on a verification
sample (the vocabulary's own tokens, and the head of the input: data/preprocess.py); preprocessing
uses tiktoken only when they agree on all of it, and `tokenizers` otherwise.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer

# The pattern of `tokenizers`' ByteLevel pre-tokenizer with use_regex (GPT-2's).
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table, by which byte-level vocabularies write bytes
    as printable characters (the table is fixed by the format, not by a library)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


class FastEncoder:
    """`encode(texts)` -> one uint32 array of ids per text, as the tokenizer would give them."""

    def __init__(self, encoding, added_tokens: set[str]):
        self.encoding = encoding
        self.added_tokens = added_tokens

    def encode(self, texts: Iterable[str]) -> list[np.ndarray]:
        # Added tokens are matched whole in the text, as `tokenizers` does; none is an error.
        return [self.encoding.encode_to_numpy(text, allowed_special=self.added_tokens, disallowed_special=())
                for text in texts]


def fast_encoder(tokenizer: Tokenizer) -> tuple[Optional[FastEncoder], str]:
    """(the tiktoken encoder of `tokenizer`, "") or (None, why it cannot be one)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        return None, f"the model is {model.get('type')}, not BPE"
    if spec.get("normalizer") is not None:
        return None, "the tokenizer has a normalizer"
    for option in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            return None, f"the BPE model sets {option}"
    if model.get("byte_fallback"):
        return None, "the BPE model sets byte_fallback"
    if (spec.get("post_processor") or {}).get("type", "ByteLevel") != "ByteLevel":
        return None, "the post-processor adds tokens"
    pattern = _pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None, f"the pre-tokenizer is not byte-level BPE's: {json.dumps(spec.get('pre_tokenizer'))[:200]}"
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    for token in spec.get("added_tokens", []):
        if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
            return None, f"the added token {token['content']!r} matches with single_word / lstrip / rstrip"
    if any(a != b and b.startswith(a) for a in added for b in added):
        return None, "an added token is the start of another one"
    byte_of = _byte_of_char()
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        if token in added:
            continue
        if any(c not in byte_of for c in token):
            return None, f"the vocabulary holds {token!r}, which is not byte-level"
        ranks[bytes(byte_of[c] for c in token)] = token_id
    if sum(len(b) == 1 for b in ranks) != 256:
        return None, "the vocabulary lacks some of the 256 bytes"
    reason = _merges_follow_ids(model["merges"], model["vocab"], len(ranks) - 256)
    if reason:
        return None, reason
    encoding = tiktoken.Encoding("looplm_mega_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    return FastEncoder(encoding, set(added)), ""


def _pattern(pre_tokenizer: Optional[dict]) -> Optional[str]:
    """The regex that cuts the text into pieces, for the pre-tokenizers tiktoken can express:
    ByteLevel with its own regex (GPT-2), or a Split by a regex followed by ByteLevel without one
    (the Llama 3 / Qwen kind)."""
    if pre_tokenizer is None:
        return None
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and not pre_tokenizer.get("add_prefix_space") and pre_tokenizer.get("use_regex", True):
        return BYTE_LEVEL_PATTERN
    if kind == "Sequence" and len(pre_tokenizer.get("pretokenizers", [])) == 2:
        split, byte_level = pre_tokenizer["pretokenizers"]
        if (split.get("type") == "Split" and "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated"
                and not split.get("invert") and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("add_prefix_space") and not byte_level.get("use_regex", True)):
            return split["pattern"]["Regex"]
    return None


def _merges_follow_ids(merges: list, vocab: dict[str, int], merged_tokens: int) -> str:
    """"" when every merge makes a distinct token, ids rise in merge order and every token longer
    than a byte comes from a merge: then tiktoken's lowest-id-first order is the merge order."""
    previous, made = -1, set()
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = left + right
        token_id = vocab.get(token)
        if token_id is None:
            return f"the merge {left!r} + {right!r} makes a token that is not in the vocabulary"
        if token in made:
            return f"two merges make {token!r}"
        if token_id <= previous:
            return f"token ids do not rise in merge order (at {token!r})"
        made.add(token)
        previous = token_id
    if len(made) != merged_tokens:
        return f"{merged_tokens - len(made)} tokens of the vocabulary come from no merge"
    return ""


def vocabulary_texts(tokenizer: Tokenizer) -> list[str]:
    """Every token of the vocabulary that is text on its own (the others are parts of multi-byte
    characters), added tokens left out: each must encode to itself, as one piece."""
    byte_of = _byte_of_char()
    spec = json.loads(tokenizer.to_str())
    added = {t["content"] for t in spec.get("added_tokens", [])}
    texts = []
    for token in spec["model"]["vocab"]:
        if token not in added and all(c in byte_of for c in token):
            try:
                texts.append(bytes(byte_of[c] for c in token).decode("utf-8"))
            except UnicodeDecodeError:
                pass
    return texts


def first_mismatch(tokenizer: Tokenizer, encoder: FastEncoder, texts: list[str]) -> Optional[str]:
    """None when tiktoken gives the tokenizer's ids for every text, else where they first differ."""
    expected = [encoding.ids for encoding in getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)(texts)]
    for text, ids, fast in zip(texts, expected, encoder.encode(texts)):
        fast = fast.tolist()
        if fast != ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, fast)) if a != b), min(len(ids), len(fast)))
            return f"{text[:60]!r}...: tokenizers gives {ids[at:at + 5]} at token {at}, tiktoken {fast[at:at + 5]}"
    return None
