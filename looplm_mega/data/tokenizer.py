"""Tokenizers: Hugging Face `tokenizers` (Rust) files, local directories, or trained on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A tokenizer.json file, a directory holding one (a local Hugging Face tokenizer), or a hub
    name (needs the network)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{name_or_path}: no tokenizer.json in this directory")
    if path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer file does not exist")
        return Tokenizer.from_file(str(path))
    return Tokenizer.from_pretrained(str(name_or_path))


def eod_token_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-document token."""
    token_id = tokenizer.token_to_id(EOD_TOKEN)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOD_TOKEN!r} token to separate documents")
    return token_id
