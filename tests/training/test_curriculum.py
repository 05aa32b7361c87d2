"""The stage controller: layout in steps, the values in force, and a live run through two stages."""

import json
import shutil

import pytest

from looplm_mega.config import ConfigError

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, run_config, train_losses

STAGES = [
    {"name": "stable", "train_steps": 3, "loops": 2, "entropy_beta": 0.1, "rope_theta": 10000.0},
    # 600 tokens at 8 x 32 tokens per step: 3 steps.
    {"name": "anneal", "train_tokens": 600, "loops": 4, "entropy_beta": 0.05, "rope_theta": 40000.0,
     "rope_anneal_steps": 2, "lr": 5e-4, "min_lr": 5e-4, "schedule": {"kind": "constant"}},
]


def _config(dataset, run_dir, **training):
    return run_config(dataset, run_dir, curriculum=STAGES, training={"train_steps": None, "save_interval": 0, **training},
                      schedule={"kind": "cosine", "warmup_steps": 1})


def test_stages_are_laid_out_in_steps_and_carry_values_forward(dataset, tmp_path):
    plan = _config(dataset, tmp_path).curriculum_plan()
    assert [(s.name, s.start, s.steps) for s in plan.states] == [("stable", 0, 3), ("anneal", 3, 3)]
    assert plan.total_steps == 6 and plan.is_boundary(3) and not plan.is_boundary(2) and not plan.is_boundary(6)
    assert [plan.at(step).loops for step in range(6)] == [2, 2, 2, 4, 4, 4]
    assert [round(plan.rope_theta(step)) for step in range(6)] == [10000, 10000, 10000, 20000, 40000, 40000]
    assert plan.states[0].lr == 1e-3 and plan.states[0].schedule.kind == "cosine"  # the run's optimizer and schedule
    assert plan.states[1].lr == 5e-4 and plan.states[1].schedule.kind == "constant"


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "train_steps": 2, "train_tokens": 100}], "set exactly one of train_steps / train_tokens"),
    ([{"name": "a", "train_steps": 2}, {"name": "a", "train_steps": 2}], "stage names repeat"),
    ([{"name": "a", "train_steps": 2, "loops": 0}], "loops=0 must be at least 1"),
    ([{"name": "a", "train_steps": 2, "lr": 1e-4, "min_lr": 1e-3}], "min_lr=0.001 exceeds lr=0.0001"),
])
def test_bad_stages_are_config_errors(dataset, tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        run_config(dataset, tmp_path, curriculum=stages, training={"train_steps": None}).curriculum_plan()
    with pytest.raises(ConfigError, match="leave both out with a curriculum"):
        run_config(dataset, tmp_path, curriculum=STAGES[:1])


@pytest.fixture(scope="module")
def staged_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged")
    run_distributed(_pretrain, 1, _config(dataset, run_dir, save_interval=2))
    return run_dir


def test_a_run_switches_loops_beta_rope_and_lr_at_the_boundary(staged_run):
    records = [json.loads(line) for line in (staged_run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert [train[s]["stage"] for s in range(1, 7)] == ["stable"] * 3 + ["anneal"] * 3
    assert [len(train[s]["ce_per_step"]) for s in range(1, 7)] == [2, 2, 2, 4, 4, 4]
    assert [train[s]["entropy_beta"] for s in (3, 4)] == [0.1, 0.05]
    assert [round(train[s]["rope_theta"]) for s in (3, 4, 5, 6)] == [10000, 20000, 40000, 40000]
    assert [train[s]["lr"] for s in (4, 5, 6)] == [5e-4] * 3
    valid = [r for r in records if r["split"] == "valid"][-1]
    assert valid["stage"] == "anneal" and len(valid["ce_per_step"]) == 4
    # Checkpoints at 2 and 4 (save_interval), 3 (the boundary) and 6 (the end).
    assert sorted(p.name for p in (staged_run / "checkpoints").glob("step*")) == [
        "step00000002", "step00000003", "step00000004", "step00000006"][-3:]  # keep_last 3


@pytest.mark.parametrize("tag", ["step00000003", "step00000004"], ids=["at_the_boundary", "mid_anneal"])
def test_resume_in_a_stage_or_at_its_boundary_repeats_the_run(dataset, staged_run, tmp_path, tag):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(staged_run / "checkpoints" / tag, checkpoints / tag)
    (checkpoints / "latest").write_text(tag)
    run_distributed(_pretrain, 1, _config(dataset, tmp_path, save_interval=2))
    resumed, uninterrupted = train_losses(tmp_path), train_losses(staged_run)
    start = int(tag[4:]) + 1
    assert sorted(resumed) == list(range(start, 7))
    assert [resumed[s] for s in resumed] == [uninterrupted[s] for s in resumed]


def test_stage2_trains_the_gate_alone_and_freeze_patterns_hold_parameters(dataset, tmp_path):
    from safetensors.torch import load_file

    from looplm_mega.training.consolidate import consolidate

    stages = [{"name": "lm", "train_steps": 2},
              {"name": "gate", "train_steps": 2, "objective": "stage2"},
              {"name": "no_layers", "train_steps": 2, "objective": "stage1", "freeze": ["model.layers.*"]}]
    config = run_config(dataset, tmp_path, curriculum=stages, deepspeed={"zero_stage": 2},
                        training={"train_steps": None, "save_interval": 0})
    run_distributed(_pretrain, 1, config)
    states = {step: load_file(str(consolidate(tmp_path / "checkpoints", tmp_path / f"m{step}", f"step0000000{step}")
                                  / "model.safetensors")) for step in (2, 4, 6)}
    changed = {span: {n for n in states[span[0]] if not states[span[0]][n].equal(states[span[1]][n])}
               for span in ((2, 4), (4, 6))}
    assert changed[(2, 4)] == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert changed[(4, 6)] and not any(n.startswith("model.layers.") for n in changed[(4, 6)])
    assert "lm_head.weight" in changed[(4, 6)]


def test_the_miniature_ouro_curriculum_follows_the_papers_stages():
    from looplm_mega.training.config import load_run_config

    plan = load_run_config("configs/run/tiny_cpu_curriculum.yaml").curriculum_plan()
    assert [s.name for s in plan.states] == ["pretrain_1a", "pretrain_1b", "ct_annealing", "long_ct", "mid_training", "gate"]
    assert [s.loops for s in plan.states] == [8, 4, 4, 4, 4, 4]
    assert [s.entropy_beta for s in plan.states] == [0.1] + [0.05] * 5
    assert [s.rope_theta for s in plan.states] == [1e4, 1e4, 4e4, 1e6, 1e6, 1e6]
    assert [s.objective for s in plan.states][-2:] == ["stage1", "stage2"]
