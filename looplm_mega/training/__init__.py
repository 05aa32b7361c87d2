"""Pretraining: run config, learning-rate schedules, metrics, checkpoints and the DeepSpeed loop."""
