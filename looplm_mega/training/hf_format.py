"""The released Ouro format (Hugging Face): what ByteDance/Ouro-1.4B ships and vLLM's
OuroForCausalLM loads. Export writes it from a model directory or a checkpoint; import reads it
into a model directory that a run continues from (training.init_from) at any parallel layout.

    config.json              the released field names; model_type "ouro", architectures
                             ["OuroForCausalLM"], auto_map pointing at the released code on the Hub
                             (trust_remote_code fetches it)
    generation_config.json   bos / eos / pad token ids
    model.safetensors        exactly the released tensor names (11 per layer + 5), bf16 by default;
                             above max_shard_bytes: model-0000i-of-0000n.safetensors + index
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   when a tokenizer is given
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from looplm_mega.model.config import RELEASED_FIELDS, LoopLMConfig
from looplm_mega.outputs import staged_output_dir
from looplm_mega.training.model_dir import (
    FULL, HF_INDEX, MODEL_DIR, TensorLike, full_model_files, lazy_tensors, write_config, write_tensors,
)

# The released modeling code lives with the released weights; exported directories point at it.
RELEASED_CODE = "ByteDance/Ouro-1.4B"
TRANSFORMERS_VERSION = "4.54.1"  # the release's model card asks for transformers < 4.56
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RELEASED_DIR = "released-format directory"  # the kind of output (looplm_mega/outputs.py)


def hf_config(config: LoopLMConfig, dtype: str, token_ids: Mapping[str, int]) -> dict:
    """config.json of the released format for `config`."""
    layers = config.num_hidden_layers
    return {
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "auto_map": {"AutoConfig": f"{RELEASED_CODE}--configuration_ouro.OuroConfig",
                     "AutoModel": f"{RELEASED_CODE}--modeling_ouro.OuroModel",
                     "AutoModelForCausalLM": f"{RELEASED_CODE}--modeling_ouro.OuroForCausalLM"},
        **config.released_dict(),
        "attention_dropout": 0.0,
        "layer_types": ["full_attention"] * layers,
        "max_window_layers": layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "rope_scaling": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        **token_ids,
    }


def _token_ids(tokenizer: Optional[Path], eos_token: str) -> dict[str, int]:
    if tokenizer is None:
        return {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    from looplm_mega.data.tokenizer import load_tokenizer

    token_id = load_tokenizer(tokenizer).token_to_id(eos_token)
    if token_id is None:
        raise ValueError(f"{tokenizer}: no {eos_token!r} token (give the end-of-text token with --eos-token)")
    return {"bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": token_id}


def _shards(tensors: Mapping[str, TensorLike], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Names split into files of at most max_shard_bytes (a tensor larger than that alone)."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.shape.numel() * torch.finfo(dtype).bits // 8
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    return shards


def export_hf(tensors: Mapping[str, TensorLike], config: LoopLMConfig, output: str | Path, dtype: str = "bfloat16",
              tokenizer: Optional[str | Path] = None, eos_token: str = "<|endoftext|>",
              max_shard_bytes: int = 5 * 2**30, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write the released format to `output` (assembled under a temporary name; an earlier export
    replaced only with overwrite); `tensors` are the model's full tensors with the released names
    (lazy ones are read one at a time), `inputs` the paths they come from."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    expected = 11 * config.num_hidden_layers + 4 + (0 if config.tie_word_embeddings else 1)
    if len(tensors) != expected:  # vLLM refuses unknown names and missing ones alike
        raise ValueError(f"{len(tensors)} tensors for a {config.num_hidden_layers}-layer model, expected {expected}")
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    token_ids = _token_ids(tokenizer, eos_token)
    cast = DTYPES[dtype]
    output = Path(output)
    inputs = (*inputs, tokenizer) if tokenizer is not None else inputs
    with staged_output_dir(output, RELEASED_DIR, inputs, overwrite) as staging:
        shards = _shards(tensors, cast, max_shard_bytes)
        files = [FULL] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                 for i in range(len(shards))]
        for file, names in zip(files, shards):
            write_tensors(staging / file, {n: tensors[n] for n in names}, lambda name, t: t.to(cast))
        if len(shards) > 1:
            total = sum(tensors[n].shape.numel() for n in tensors) * torch.finfo(cast).bits // 8
            index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, ns in zip(files, shards) for n in ns}}
            (staging / HF_INDEX).write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(hf_config(config, dtype, token_ids), indent=2))
        (staging / "generation_config.json").write_text(json.dumps(
            {**token_ids, "transformers_version": TRANSFORMERS_VERSION}, indent=2))
        if tokenizer is not None:
            _write_tokenizer(tokenizer, staging, eos_token, config.max_position_embeddings)
    return output


def _write_tokenizer(tokenizer: Path, output: Path, eos_token: str, max_length: int) -> None:
    """tokenizer.json as it is, and the two small files transformers' AutoTokenizer reads with it."""
    source = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    shutil.copyfile(source, output / "tokenizer.json")
    special = {"bos_token": eos_token, "eos_token": eos_token, "pad_token": eos_token, "unk_token": eos_token}
    (output / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, "add_prefix_space": False,
         **special}, indent=2))
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def read_hf_config(hf_dir: str | Path) -> LoopLMConfig:
    """The model's config from a released config.json (its released fields)."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; not a Hugging Face model directory")
    fields = json.loads(path.read_text())
    if fields.get("model_type") != "ouro":
        raise ValueError(f"{path}: model_type={fields.get('model_type')!r}, expected 'ouro'")
    return LoopLMConfig(**{k: fields[k] for k in RELEASED_FIELDS if k in fields})


def import_hf(hf_dir: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """A released Ouro directory as a model directory (fp32 weights, for training), one tensor at a
    time; a run continues pretraining from it with training.init_from at any parallel layout."""
    config = read_hf_config(hf_dir)
    tensors = lazy_tensors(full_model_files(hf_dir))
    with staged_output_dir(output, MODEL_DIR, [hf_dir], overwrite) as staging:
        write_tensors(staging / FULL, tensors, lambda name, t: t.float())
        write_config(staging, config)
    return Path(output)
