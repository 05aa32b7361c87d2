"""The LoopLM (Ouro) model, its objectives and its FLOP count."""

from looplm_mega.model.config import LoopLMConfig
from looplm_mega.model.flops import training_flops_per_token
from looplm_mega.model.looplm import LoopLM, LoopLMOutput

__all__ = ["LoopLM", "LoopLMConfig", "LoopLMOutput", "training_flops_per_token"]
