"""The stage controller: layout in steps, the values in force, and a live run through two stages."""

import json
import shutil

import numpy as np
import pytest

from looplm_mega.config import ConfigError
from looplm_mega.training.config import ParallelConfig

from tests.distributed import run_distributed
from tests.training.runs import MODEL, _pretrain, run_config, train_losses

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
    assert [len(train[s]["ce_per_loop"]) for s in range(1, 7)] == [2, 2, 2, 4, 4, 4]
    assert [train[s]["entropy_beta"] for s in (3, 4)] == [0.1, 0.05]
    assert [round(train[s]["rope_theta"]) for s in (3, 4, 5, 6)] == [10000, 20000, 40000, 40000]
    assert [train[s]["lr"] for s in (4, 5, 6)] == [5e-4] * 3
    valid = [r for r in records if r["split"] == "valid"][-1]
    assert valid["stage"] == "anneal" and len(valid["ce_per_loop"]) == 4
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
              {"name": "gate", "train_steps": 2, "objective": "stage2_gate"},
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

    plan = load_run_config("configs/curriculum/tiny_cpu.yaml").curriculum_plan()
    assert [s.name for s in plan.states] == ["pretrain_1a", "pretrain_1b", "ct_annealing", "long_ct", "mid_training", "gate"]
    assert [s.loops for s in plan.states] == [8, 4, 4, 4, 4, 4]
    assert [s.entropy_beta for s in plan.states] == [0.1] + [0.05] * 5
    assert [s.rope_theta for s in plan.states] == [1e4, 1e4, 4e4, 1e6, 1e6, 1e6]
    assert [s.objective for s in plan.states][-2:] == ["stage1", "stage2"]


# --- sequence length, batch ramp and data blend -------------------------------------------------

def _staged_data(dataset: str, other: str) -> list[dict]:
    return [
        # 4 -> 8 samples of 32 tokens: 128 tokens a step until 512 are read (4 steps), then 256.
        {"name": "ramp", "train_tokens": 2048, "global_batch_tokens": 256,
         "batch_ramp": {"start_tokens": 128, "increment_tokens": 128, "ramp_tokens": 512}},
        # Twice the sequence length, the same 256 tokens a step, another dataset.
        {"name": "long", "train_steps": 3, "seq_length": 64, "micro_batch_size": 1, "data": {"prefixes": [other]}},
    ]


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory) -> str:
    """Tokens 400..511 only: a batch read from it is recognisable."""
    import numpy as np

    from looplm_mega.data.indexed import IndexedDatasetWriter

    prefix = tmp_path_factory.mktemp("other") / "tokens"
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(200):
            writer.add_document(rng.integers(400, 512, rng.integers(20, 200)))
    return str(prefix)


def _data_config(dataset, other, run_dir):
    return run_config(dataset, run_dir, curriculum=_staged_data(dataset, other),
                      training={"train_steps": None, "save_interval": 3, "keep_last": 10})


def test_seq_length_batch_ramp_and_data_are_laid_out_per_stage(dataset, other_dataset, tmp_path):
    plan = _data_config(dataset, other_dataset, tmp_path).curriculum_plan()
    assert [(s.name, s.start, s.steps) for s in plan.states] == [("ramp", 0, 10), ("long", 10, 3)]
    assert [plan.batch_samples(step) for step in range(13)] == [4] * 4 + [8] * 6 + [4] * 3
    assert plan.samples(0, 13) == 4 * 4 + 8 * 6 + 4 * 3
    long = plan.states[1]
    assert (long.seq_length, long.micro_batch_size, long.global_batch_tokens, long.segment) == (64, 1, 256, 1)
    assert long.data.prefixes == [other_dataset] and long.data.seed == plan.states[0].data.seed + 1
    assert plan.segment_steps(0) == range(0, 10) and plan.segment_steps(1) == range(10, 13)
    # RoPE annealed over a token span: 500 tokens at 128 a step (the ramp's start) take 4 steps; 600 take 5.
    stages = [{**_staged_data(dataset, other_dataset)[0], "rope_theta": 40000.0, "rope_anneal_tokens": 500}]
    plan = run_config(dataset, tmp_path, curriculum=stages, training={"train_steps": None}).curriculum_plan()
    assert [round(plan.rope_theta(step)) for step in range(6)] == [14142, 20000, 28284, 40000, 40000, 40000]
    stages[0]["rope_anneal_tokens"] = 600
    plan = run_config(dataset, tmp_path, curriculum=stages, training={"train_steps": None}).curriculum_plan()
    assert round(plan.rope_theta(3)) == 30314 and plan.rope_theta(4) == 40000


@pytest.mark.parametrize("stage, message", [
    ({"global_batch_tokens": 100}, "global_batch_tokens=100 is not a multiple of seq_length=32"),
    ({"batch_ramp": {"start_tokens": 128, "increment_tokens": 96, "ramp_tokens": 512}},
     "batch_ramp from 128 to global_batch_tokens=256 tokens must grow by whole increments of 96"),
    ({"data": {"prefixes": ["x.bin"]}}, "curriculum stage 'a': data.prefixes"),
    ({"upcycle": {"to_layers": 3}}, "upcycle.to_layers=3 must be a multiple of the 2 layers"),
    ({"seq_length": 33, "global_batch_tokens": 264}, "in curriculum stage 'a'"),  # 33 not divisible by TP=2 with SP
])
def test_bad_stage_batches_and_data_are_config_errors(dataset, tmp_path, stage, message):
    with pytest.raises(ConfigError, match=message):
        run_config(dataset, tmp_path, curriculum=[{"name": "a", "train_steps": 2, **stage}],
                   training={"train_steps": None}, parallel={"tp": 2, "sequence_parallel": True})
    config = run_config(dataset, tmp_path, curriculum=[{"name": "a", "train_steps": 2, "micro_batch_size": 3}],
                        training={"train_steps": None})
    with pytest.raises(ConfigError, match="stage 'a': a global batch of 8 samples is not a multiple of micro_batch_size=3"):
        config.check_batches(1)


def _pretrain_recording(config, out: str) -> None:
    """pretrain, writing the shape and smallest token of every training micro-batch to `out`."""
    from looplm_mega.training.trainer import Trainer

    class Recording(Trainer):
        def _micro_batches(self, data, count):
            batches = super()._micro_batches(data, count)
            if data is self._data:  # training, not validation
                with open(out, "a") as f:
                    for batch in batches:
                        f.write(json.dumps({"step": self.state.step, "shape": list(batch["input_ids"].shape),
                                            "min": int(batch["input_ids"].min())}) + "\n")
            return batches

    Recording(config).train()


@pytest.fixture(scope="module")
def data_run(dataset, other_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("data_run")
    run_distributed(_pretrain_recording, 1, _data_config(dataset, other_dataset, run_dir), str(run_dir / "batches.jsonl"))
    return run_dir


def test_a_run_ramps_its_batch_then_switches_sequence_length_and_data(data_run):
    records = [json.loads(line) for line in (data_run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert [train[s]["batch_tokens"] for s in range(1, 14)] == [128] * 4 + [256] * 9
    assert [train[s]["seq_length"] for s in range(1, 14)] == [32] * 10 + [64] * 3
    assert [train[s]["data_segment"] for s in range(1, 14)] == [0] * 10 + [1] * 3
    assert train[13]["consumed_samples"] == 4 * 4 + 8 * 6 + 4 * 3
    batches = [json.loads(line) for line in (data_run / "batches.jsonl").read_text().splitlines()]
    by_step = {}
    for b in batches:
        by_step.setdefault(b["step"], []).append(b)
    assert [len(by_step[s]) for s in range(13)] == [2] * 4 + [4] * 6 + [4] * 3  # micro-batches
    assert all(b["shape"] == [2, 32] and b["min"] < 400 for s in range(10) for b in by_step[s])
    assert all(b["shape"] == [1, 64] and b["min"] >= 400 for s in range(10, 13) for b in by_step[s])
    valid = [r for r in records if r["split"] == "valid"][-1]
    assert valid["stage"] == "long"


@pytest.mark.parametrize("tag", ["step00000003", "step00000010"], ids=["mid_ramp", "at_the_data_switch"])
def test_resume_mid_ramp_or_at_the_data_switch_repeats_the_run(dataset, other_dataset, data_run, tmp_path, tag):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(data_run / "checkpoints" / tag, checkpoints / tag)
    (checkpoints / "latest").write_text(tag)
    run_distributed(_pretrain, 1, _data_config(dataset, other_dataset, tmp_path))
    resumed, uninterrupted = train_losses(tmp_path), train_losses(data_run)
    assert sorted(resumed) == list(range(int(tag[4:]) + 1, 14))
    assert [resumed[s] for s in resumed] == [uninterrupted[s] for s in resumed]


# --- upcycling at a stage start, and a curriculum under pipeline parallelism -------------------

UPCYCLE = [{"name": "small", "train_steps": 3},
           {"name": "grown", "train_steps": 3, "upcycle": {"to_layers": 2, "order": "stacked"}}]


def _upcycle_config(dataset, run_dir):
    return run_config(dataset, run_dir, model={**MODEL, "num_hidden_layers": 1}, curriculum=UPCYCLE,
                      deepspeed={"zero_stage": 2}, training={"train_steps": None, "save_interval": 2, "keep_last": 10})


@pytest.fixture(scope="module")
def upcycled_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("upcycled")
    run_distributed(_pretrain, 2, _upcycle_config(dataset, run_dir))
    return run_dir


def test_a_stage_upcycles_the_live_model_from_its_boundary_checkpoint(upcycled_run, tmp_path):
    from safetensors.torch import load_file

    from looplm_mega.training.consolidate import consolidate

    records = [json.loads(line) for line in (upcycled_run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert [train[s]["layers"] for s in range(1, 7)] == [1] * 3 + [2] * 3
    boundary = load_file(str(consolidate(upcycled_run / "checkpoints", tmp_path / "b", "step00000003") / "model.safetensors"))
    grown = load_file(str(upcycled_run / "upcycled" / "grown" / "model.safetensors"))
    for name, tensor in boundary.items():
        copies = [name.replace("layers.0.", f"layers.{i}.") for i in (0, 1)] if ".layers." in name else [name]
        for copy in copies:
            assert grown[copy].equal(tensor), copy
    end = load_file(str(consolidate(upcycled_run / "checkpoints", tmp_path / "e", "step00000006") / "model.safetensors"))
    assert not end["model.layers.0.mlp.up_proj.weight"].equal(end["model.layers.1.mlp.up_proj.weight"])  # trained apart


@pytest.mark.parametrize("tag", ["step00000003", "step00000004"], ids=["at_the_upcycle", "after_it"])
def test_resume_at_or_after_the_upcycle_repeats_the_run(dataset, upcycled_run, tmp_path, tag):
    config = _upcycle_config(dataset, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(upcycled_run / "checkpoints" / tag, checkpoints / tag)
    (checkpoints / "latest").write_text(tag)
    run_distributed(_pretrain, 2, config)
    resumed, uninterrupted = train_losses(tmp_path), train_losses(upcycled_run)
    assert sorted(resumed) == list(range(int(tag[4:]) + 1, 7))
    np.testing.assert_allclose([resumed[s] for s in resumed], [uninterrupted[s] for s in resumed], rtol=1e-6)


def test_pipelined_curriculum_switches_loops_beta_and_rope_like_one_process(dataset, staged_run, tmp_path):
    config = _config(dataset, tmp_path, save_interval=2)
    config.parallel = ParallelConfig(pp=2)
    run_distributed(_pretrain, 2, config)
    pipelined, reference = train_losses(tmp_path), train_losses(staged_run)
    assert sorted(pipelined) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([pipelined[s] for s in reference], list(reference.values()), rtol=1e-5)


@pytest.mark.parametrize("name, layers", [("ouro_1_4b", [24] * 6), ("ouro_2_6b", [24] + [48] * 5)])
def test_the_ouro_curricula_carry_the_papers_numbers(name, layers):
    from looplm_mega.training.config import load_run_config

    plan = load_run_config(f"configs/curriculum/{name}.yaml").curriculum_plan()
    assert [s.name for s in plan.states] == ["pretrain_1a", "pretrain_1b", "ct_annealing", "long_ct", "mid_training",
                                             "gate_training"]
    tokens = [plan.samples(s.start, s.start + s.steps) * s.seq_length for s in plan.states]
    for got, paper in zip(tokens, [3e12, 3e12, 1.4e12, 20e9, 300e9]):
        assert paper <= got < paper + 8.4e6  # rounded up to whole 8M batches
    assert [s.seq_length for s in plan.states][:5] == [4096, 4096, 16384, 65536, 32768]
    assert {s.global_batch_tokens for s in plan.states} == {8388608}
    assert plan.batch_samples(0) * 4096 == 4194304  # the 4M -> 8M ramp
    assert [s.loops for s in plan.states] == [8] + [4] * 5
    assert [s.entropy_beta for s in plan.states] == [0.1] + [0.05] * 5
    assert [s.rope_theta for s in plan.states][:5] == [1e4, 1e4, 4e4, 1e6, 1e6]
    assert [(s.lr, s.min_lr, s.schedule.kind) for s in plan.states][:5] == [
        (3e-4, 3e-4, "constant"), (3e-4, 3e-4, "constant"), (3e-4, 3e-5, "cosine"), (3e-5, 3e-5, "constant"),
        (3e-5, 1e-5, "cosine")]
    assert [s.num_layers for s in plan.states] == layers
    assert plan.states[-1].objective == "stage2"


def test_a_pipelined_run_upcycles_like_one_process(dataset, tmp_path):
    """2 -> 4 layers at PP=2 (each rank's half of the grown stack comes from the upcycled directory)
    against the same curriculum unpipelined."""
    def config(run_dir, pp):
        c = run_config(dataset, run_dir, curriculum=[{"name": "small", "train_steps": 3},
                                                     {"name": "grown", "train_steps": 3, "upcycle": {"to_layers": 4}}],
                       training={"train_steps": None, "save_interval": 0})
        c.parallel = ParallelConfig(pp=pp)
        return c

    run_distributed(_pretrain, 2, config(tmp_path / "pp2", 2))
    run_distributed(_pretrain, 1, config(tmp_path / "pp1", 1))
    pipelined, reference = train_losses(tmp_path / "pp2"), train_losses(tmp_path / "pp1")
    assert sorted(pipelined) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([pipelined[s] for s in reference], list(reference.values()), rtol=1e-5)
