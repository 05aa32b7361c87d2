"""Tokenizers: Hugging Face `tokenizers` (Rust) files, local directories, or trained on the fly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from looplm_mega.config import ConfigError

EOD_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer (the SmolLM2/GPT-2 kind) trained on `texts`, with the
    end-of-document token at id 0; saved atomically to `path` when given."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tokenizer.save(str(tmp))
        tmp.replace(path)
    return tokenizer


def load_tokenizer(name_or_path: str | Path, merge_file: str | Path | None = None) -> Tokenizer:
    """A tokenizer.json file, a directory holding one (a local Hugging Face tokenizer) or a GPT-2
    style vocab.json + merges.txt, or a hub name (needs the network); with `merge_file`,
    `name_or_path` is the vocab.json of that merge list. A path that does not exist is a
    FileNotFoundError that names it."""
    if merge_file is not None:
        return gpt2_bpe_tokenizer(name_or_path, merge_file)
    name = str(name_or_path)
    path = Path(name)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_file(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return gpt2_bpe_tokenizer(path / "vocab.json", path / "merges.txt")
        raise FileNotFoundError(f"{name}: no tokenizer.json (nor vocab.json + merges.txt) in this directory")
    if path.is_file():
        return _from_file(path)
    # A hub name is NAME or ORG/NAME; anything else, or a name whose ORG folder exists here, is a path.
    if (path.is_absolute() or name.startswith(".") or name.count("/") > 1 or path.suffix == ".json"
            or (len(path.parts) > 1 and path.parent.exists())):
        raise FileNotFoundError(f"{name}: tokenizer file or directory does not exist")
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as e:  # the hub client's errors (offline, unknown repository) are many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(f"{name}: no such tokenizer file or directory, and not loadable from the "
                                f"Hugging Face hub ({reason})") from None


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust parser raises plain Exceptions
        raise ConfigError(f"{path}: not a tokenizers JSON file ({e})") from None


def gpt2_bpe_tokenizer(vocab_file: str | Path, merge_file: str | Path) -> Tokenizer:
    """The byte-level BPE of a GPT-2 style vocab.json and merges.txt (what Megatron's
    GPT2BPETokenizer reads), as a `tokenizers` Tokenizer."""
    for flag, path in (("vocab file", vocab_file), ("merge file", merge_file)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {flag} does not exist")
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    except Exception as e:  # the Rust reader raises plain Exceptions on malformed files
        raise ConfigError(f"{vocab_file} / {merge_file}: not a BPE vocabulary and merge list ({e})") from None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if tokenizer.token_to_id(EOD_TOKEN) is not None:
        tokenizer.add_special_tokens([EOD_TOKEN])  # matched whole in the text, as GPT-2's tokenizers do
    return tokenizer


def declared_eos_token(directory: str | Path) -> Optional[str]:
    """The eos_token a Hugging Face tokenizer directory declares (tokenizer_config.json, else
    special_tokens_map.json), or None: the token Megatron's HuggingFaceTokenizer appends as EOD."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(directory) / name
        if path.is_file():
            token = json.loads(path.read_text()).get("eos_token")
            if isinstance(token, dict):  # {"content": "</s>", "lstrip": false, ...}
                token = token.get("content")
            if token:
                return token
    return None


def eod_token_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-document token."""
    token_id = tokenizer.token_to_id(EOD_TOKEN)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOD_TOKEN!r} token to separate documents")
    return token_id
