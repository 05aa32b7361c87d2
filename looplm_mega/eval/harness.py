"""The LoopLM as an lm-evaluation-harness model: `--model looplm`.

    python -m looplm_mega.eval.harness --model looplm \
        --model_args pretrained=runs/quickstart/model,tokenizer=runs/quickstart/tokenizer.json,num_loops=4,exit=q_exit,exit_threshold=0.9 \
        --tasks looplm_local --include_path looplm_mega/eval/tasks --batch_size 8

(lm-eval has no plugin entry point for models, so this module registers the model and then hands
its command line to lm-eval's.) Model arguments: pretrained (a model directory or released-format
directory), tokenizer (default: the model directory's tokenizer.json), num_loops (loop count),
exit / exit_loop / exit_threshold / exit_eps (inference.exit_rules: scoring reads each token out
at its exit step; generation skips the loops after it), kv_sharing (full | last | mean | first, for
generate_until), dtype, max_length (default: max_position_embeddings).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from looplm_mega.data.tokenizer import EOD_TOKEN, load_tokenizer
from looplm_mega.inference.exit_rules import ExitRule
from looplm_mega.inference.generate import GenerationConfig
from looplm_mega.inference.loading import load_model
from looplm_mega.inference.text import generate_text

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("looplm")
class LoopLMHarness(LM):
    def __init__(self, pretrained: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 dtype: Optional[str] = None, batch_size: int | str = 8, num_loops: Optional[int] = None,
                 exit: str = "none", exit_loop: int = 0, exit_threshold: float = 1.0, exit_eps: float = 0.0,
                 kv_sharing: str = "full", max_length: Optional[int] = None, **unused):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError(f"batch_size={batch_size!r}: give a number (no automatic batch size for looplm)")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda by default, also on machines without a GPU.
            if device is not None:
                logger.warning("device=%s asked for, but CUDA is not available: evaluating on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(pretrained, device, DTYPES[dtype] if dtype else None)
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        self._device = torch.device(device)
        self._batch_size = int(batch_size)
        self.num_loops = int(num_loops) if num_loops else self.model.config.total_ut_steps
        self.exit_rule = ExitRule(exit, loops=int(exit_loop), threshold=float(exit_threshold), eps=float(exit_eps))
        self.exit_rule.check(self.num_loops)
        self.kv_sharing = kv_sharing
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        eot = self.tokenizer.token_to_id(EOD_TOKEN)
        if eot is None:
            raise ValueError(f"tokenizer {tokenizer or pretrained}: no {EOD_TOKEN!r} token (needed as the first token's context)")
        self.eot_token_id = eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    # -- scoring -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            # Trailing spaces of the context belong to the continuation's first token (as in lm-eval's HF model).
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tok_encode(context + continuation)
            context_length = len(self.tok_encode(context)) if context else 0
            # An empty context is the end-of-text token, so the first token has something to follow.
            pairs.append((whole[:context_length] or [self.eot_token_id], whole[context_length:]))
        return self._score(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scores = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(request.args[0]), self.eot_token_id, self.max_length, 1)]
            scores.append(sum(score for score, _ in self._score(windows, disable_tqdm=True)))
        return scores

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether the continuation is the greedy one) per pair,
        longest first in batches, each token read out at its exit step."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self._batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = order[start:start + self._batch_size]
            sequences = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            width = max(len(s) for s in sequences)
            ids = torch.zeros(len(batch), width, dtype=torch.long)  # right-padded: causal attention ignores the pad
            for row, sequence in enumerate(sequences):
                ids[row, :len(sequence)] = torch.tensor(sequence)
            log_probs = self._read_out_log_probs(ids.to(self._device))
            for row, i in enumerate(batch):
                continuation = pairs[i][1]
                end = len(sequences[row])
                scored = log_probs[row, end - len(continuation):end]  # [C, V]
                target = torch.tensor(continuation, device=scored.device)
                results[i] = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
        return results

    @torch.inference_mode()
    def _read_out_log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """log-softmax [B, S, V] of each position's read-out at its exit step."""
        out = self.model(ids, num_loops=self.num_loops)
        steps = self.exit_rule.read_out_loops(out.gate_logits, out.hidden_states)  # [B, S]
        states = torch.stack(out.hidden_states)  # [T, B, S, H]
        chosen = states.gather(0, steps[None, ..., None].expand(1, *states.shape[1:])).squeeze(0)
        return F.log_softmax(self.model.lm_head(chosen).float(), dim=-1)

    # -- generation ----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests that share their generation arguments, decoded with the KV cache and
        the exit rule; each continuation is cut before the first of its `until` strings."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        outputs: list[Optional[str]] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = kwargs.pop("do_sample", None)
            temperature = 0.0 if sample is False else float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            config = GenerationConfig(max_new_tokens=max_new, temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                                      top_p=float(kwargs.pop("top_p", 1.0) or 1.0), eos_token_id=self.eot_token_id,
                                      num_loops=self.num_loops, kv_sharing=self.kv_sharing, exit=self.exit_rule)
            for start in range(0, len(indices), self._batch_size):
                chunk = indices[start:start + self._batch_size]
                texts, _ = generate_text(self.model, self.tokenizer, [requests[i].args[0] for i in chunk], config, until,
                                         max_prompt_tokens=max(1, self.max_length - max_new))
                for i, text in zip(chunk, texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(chunk))
        progress.close()
        return outputs


def main() -> None:
    """lm-eval's command line with the looplm model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
