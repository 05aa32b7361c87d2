import contextlib
import subprocess
from pathlib import Path

import pytest
import torch

from looplm_mega.model import LoopLM, LoopLMConfig

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_config(**overrides) -> LoopLMConfig:
    """A model small enough for fp32 gradient comparisons in milliseconds."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                rope_theta=10000.0, total_ut_steps=3, cross_entropy_chunk_tokens=7)
    return LoopLMConfig(**{**base, **overrides})


def build_model(seed: int = 0, **overrides) -> LoopLM:
    torch.manual_seed(seed)
    model = LoopLM(tiny_config(**overrides))
    # Gate weights large enough that the exit distribution is far from uniform.
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 0.5)
        model.model.early_exit_gate.bias.fill_(-0.3)
    return model


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def write_tiny_model_and_tokenizer(root, total_ut_steps: int = 4):
    """A random tiny model directory (root/model) and a byte-level BPE tokenizer (root/tokenizer.json)
    trained on a few lines of Python, for the inference and evaluation tools."""
    from looplm_mega.data.tokenizer import train_bpe_tokenizer
    from looplm_mega.training.model_dir import write_model_dir

    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 30, 300,
                                    root / "tokenizer.json")
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), make_vocab_size_divisible_by=1, total_ut_steps=total_ut_steps)
    torch.manual_seed(0)
    write_model_dir(root / "model", LoopLM(config).state_dict(), config)
    return root / "model", root / "tokenizer.json"


@contextlib.contextmanager
def small_filesystem(point: Path, size: str):
    """A filesystem of `size` (tmpfs, e.g. "1m") mounted at `point` for a disk-full test, or a skip
    with the reason where mounting is not allowed (not root)."""
    point.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


class Slices:
    """A weight read slice by slice (model/vocabulary.VocabularySlices), its gradient collected per
    slice as ZeRO-3's would be."""

    def __init__(self, weight, count):
        self.weight, self.count, self.rows = weight, count, weight.shape[0] // count
        self.gathered, self.grads = [], {}

    def gather(self, index):
        self.gathered.append(index)
        return self.weight[index * self.rows:(index + 1) * self.rows].detach()

    def hand_off(self, index, grad):
        assert grad.dtype == torch.float32 and index not in self.grads
        self.grads[index] = grad

    def grad(self):
        return torch.cat([self.grads[i] for i in range(self.count)])
