import subprocess
import sys

import pytest
import torch

from looplm_mega.model import LoopLM
from looplm_mega.training.model_dir import read_full_state, read_trainer_state, write_model_dir

from tests.helpers import tiny_config

TOOL = "tools/convert_checkpoint.py"


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def whole(tmp_path):
    config = tiny_config(vocab_size=97)
    state = {n: t[:97] if n.endswith(("embed_tokens.weight", "lm_head.weight")) else t
             for n, t in LoopLM(config).state_dict().items()}
    return write_model_dir(tmp_path / "whole", state, config, {"state": {"step": 7, "consumed_samples": 56}}), state


def test_split_then_merge_gives_back_every_tensor(whole, tmp_path):
    model_dir, state = whole
    done = convert("--model", model_dir, "--output", tmp_path / "tp2", "--tp", 2)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "tp2").glob("*.safetensors")) == [
        "model-tp00-of-02.safetensors", "model-tp01-of-02.safetensors"]
    assert convert("--model", tmp_path / "tp2", "--output", tmp_path / "merged").returncode == 0
    merged = read_full_state(tmp_path / "merged")
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[n], t) for n, t in state.items())
    assert read_trainer_state(tmp_path / "merged")["state"]["step"] == 7


def test_a_missing_shard_or_a_wrong_directory_is_named(whole, tmp_path):
    model_dir, _ = whole
    assert convert("--model", model_dir, "--output", tmp_path / "tp2", "--tp", 2).returncode == 0
    (tmp_path / "tp2" / "model-tp01-of-02.safetensors").unlink()
    done = convert("--model", tmp_path / "tp2", "--output", tmp_path / "out")
    assert done.returncode != 0 and "TP shards missing: model-tp01-of-02.safetensors" in done.stderr
    (tmp_path / "notes").mkdir()
    done = convert("--model", tmp_path / "notes", "--output", tmp_path / "out")
    assert done.returncode != 0 and "neither model.safetensors nor" in done.stderr
    assert not (tmp_path / "out").exists()


def test_to_hf_and_back_through_the_tool(whole, tmp_path):
    model_dir, state = whole
    done = convert("--model", model_dir, "--to-hf", tmp_path / "hf", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert "config.json" in done.stdout and "generation_config.json" in done.stdout
    done = convert("--from-hf", tmp_path / "hf", "--output", tmp_path / "back", "--tp", 2)
    assert done.returncode == 0, done.stderr
    back = read_full_state(tmp_path / "back")
    assert back.keys() == state.keys() and all(torch.equal(back[n], t) for n, t in state.items())
    done = convert("--from-hf", tmp_path / "hf", "--to-hf", tmp_path / "again")
    assert done.returncode != 0 and "nothing to convert" in done.stderr
