"""The released Ouro format: exported files, a lossless round trip, and logits equal to an
independent re-implementation of the released forward pass (written here from the release's
description, not from our model code)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from looplm_mega.data.tokenizer import train_bpe_tokenizer
from looplm_mega.outputs import MARKER
from looplm_mega.training.hf_format import export_hf, import_hf
from looplm_mega.training.model_dir import read_config, read_full_state

from tests.helpers import build_model


@pytest.fixture
def model():
    model = build_model(seed=3, num_key_value_heads=2, make_vocab_size_divisible_by=1)  # GQA
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # no norm left at its initial value
    return model.eval()


def _weights(hf_dir) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("model*.safetensors"))
    return {n: t.float() for f in files for n, t in load_file(str(f)).items()}


def released_forward(hf_dir, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-step logits and exit gates of the released architecture, from config.json and the
    safetensors alone: per loop, every layer is x + norm_2(attn(norm_1(x))), then
    x + norm_4(mlp(norm_3(x))); the shared final norm closes each loop and its output feeds the next
    one, the head and the exit gate sigmoid(w h + b)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = _weights(hf_dir)
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    batch, seq = ids.shape

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]))

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    h = w["model.embed_tokens.weight"][ids]
    logits, gates = [], []
    for _ in range(cfg["total_ut_steps"]):
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = rms(h, w[p + "input_layernorm.weight"])
            q = (x @ w[p + "self_attn.q_proj.weight"].T).view(batch, seq, heads, hd).transpose(1, 2)
            k = (x @ w[p + "self_attn.k_proj.weight"].T).view(batch, seq, kv, hd).transpose(1, 2)
            v = (x @ w[p + "self_attn.v_proj.weight"].T).view(batch, seq, kv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
            attn = attn.transpose(1, 2).reshape(batch, seq, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
            h = h + rms(attn, w[p + "input_layernorm_2.weight"])
            x = rms(h, w[p + "post_attention_layernorm.weight"])
            mlp = (torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T))
            h = h + rms(mlp @ w[p + "mlp.down_proj.weight"].T, w[p + "post_attention_layernorm_2.weight"])
        h = rms(h, w["model.norm.weight"])
        logits.append(h @ w["lm_head.weight"].T)
        gates.append(torch.sigmoid(h @ w["model.early_exit_gate.weight"].T + w["model.early_exit_gate.bias"]).squeeze(-1))
    return logits, gates


def test_an_exported_model_gives_the_logits_of_the_released_forward_pass(model, tmp_path):
    out = export_hf(model.state_dict(), model.config, tmp_path / "hf", dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    logits, gates = released_forward(out, ids)
    with torch.no_grad():
        ours = model(ids)
    for t in range(model.config.total_ut_steps):
        torch.testing.assert_close(model.lm_head(ours.hidden_states[t]), logits[t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.exit_gates[t], gates[t], rtol=1e-4, atol=1e-5)


def test_export_then_import_is_lossless_and_shards_by_size(model, tmp_path):
    state = model.state_dict()
    out = export_hf(state, model.config, tmp_path / "hf", dtype="float32", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(state)
    back = import_hf(out, tmp_path / "model")
    assert read_config(back).released_dict() == model.config.released_dict()
    imported = read_full_state(back)
    assert imported.keys() == state.keys() and all(torch.equal(imported[n], t) for n, t in state.items())


def test_export_writes_the_released_files_in_bf16(model, tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe_tokenizer(["def f(x):\n    return x\n"] * 20, 300, tokenizer)
    out = export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=tokenizer)
    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", MARKER}
    assert {p.name for p in out.iterdir()} == names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "ByteDance/Ouro-1.4B--modeling_ouro.OuroForCausalLM"
    assert (config["total_ut_steps"], config["early_exit_threshold"], config["head_dim"]) == (3, 1.0, 8)
    assert config["torch_dtype"] == "bfloat16" and config["layer_types"] == ["full_attention"] * 2
    assert config["eos_token_id"] == 0 and json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 11 * 2 + 5
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}


def test_bad_inputs_are_named(model, tmp_path):
    state = model.state_dict()
    with pytest.raises(ValueError, match="28 tensors for a 2-layer model, expected 27"):
        export_hf({**state, "extra": state["lm_head.weight"]}, model.config, tmp_path / "hf")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', expected 'ouro'"):
        import_hf(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "out").exists()
