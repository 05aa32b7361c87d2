"""LoopLMConfig: the model's hyper-parameters, named as in the released Ouro config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from looplm_mega.config import ConfigError, from_dict, load_yaml

# Shipped inside the package (setup.py's package_data), so that any install finds them.
PRESET_DIR = Path(__file__).resolve().parent / "presets"

# Fields of config.json that the released checkpoints carry; the rest of LoopLMConfig is ours
# (how to run the model here) and is left out of an exported config.json.
RELEASED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rope_theta", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "total_ut_steps",
    "early_exit_threshold", "initializer_range",
)


@dataclass
class LoopLMConfig:
    # --- released config.json fields ---
    vocab_size: int = 49152  # tokens of the tokenizer (SmolLM2's: 49152)
    hidden_size: int = 2048  # width of the residual stream
    intermediate_size: int = 5632  # width of the SwiGLU MLP
    num_hidden_layers: int = 24  # layers N of the shared stack (applied total_ut_steps times)
    num_attention_heads: int = 16  # query heads
    num_key_value_heads: Optional[int] = None  # None: same as num_attention_heads (MHA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 65536  # longest sequence the model is meant for (data.seq_length may not exceed it)
    rope_theta: float = 1_000_000.0  # RoPE base (a curriculum stage may change it)
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    hidden_act: Literal["silu"] = "silu"  # the MLP's activation (SwiGLU)
    tie_word_embeddings: bool = False  # share the embedding with the head (the released models do not)
    total_ut_steps: int = 4  # loops T: times the layer stack is applied
    early_exit_threshold: float = 1.0  # q of Q-exit at inference (1.0: every loop runs)
    initializer_range: float = 0.02  # std of the normal initialisation of the matrices

    # --- how this project runs the model (not part of the released format) ---
    attention_backend: Literal["auto", "sdpa", "flash"] = "auto"  # auto: flash-attn on CUDA in bf16/fp16 when installed, else SDPA
    activation_checkpointing: Literal["none", "layer", "loop"] = "none"  # recompute each layer, or each whole loop, in the backward
    # Back-propagate only through the last k loops (None: through all of them).
    truncated_loops: Optional[int] = None
    # Per-step cross-entropy without materialising T x tokens x vocab logits (losses.py).
    fused_cross_entropy: bool = True  # chunked head + CE with gradients in the forward (no T x tokens x vocab logits)
    cross_entropy_chunk_tokens: int = 1024  # tokens per chunk of the fused cross-entropy
    entropy_beta: float = 0.1  # beta of the Stage I objective (0.1 in Stage 1a, 0.05 after)
    # Initial weight of the norms on the attention and MLP outputs (input_layernorm_2,
    # post_attention_layernorm_2). Small values make every loop start close to the identity, so
    # later loops refine earlier ones instead of overwriting them (README, "Initialisation").
    sublayer_norm_init: float = 0.05
    # The embedding and head rows are padded to a multiple of this x TP (Megatron's
    # make-vocab-size-divisible-by): equal TP shards and GPU-friendly shapes. Padded logits are
    # masked; exported and consolidated tensors have exactly vocab_size rows.
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly "
                    "or choose a divisible number of heads"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings", "cross_entropy_chunk_tokens", "make_vocab_size_divisible_by")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.total_ut_steps < 1:
            raise ConfigError(f"total_ut_steps={self.total_ut_steps}: a looped model needs at least 1 loop")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive")
        if self.truncated_loops is not None and self.truncated_loops < 1:
            raise ConfigError(f"truncated_loops={self.truncated_loops} must be at least 1 or null")
        if self.sublayer_norm_init <= 0:
            raise ConfigError(f"sublayer_norm_init={self.sublayer_norm_init} must be positive")
        if self.entropy_beta < 0:
            raise ConfigError(f"entropy_beta={self.entropy_beta} must be non-negative")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LoopLMConfig":
        """A named preset from model/presets/ (tiny, small, medium, ouro_1_4b, ouro_2_6b)."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"model preset {name!r} does not exist (known: {', '.join(known)})")
        config = load_yaml(cls, path)
        return config.replace(**overrides) if overrides else config

    @classmethod
    def load(cls, name_or_path: str) -> "LoopLMConfig":
        """A preset name or the path of a YAML file."""
        if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
            return load_yaml(cls, name_or_path)
        return cls.from_preset(name_or_path)

    def replace(self, **changes) -> "LoopLMConfig":
        """A validated copy with some fields changed."""
        return from_dict(type(self), {**dataclasses.asdict(self), **changes})

    def released_dict(self) -> dict:
        """The fields that a released Ouro config.json holds."""
        return {k: getattr(self, k) for k in RELEASED_FIELDS}
