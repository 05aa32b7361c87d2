"""Adam's moments leave one parallel layout and enter another: a run continued from a consolidated
checkpoint with its moments repeats the uninterrupted run's losses."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from looplm_mega.training.config import ParallelConfig
from looplm_mega.training.consolidate import consolidate
from looplm_mega.training.model_dir import OPTIMIZER_FILE, read_trainer_state
from looplm_mega.training.optimizer import parameter_groups

from tests.distributed import run_distributed
from tests.helpers import tiny_config
from tests.training.runs import _pretrain, run_config, train_losses


def test_parameter_groups_exempt_norms_biases_and_the_gate_from_weight_decay():
    from looplm_mega.model import LoopLM

    model = LoopLM(tiny_config())
    groups = parameter_groups(model, 0.1)
    decayed = {n for n, p in model.named_parameters() if any(p is q for g in groups if g["weight_decay"] for q in g["params"])}
    assert "model.layers.0.mlp.up_proj.weight" in decayed and "lm_head.weight" in decayed
    assert not any("norm" in n or "early_exit_gate" in n for n in decayed)


def _config(dataset, run_dir, layout: dict, **training):
    config = run_config(dataset, run_dir, deepspeed={"zero_stage": layout.get("zero", 0)},
                        training={"train_steps": 4, "save_interval": 2, **training})
    config.parallel = ParallelConfig(pp=layout.get("pp", 1))
    return config


@pytest.mark.parametrize("source, target", [
    ({"zero": 2, "processes": 2}, {"pp": 2, "processes": 2}),
    ({"pp": 2, "processes": 2}, {"zero": 3, "processes": 2}),
    ({"zero": 3, "processes": 2}, {"zero": 0, "processes": 1}),
], ids=["zero2_dp2_to_pp2", "pp2_to_zero3_dp2", "zero3_dp2_to_zero0"])
def test_a_run_continued_with_its_moments_at_another_layout_repeats_the_run(dataset, tmp_path, source, target):
    run_distributed(_pretrain, source["processes"], _config(dataset, tmp_path / "a", source))
    model_dir = tmp_path / "model"
    done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--checkpoint", str(tmp_path / "a" / "checkpoints"),
                           "--tag", "step00000002", "--output", str(model_dir), "--optimizer"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    moments = load_file(str(model_dir / OPTIMIZER_FILE))
    assert read_trainer_state(model_dir)["adam_step"] == 2
    assert moments["exp_avg_sq.model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
    assert len(moments) == 2 * len(load_file(str(model_dir / "model.safetensors")))
    run_distributed(_pretrain, target["processes"], _config(dataset, tmp_path / "b", target, init_from=str(model_dir)))
    continued, uninterrupted = train_losses(tmp_path / "b"), train_losses(tmp_path / "a")
    assert sorted(continued) == [3, 4]
    np.testing.assert_allclose([continued[s] for s in (3, 4)], [uninterrupted[s] for s in (3, 4)], rtol=1e-5)


def test_an_upcycling_stage_can_carry_the_moments(dataset, tmp_path):
    stages = [{"name": "small", "train_steps": 2},
              {"name": "grown", "train_steps": 1, "upcycle": {"to_layers": 4, "order": "interleaved", "optimizer": "carry"}}]
    config = run_config(dataset, tmp_path, curriculum=stages, training={"train_steps": None, "save_interval": 0})
    run_distributed(_pretrain, 1, config)
    before = load_file(str(consolidate(tmp_path / "checkpoints", tmp_path / "b", "step00000002", optimizer=True)
                           / OPTIMIZER_FILE))
    grown = load_file(str(tmp_path / "upcycled" / "grown" / OPTIMIZER_FILE))
    for new, old in enumerate([0, 0, 1, 1]):
        key = "exp_avg.model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(grown[key.format(new)], before[key.format(old)])
    assert torch.equal(grown["exp_avg_sq.lm_head.weight"], before["exp_avg_sq.lm_head.weight"])
    assert read_trainer_state(tmp_path / "upcycled" / "grown")["adam_step"] == 2
