"""The pretraining loop with tensor parallelism against the TP=1 run on the same global batch."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from looplm_mega.config import load_yaml
from looplm_mega.model import LoopLM, LoopLMConfig
from looplm_mega.training.consolidate import consolidate

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, assert_same_losses, run_config, train_losses


@pytest.fixture(scope="module")
def tp1_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tp1")
    run_distributed(_pretrain, 1, run_config(dataset, run_dir, deepspeed={"zero_stage": 1}))
    return run_dir


@pytest.fixture(scope="module")
def tp2_zero1_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tp2")
    run_distributed(_pretrain, 2, run_config(dataset, run_dir, deepspeed={"zero_stage": 1}, parallel={"tp": 2}))
    return run_dir


def test_tp2_zero1_matches_tp1(tp2_zero1_run, tp1_run):
    assert_same_losses(tp2_zero1_run, tp1_run)
    first = json.loads((tp2_zero1_run / "metrics.jsonl").read_text().splitlines()[0])
    reference = json.loads((tp1_run / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["grad_norm"] - reference["grad_norm"]) < 1e-4 * reference["grad_norm"]


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no_sp"])
def test_tp2_zero3_matches_tp1(dataset, tp1_run, tmp_path, sequence_parallel):
    config = run_config(dataset, tmp_path, deepspeed={"zero_stage": 3},
                        parallel={"tp": 2, "sequence_parallel": sequence_parallel}, training={"save_interval": 0})
    run_distributed(_pretrain, 2, config)
    assert_same_losses(tmp_path, tp1_run)


def test_tp2_times_dp2_on_four_processes_matches_tp1(dataset, tp1_run, tmp_path):
    # ZeRO-1 shards the optimizer over the two data-parallel ranks of each TP rank.
    config = run_config(dataset, tmp_path, deepspeed={"zero_stage": 1}, parallel={"tp": 2, "sequence_parallel": True},
                        training={"save_interval": 0})
    run_distributed(_pretrain, 4, config)
    assert_same_losses(tmp_path, tp1_run)


def test_tp2_checkpoint_consolidates_and_continues_at_tp1(dataset, tp2_zero1_run, tp1_run, tmp_path):
    model_dir = consolidate(tp2_zero1_run / "checkpoints", tmp_path / "model", tag="step00000003")
    state = load_file(str(model_dir / "model.safetensors"))
    # Merged to the released shapes: those of the single-device model without vocabulary padding.
    reference = LoopLM(load_yaml(LoopLMConfig, model_dir / "config.yaml").replace(make_vocab_size_divisible_by=1))
    assert {n: t.shape for n, t in state.items()} == {n: t.shape for n, t in reference.state_dict().items()}
    config = run_config(dataset, tmp_path / "tp1", deepspeed={"zero_stage": 1}, training={"init_from": str(model_dir)})
    run_distributed(_pretrain, 1, config)
    continued, uninterrupted = train_losses(tmp_path / "tp1"), train_losses(tp2_zero1_run)
    assert sorted(continued) == [4, 5, 6]
    # Step 4's loss is computed with the weights after step 3: the same model, the same batch.
    # (Later steps differ: Adam's moments restart.)
    np.testing.assert_allclose(continued[4], uninterrupted[4], rtol=1e-5)
