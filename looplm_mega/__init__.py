"""looplm-mega: pretraining for looped language models (Ouro / LoopLM)."""

__version__ = "0.1.0"
