#!/usr/bin/env python
"""The quickstart: a tiny LoopLM trained end to end on this machine's CPU, with no download.

1. corpus: the Python standard library's sources (every Python installation has them);
2. a 4096-token byte-level BPE tokenizer trained on it with `tokenizers`;
3. pretraining of the `tiny` LoopLM (4 loops over 2 shared layers) with the Stage I objective;
4. validation loss per loop step (later loops should be visibly better than loop 1);
5. a safetensors checkpoint and a few lines generated from a prompt.

    python examples/quickstart.py --steps 200 --out runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from looplm_mega.config import save_yaml  # noqa: E402
from looplm_mega.data.stdlib_corpus import stdlib_documents  # noqa: E402
from looplm_mega.data.tokenizer import eod_token_id, train_bpe_tokenizer  # noqa: E402
from looplm_mega.model import LoopLM, LoopLMConfig, training_flops_per_token  # noqa: E402


def tokenize_corpus(out: Path, vocab_size: int, max_bytes: int | None = None):
    docs = list(stdlib_documents(max_bytes))
    tokenizer = train_bpe_tokenizer(docs, vocab_size, out / "tokenizer.json")
    eod = eod_token_id(tokenizer)
    encoded = tokenizer.encode_batch(docs)
    split = int(len(docs) * 0.95)  # the last 5% of documents are held out
    streams = []
    for part in (encoded[:split], encoded[split:]):
        streams.append(np.concatenate([np.array(e.ids + [eod], dtype=np.int64) for e in part]))
    return tokenizer, streams[0], streams[1]


def batches(stream: np.ndarray, batch: int, seq: int, generator: np.random.Generator):
    """Random windows of seq + 1 tokens: inputs and the labels one position ahead."""
    while True:
        starts = generator.integers(0, len(stream) - seq - 1, size=batch)
        window = torch.from_numpy(np.stack([stream[s : s + seq + 1] for s in starts]))
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def validation_loss_per_step(model: LoopLM, stream: np.ndarray, batch: int, seq: int, num_batches: int = 8) -> list[float]:
    model.eval()
    data = batches(stream, batch, seq, np.random.default_rng(1234))
    total = torch.zeros(model.config.total_ut_steps)
    for _ in range(num_batches):
        inputs, labels = next(data)
        total += model(inputs, labels=labels).per_step_loss
    model.train()
    return (total / num_batches).tolist()


@torch.no_grad()
def generate(model: LoopLM, tokenizer, prompt: str, new_tokens: int, temperature: float = 0.7) -> str:
    """Sampling from the last loop's read-out, recomputing the whole prefix each token (the
    KV-cached, early-exiting generator lives in looplm_mega.inference)."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    generator = torch.Generator().manual_seed(0)
    for _ in range(new_tokens):
        last = model(ids).hidden_states[-1][:, -1]
        probs = torch.softmax(model.lm_head(last) / temperature, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokenizer.decode(ids[0].tolist())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1, help="entropy weight of the Stage I objective")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-mb", type=float, default=None, help="use only this much of the corpus")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    start = time.time()
    config = LoopLMConfig.from_preset("tiny", entropy_beta=args.beta)
    max_bytes = None if args.corpus_mb is None else int(args.corpus_mb * 1e6)
    tokenizer, train, valid = tokenize_corpus(out, config.vocab_size, max_bytes)
    print(f"corpus: {len(train) + len(valid):,} tokens ({len(valid):,} held out), tokenizer trained in {time.time() - start:.0f}s")

    model = LoopLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))))
    flops_per_step = training_flops_per_token(config, args.seq) * args.batch * args.seq
    print(f"model: {model.num_parameters():,} parameters, {config.num_hidden_layers} layers x {config.total_ut_steps} loops")
    print("validation CE per loop step before training:", " ".join(f"{v:.3f}" for v in validation_loss_per_step(model, valid, args.batch, args.seq)))

    data = batches(train, args.batch, args.seq, np.random.default_rng(args.seed))
    with (out / "metrics.jsonl").open("w") as log, tqdm(range(1, args.steps + 1), desc="pretrain", unit="step", mininterval=5) as bar:
        for step in bar:
            tick = time.perf_counter()
            inputs, labels = next(data)
            output = model(inputs, labels=labels)
            output.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            elapsed = time.perf_counter() - tick
            record = {"step": step, "loss": output.loss.item(), "per_step_ce": output.per_step_loss.tolist(),
                      "exit_entropy": output.exit_entropy.item(), "mean_exit_step": output.mean_exit_step.item(),
                      "grad_norm": grad_norm.item(), "lr": schedule.get_last_lr()[0],
                      "tokens_per_s": args.batch * args.seq / elapsed, "gflops_per_s": flops_per_step / elapsed / 1e9}
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", ce_last=f"{record['per_step_ce'][-1]:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")

    per_step = validation_loss_per_step(model, valid, args.batch, args.seq)
    print("validation CE per loop step after training: " + "  ".join(f"loop {t + 1}: {v:.3f}" for t, v in enumerate(per_step)))
    print(f"loop {len(per_step)} is {per_step[0] - per_step[-1]:.3f} nats below loop 1")
    (out / "validation.json").write_text(json.dumps({"per_step_ce": per_step}))

    tmp = out / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    save_yaml(config, out / "config.yaml")
    print(f"checkpoint: {out / 'model.safetensors'}")
    for prompt in ("def ", "import "):
        print(f"--- {prompt!r} ->\n{generate(model, tokenizer, prompt, 48)}")
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
