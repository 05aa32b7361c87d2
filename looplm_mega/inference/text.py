"""Text in, text out: tokenising prompts, stop strings, and streaming decoded text as it grows."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from tokenizers import Tokenizer

from looplm_mega.data.tokenizer import EOD_TOKEN
from looplm_mega.inference.generate import GenerationConfig, GenerationResult, generate
from looplm_mega.model import LoopLM


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _Streamer:
    """Emits each row's text as it grows. A piece that could be the start of a stop string is held
    back until it is known not to be one, so a stop string is never printed."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], emit: Callable[[int, str], None]):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: dict[int, list[int]] = {}
        self.shown: dict[int, int] = {}

    def on_token(self, row: int, token: int) -> None:
        self.tokens.setdefault(row, []).append(token)
        text, stopped = cut_at_stop(self.tokenizer.decode(self.tokens[row]), self.stop)
        # An incomplete UTF-8 sequence decodes to U+FFFD; wait for the next token to complete it.
        end = len(text) if stopped else max(0, len(text) - self.hold)
        while end > 0 and text[end - 1] == "\ufffd" and not stopped:
            end -= 1
        self._show(row, text, end)

    def finish(self, row: int, text: str) -> None:
        self._show(row, text, len(text))

    def _show(self, row: int, text: str, end: int) -> None:
        start = self.shown.get(row, 0)
        if end > start:
            self.emit(row, text[start:end])
            self.shown[row] = end


def generate_text(model: LoopLM, tokenizer: Tokenizer, prompts: Sequence[str], config: GenerationConfig,
                  stop: Sequence[str] = (), stream: Optional[Callable[[int, str], None]] = None,
                  max_prompt_tokens: Optional[int] = None) -> tuple[list[str], GenerationResult]:
    """Each prompt's continuation (cut before the first stop string; special tokens dropped), and
    the token-level result. EOS defaults to the tokenizer's end-of-document token; a prompt longer
    than max_prompt_tokens keeps its last ones."""
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.token_to_id(EOD_TOKEN)
    ids = [tokenizer.encode(p).ids[-max_prompt_tokens:] if max_prompt_tokens else tokenizer.encode(p).ids for p in prompts]
    streamer = _Streamer(tokenizer, stop, stream) if stream is not None else None

    def should_stop(row: int, new: list[int]) -> bool:
        return cut_at_stop(tokenizer.decode(new), stop)[1]

    result = generate(model, ids, config, should_stop if stop else None, streamer.on_token if streamer else None)
    texts = [cut_at_stop(tokenizer.decode(tokens), stop)[0] for tokens in result.tokens]
    if streamer is not None:
        for row, text in enumerate(texts):
            streamer.finish(row, text)
    return texts, result
