import json
import math

import pytest
import torch

from looplm_mega.model.losses import LoopTerms
from looplm_mega.training.config import WandbConfig
from looplm_mega.training.metrics import MetricsLogger, StepMetrics, ValidationMetrics, _flatten, format_duration


def _terms(ce: list[float], loss: float = 1.0) -> LoopTerms:
    loops = len(ce)
    return LoopTerms(torch.tensor(loss), torch.tensor(ce), torch.zeros(loops, 3), torch.tensor(0.5), torch.tensor(1.5),
                     torch.full((loops,), 0.25))


def test_a_whole_read_out_and_loop_by_loop_read_outs_give_the_same_step_metrics():
    whole = [(0, _terms([3.0, 2.0], 1.0)), (0, _terms([5.0, 4.0], 3.0))]  # two micro-batches
    by_loop = [(0, _terms([3.0], 0.4)), (0, _terms([5.0], 1.0)), (1, _terms([2.0], 0.6)), (1, _terms([4.0], 2.0))]
    a = StepMetrics.from_readouts(whole, 2, 2, grad_norm=1.0)
    b = StepMetrics.from_readouts(by_loop, 2, 2, grad_norm=1.0)
    assert a.ce_per_loop == b.ce_per_loop == [4.0, 3.0] and a.loss == pytest.approx(b.loss) == 2.0
    assert a.mean_exit_loop == 1.5 and b.mean_exit_loop == 3.0  # each loop's read-out carries its share


def test_a_window_averages_over_micro_batches_and_shows_a_skipped_steps_loss():
    steps = [StepMetrics(2.0, [3.0, 2.0], 0.5, 1.5, [0.2, 0.3], 1.0, micro_batches=1, tokens=10),
             StepMetrics(5.0, [6.0, 5.0], 0.5, 1.5, [0.2, 0.3], 3.0, micro_batches=3, tokens=30)]
    merged = StepMetrics.merge(steps)
    assert merged.loss == (2.0 + 3 * 5.0) / 4 and merged.ce_per_loop == [(3.0 + 18.0) / 4, (2.0 + 15.0) / 4]
    assert merged.grad_norm == 2.0 and merged.tokens == 40 and not merged.skipped
    skipped = StepMetrics(math.nan, [math.nan] * 2, 0.5, 1.5, [0.2, 0.3], math.nan, skipped=True)
    assert math.isnan(StepMetrics.merge([*steps, skipped]).loss)


def test_jsonl_console_line_and_tensorboard_get_the_same_record(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=10, is_main=True, wandb=WandbConfig(mode="disabled"))
    metrics = StepMetrics(2.5, [3.0, 2.0], 0.5, 1.5, [0.2, 0.3], 1.0, lr=1e-3, stage={"stage": "warm", "seq_length": 64})
    logger.log(1, metrics)
    logger.log(2, ValidationMetrics([2.5, 2.0], stage="warm"), prefix="valid")
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["ce_per_loop"] == [3.0, 2.0]
    assert records[0]["stage"] == "warm" and records[0]["lr"] == 1e-3 and "mfu" not in records[0]
    assert records[1]["split"] == "valid" and records[1]["loss"] == 2.0
    out = capsys.readouterr().out
    assert "[train] step 1/10 | stage warm | seq_length 64 | loss 2.5 | ce_per_loop 3.000/2.000" in out and "ETA" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/ce_per_loop/1", "train/ce_per_loop/2", "valid/loss"} <= set(events.Tags()["scalars"])
    assert events.Scalars("train/ce_per_loop/2")[0].value == 2.0


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=10, is_main=False, wandb=WandbConfig(mode="disabled"))
    logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_helpers():
    assert _flatten({"a": [1, 2], "b": 3}) == {"a/1": 1, "a/2": 2, "b": 3}
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
