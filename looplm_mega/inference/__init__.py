"""Inference: loading a trained model and generating with a per-loop KV cache and early exit."""
