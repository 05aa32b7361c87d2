"""Evaluation of a trained LoopLM: validation metrics per loop step, the exit distribution, plots."""
