import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looplm_mega.model import LoopLM
from looplm_mega.outputs import MARKER
from looplm_mega.training.model_dir import write_model_dir

from tests.data.synthetic_datasets import write_random_dataset
from tests.helpers import tiny_config

TOOL = Path(__file__).resolve().parents[2] / "tools/eval_loops.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def tool_main():
    """The tool's main(), in this process: the error cases need no fresh interpreter each."""
    spec = importlib.util.spec_from_file_location("eval_loops", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model directory (full tensors: vocabulary rows cut to vocab_size) and dataset."""
    root = tmp_path_factory.mktemp("eval")
    config = tiny_config(max_position_embeddings=64)
    torch.manual_seed(0)
    state = {n: t[:config.vocab_size] if n.endswith(("embed_tokens.weight", "lm_head.weight")) else t
             for n, t in LoopLM(config).state_dict().items()}
    model_dir = write_model_dir(root / "model", state, config)
    write_random_dataset(root / "tokens", num_documents=200, min_length=5, max_length=40, vocab_size=config.vocab_size)
    return model_dir, root / "tokens"


def test_writes_json_plots_and_a_table(inputs, tmp_path):
    model_dir, data = inputs
    done = evaluate("--model", model_dir, "--data", data, "--data", data, "--seq-length", 32, "--batch-size", 3,
                    "--num-batches", 2, "--num-loops", 4, "--exit-threshold", 0.6, "--output", tmp_path / "out",
                    "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out/eval_loops.json").read_text())
    assert results["num_loops"] == 4 and results["exit_threshold"] == 0.6 and results["data"] == [str(data)] * 2
    # Labels that cross a document boundary are ignored (document masking, as in training).
    assert 0 < results["num_tokens"] < 2 * 3 * 32
    assert sum(results["exit_loop_counts"]) == results["num_tokens"]
    assert sum(results["exit_prob_per_loop"]) == pytest.approx(1.0)
    for name in ("ce_per_loop", "accuracy_per_loop", "exit_prob_per_loop"):
        assert len(results[name]) == 4
    for name in ("ce_per_loop.png", "exit_histogram.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # no temporary files left behind
        MARKER, "ce_per_loop.png", "eval_loops.json", "exit_histogram.png"]
    table = done.stdout.splitlines()
    assert table[0].split()[:3] == ["step", "CE", "accuracy"] and table[4].split()[0] == "4"
    assert "eval" in done.stderr  # the progress bar


@pytest.mark.parametrize("change, message", [
    (("--data", "missing"), "missing.idx: file does not exist"),
    (("--seq-length", 65), "--seq-length 65: longer than the model's max_position_embeddings=64"),
    (("--split", "1,0,0"), "--split 1,0,0: gives the valid split no documents"),
    (("--exit-threshold", 1.5), "--exit-threshold 1.5: must be in [0, 1]"),
])
def test_bad_inputs_are_named(inputs, tmp_path, capsys, change, message):
    model_dir, data = inputs
    args = {"--model": model_dir, "--data": data, "--seq-length": 32, "--output": tmp_path / "out",
            "--num-batches": 1, "--cache-dir": tmp_path / "cache"}
    args[change[0]] = tmp_path / change[1] if change[1] == "missing" else change[1]
    with pytest.raises(SystemExit) as exited:
        tool_main()([str(x) for pair in args.items() for x in pair])
    assert exited.value.code != 0
    assert message in f"{exited.value.code} {capsys.readouterr().err}"  # sys.exit(message) or argparse's error
    assert not (tmp_path / "out").exists()
