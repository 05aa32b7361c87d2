"""Small pretraining runs for the trainer tests: a model, a config builder, the losses a run logged."""

import json
from pathlib import Path

import numpy as np

from looplm_mega.config import from_dict
from looplm_mega.data.indexed import IndexedDatasetWriter
from looplm_mega.training.config import RunConfig

MODEL = {"preset": "tiny", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 4}


def write_dataset(prefix: Path) -> str:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(300):
            writer.add_document(rng.integers(1, 512, rng.integers(20, 200)))
    return str(prefix)


def run_config(dataset: str, run_dir: Path, **sections) -> RunConfig:
    data = {"run_dir": str(run_dir), "model": MODEL, "wandb": {"mode": "disabled"},
            "data": {"prefixes": [dataset], "seq_length": 32, "split": "90,10"},
            "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 6, "log_interval": 1,
                         "eval_iters": 2, "save_interval": 3},
            "optimizer": {"lr": 1e-3}, "schedule": {"kind": "cosine", "warmup_steps": 2}}
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return from_dict(RunConfig, data)


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _pretrain(config: RunConfig) -> None:
    from looplm_mega.training.trainer import pretrain

    pretrain(config)


def _pretrain_each(configs: list) -> None:
    for config in configs:
        _pretrain(config)


def assert_same_losses(run: Path, reference: Path) -> None:
    """The two runs logged steps 1..6 with the same losses (1e-5), and the reference trained."""
    losses, expected = train_losses(run), train_losses(reference)
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-5)
    assert expected[6] != expected[1]  # it trained
