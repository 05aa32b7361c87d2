import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from looplm_mega.config import load_yaml
from looplm_mega.model import LoopLM, LoopLMConfig

ROOT = Path(__file__).resolve().parents[2]


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_end_to_end_at_reduced_size(tmp_path, capsys):
    _quickstart().main(["--out", str(tmp_path), "--steps", "3", "--batch", "2", "--seq", "32", "--corpus-mb", "0.4"])
    printed = capsys.readouterr().out
    assert "validation CE per loop step after training" in printed and "--- 'def ' ->" in printed
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and len(records[0]["per_step_ce"]) == 4
    assert len(json.loads((tmp_path / "validation.json").read_text())["per_step_ce"]) == 4
    config = load_yaml(LoopLMConfig, tmp_path / "config.yaml")
    model = LoopLM(config)
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long)).hidden_states[-1]).all()
    assert (tmp_path / "tokenizer.json").exists()
