import importlib.util
import json
from pathlib import Path

import torch

from looplm_mega.model import LoopLM
from looplm_mega.training.model_dir import read_config, read_full_state

ROOT = Path(__file__).resolve().parents[2]


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_pipeline_at_reduced_size(tmp_path, capfd):
    """Corpus -> tokenizer -> preprocess -> deepspeed pretraining -> consolidation -> generation."""
    out = tmp_path / "quickstart"
    _quickstart().main(["--out", str(out), "--steps", "3", "--processes", "2", "--corpus-mb", "0.4", "--vocab-size", "512",
                        "--training.micro_batch_size=2", "--training.global_batch_size=4", "--training.eval_iters=2",
                        "--training.log_interval=1", "--training.save_interval=0", "--schedule.warmup_steps=1"])
    printed = capfd.readouterr().out
    assert "validation CE per loop" in printed and "--- 'def ' ->" in printed
    assert f"{out / 'plots' / 'loss.png'}" in printed and (out / "plots" / "exit.png").read_bytes()[:4] == b"\x89PNG"
    assert "loops per token of 4" in printed
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert len([r for r in records if r["split"] == "valid"][-1]["ce_per_loop"]) == 4
    assert (out / "data" / "stdlib_text_document.idx").exists()
    model = LoopLM(read_config(out / "model"))
    model.load_full_state_dict(read_full_state(out / "model"))
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long)).hidden_states[-1]).all()
    hf = json.loads((out / "hf" / "config.json").read_text())
    assert hf["model_type"] == "ouro" and hf["num_hidden_layers"] == 1 and (out / "hf" / "tokenizer.json").exists()
