import json

from looplm_mega.training.config import WandbConfig
from looplm_mega.training.metrics import MetricsLogger, _flatten, format_duration


def test_jsonl_and_console_line(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=10, is_main=True, wandb=WandbConfig(mode="disabled"))
    logger.log(1, {"loss": 2.5, "ce_per_loop": [3.0, 2.0], "lr": 1e-3})
    logger.log(2, {"loss": 2.0}, prefix="valid")
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["ce_per_loop"] == [3.0, 2.0]
    assert records[1]["split"] == "valid"
    out = capsys.readouterr().out
    assert "[train] step 1/10 | loss 2.5 | ce_per_loop 3.000/2.000" in out and "ETA" in out


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=10, is_main=False, wandb=WandbConfig(mode="disabled"))
    logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_helpers():
    assert _flatten({"a": [1, 2], "b": 3}) == {"a/1": 1, "a/2": 2, "b": 3}
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
