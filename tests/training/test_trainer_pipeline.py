"""The pretraining loop through the looped pipeline against the unpipelined run on the same
global batch."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from looplm_mega.training.consolidate import consolidate

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, assert_same_losses, run_config, train_losses


@pytest.fixture(scope="module")
def pp1_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pp1")
    run_distributed(_pretrain, 1, run_config(dataset, run_dir, deepspeed={"zero_stage": 0}))
    return run_dir


@pytest.fixture(scope="module")
def pp2_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pp2")
    run_distributed(_pretrain, 2, run_config(dataset, run_dir, deepspeed={"zero_stage": 0}, parallel={"pp": 2}))
    return run_dir


def test_pp2_matches_pp1(pp2_run, pp1_run):
    assert_same_losses(pp2_run, pp1_run)


@pytest.mark.parametrize("layout", [{"pp": 2, "tp": 2}, {"pp": 2}], ids=["pp2_tp2", "pp2_dp2_zero1"])
def test_pp2_with_tp2_or_dp2_on_four_processes_matches_pp1(dataset, pp1_run, tmp_path, layout):
    config = run_config(dataset, tmp_path, deepspeed={"zero_stage": 1}, parallel=layout, training={"save_interval": 0})
    run_distributed(_pretrain, 4, config)
    assert_same_losses(tmp_path, pp1_run)


def test_pp2_resume_equals_the_uninterrupted_run_bit_for_bit(dataset, pp2_run, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(pp2_run / "checkpoints" / "step00000003", checkpoints / "step00000003")
    (checkpoints / "latest").write_text("step00000003")
    run_distributed(_pretrain, 2, run_config(dataset, tmp_path, deepspeed={"zero_stage": 0}, parallel={"pp": 2}))
    resumed, uninterrupted = train_losses(tmp_path), train_losses(pp2_run)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)]


def test_pp2_checkpoint_consolidates_and_continues_unpipelined(dataset, pp2_run, pp1_run, tmp_path):
    model_dir = consolidate(pp2_run / "checkpoints", tmp_path / "model", tag="step00000003")
    config = run_config(dataset, tmp_path / "pp1", deepspeed={"zero_stage": 0}, training={"init_from": str(model_dir)})
    run_distributed(_pretrain, 1, config)
    continued = train_losses(tmp_path / "pp1")
    assert sorted(continued) == [4, 5, 6]
    # Same weights after step 3, same batch: the same loss at step 4 (then Adam's moments differ).
    np.testing.assert_allclose(continued[4], train_losses(pp1_run)[4], rtol=1e-5)
