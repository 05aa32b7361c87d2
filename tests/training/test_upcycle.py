import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from looplm_mega.model import LoopLM
from looplm_mega.training.model_dir import StreamingSafetensorsWriter, read_config, read_full_state, write_model_dir
from looplm_mega.training.upcycle import layer_sources, upcycle

from tests.helpers import tiny_config


def test_layer_orders():
    assert layer_sources(3, 2, "stacked") == [0, 1, 2, 0, 1, 2]
    assert layer_sources(3, 2, "interleaved") == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="order='zigzag'"):
        layer_sources(3, 2, "zigzag")


@pytest.fixture
def source(tmp_path):
    config = tiny_config(num_hidden_layers=3, make_vocab_size_divisible_by=1)
    torch.manual_seed(0)
    state = LoopLM(config).state_dict()
    return write_model_dir(tmp_path / "small", state, config, {"state": {"step": 5, "consumed_samples": 40}}), state


@pytest.mark.parametrize("order", ["stacked", "interleaved"])
def test_upcycle_duplicates_layers_in_order_and_copies_the_rest(source, tmp_path, order):
    model_dir, state = source
    out = upcycle(model_dir, tmp_path / "big", 2, order, keep_progress=True)
    grown = read_full_state(out)
    assert read_config(out).num_hidden_layers == 6
    for new, old in enumerate(layer_sources(3, 2, order)):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm_2.weight"):
            assert torch.equal(grown[f"model.layers.{new}.{suffix}"], state[f"model.layers.{old}.{suffix}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.bias", "lm_head.weight"):
        assert torch.equal(grown[name], state[name])
    assert len(grown) == len(state) + 3 * 11  # eleven tensors per layer
    assert json.loads((out / "trainer_state.json").read_text())["state"]["step"] == 5
    model = LoopLM(read_config(out))
    model.load_full_state_dict(grown)  # loads strictly


def test_upcycle_carries_the_moments_like_the_weights_or_refuses_without_them(source, tmp_path):
    model_dir, state = source
    with pytest.raises(FileNotFoundError, match="optimizer.safetensors: missing, so the optimizer state cannot be carried"):
        upcycle(model_dir, tmp_path / "big", 2, "stacked", optimizer="carry")
    moments = {f"{m}.{n}": torch.randn(t.shape) for n, t in state.items() for m in ("exp_avg", "exp_avg_sq")}
    config = read_config(model_dir)
    with_moments = write_model_dir(tmp_path / "with", state, config, {"adam_step": 7}, moments=moments)
    out = upcycle(with_moments, tmp_path / "big", 2, "stacked", optimizer="carry")
    grown = load_file(str(out / "optimizer.safetensors"))
    assert len(grown) == 2 * len(read_full_state(out))
    for new, old in enumerate(layer_sources(3, 2, "stacked")):
        name = "mlp.gate_proj.weight"
        assert torch.equal(grown[f"exp_avg_sq.model.layers.{new}.{name}"], moments[f"exp_avg_sq.model.layers.{old}.{name}"])
    assert torch.equal(grown["exp_avg.model.norm.weight"], moments["exp_avg.model.norm.weight"])
    assert json.loads((out / "trainer_state.json").read_text()) == {"adam_step": 7}


def test_upcycle_reads_a_sharded_hugging_face_directory(source, tmp_path):
    model_dir, state = source
    hf = tmp_path / "hf"
    hf.mkdir()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: state[n].contiguous() for n in part}, str(hf / file))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: f for f, part in halves.items() for n in part}}))
    released = read_config(model_dir).released_dict()
    (hf / "config.json").write_text(json.dumps({**released, "model_type": "ouro", "architectures": ["OuroForCausalLM"]}))
    out = upcycle(hf, tmp_path / "big", 2, "interleaved")
    assert torch.equal(read_full_state(out)["model.layers.5.mlp.up_proj.weight"], state["model.layers.2.mlp.up_proj.weight"])
    assert not (out / "trainer_state.json").exists()


def test_streaming_writer_writes_what_safetensors_reads_and_refuses_the_unexpected(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, dtype=torch.bfloat16)}
    specs = {"a": ("F32", [3, 5]), "b": ("I64", [7]), "c": ("BF16", [2])}
    with StreamingSafetensorsWriter(tmp_path / "t.safetensors", specs) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="got b"):
        with StreamingSafetensorsWriter(tmp_path / "u.safetensors", specs) as writer:
            writer.add("b", tensors["b"])
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "u.safetensors.tmp").exists()
