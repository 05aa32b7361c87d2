"""Model directories written from lazy tensors: each is read when written, once per output file."""

import torch

from looplm_mega.model import LoopLM
from looplm_mega.parallel.tensor_parallel import padded_vocab_size, shard
from looplm_mega.training.model_dir import MergedTensor, read_full_state, write_model_dir

from tests.helpers import tiny_config


class CountingTensor:
    """A lazy tensor (as DeepSpeed's GatheredTensor): shape and dtype known, data read on demand."""

    reads = 0

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype

    def contiguous(self) -> torch.Tensor:
        CountingTensor.reads += 1
        return self.tensor.clone()


def test_lazy_and_merged_tensors_are_read_once_per_file(tmp_path):
    config = tiny_config(vocab_size=97)
    full = LoopLM(config).state_dict()
    full = {n: t[:97] if n.endswith(("embed_tokens.weight", "lm_head.weight")) else t for n, t in full.items()}
    padded = padded_vocab_size(97, 2, config.make_vocab_size_divisible_by)
    lazy = {n: MergedTensor([CountingTensor(shard(t, n, r, 2, padded)) for r in (0, 1)], n, 97) for n, t in full.items()}
    CountingTensor.reads = 0
    out = write_model_dir(tmp_path / "m", lazy, config)
    assert CountingTensor.reads == 2 * len(full)  # each TP shard read once
    written = read_full_state(out)
    assert written.keys() == full.keys() and all(torch.equal(written[n], t) for n, t in full.items())
    CountingTensor.reads = 0
    write_model_dir(tmp_path / "tp2", lazy, config, tp=2)
    assert CountingTensor.reads == 2 * 2 * len(full)  # once per output shard file
    assert all(torch.equal(t, full[n]) for n, t in read_full_state(tmp_path / "tp2").items())


def test_writing_tensors_shows_progress(tmp_path, capsys):
    from looplm_mega.training.model_dir import write_tensors

    write_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(256), "b": torch.ones(3, 4)})
    err = capsys.readouterr().err
    assert "writing t.safetensors" in err and "1.05k/1.05k" in err and "2/2 tensors" in err  # 1,072 bytes
