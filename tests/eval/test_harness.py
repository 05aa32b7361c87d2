import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from looplm_mega.eval.harness import LoopLMHarness
from looplm_mega.inference.generate import GenerationConfig
from looplm_mega.inference.text import generate_text
from tests.helpers import write_tiny_model_and_tokenizer

TASKS = Path(__file__).resolve().parents[2] / "looplm_mega" / "eval" / "tasks"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_model_and_tokenizer(tmp_path_factory.mktemp("harness"))


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def reference_log_prob(lm, context_ids, continuation_ids, step=-1):
    """log p(continuation | context) from one plain forward, read out at loop `step`."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        hidden = lm.model(ids).hidden_states[step]
        log_probs = F.log_softmax(lm.model.lm_head(hidden[0]).float(), dim=-1)
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    return sum(float(log_probs[p, t]) for p, t in zip(positions, continuation_ids))


def test_loglikelihood_is_the_continuations_log_probability_in_any_batch(files):
    model, tokenizer = files
    pairs = [("def f(x):\n    return", " x + 1"), ("import os", "\nprint(os.getcwd())"), ("", "def f")]
    single = LoopLMHarness(str(model), str(tokenizer), batch_size=1)
    batched = LoopLMHarness(str(model), str(tokenizer), batch_size=3)
    scores = batched.loglikelihood([request("loglikelihood", *p) for p in pairs])
    alone = single.loglikelihood([request("loglikelihood", *p) for p in pairs])
    # (log-probability, is-greedy) pairs: pytest.approx takes flat sequences only.
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in alone], abs=1e-4)
    assert [g for _, g in scores] == [g for _, g in alone]
    for (context, continuation), (score, _) in zip(pairs, scores):
        context_ids = single.tok_encode(context) or [single.eot_token_id]
        expected = reference_log_prob(single, context_ids, single.tok_encode(continuation))
        assert score == pytest.approx(expected, abs=1e-4)


def test_static_exit_scores_with_the_chosen_loop(files):
    model, tokenizer = files
    lm = LoopLMHarness(str(model), str(tokenizer), exit="static", exit_loop=1)
    (score, _), = lm.loglikelihood([request("loglikelihood", "def f(x):", "\n    return x")])
    expected = reference_log_prob(lm, lm.tok_encode("def f(x):"), lm.tok_encode("\n    return x"), step=0)
    assert score == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_once(files):
    model, tokenizer = files
    text = "import os\nprint(os.getcwd())\n"
    lm = LoopLMHarness(str(model), str(tokenizer))
    ids = lm.tok_encode(text)
    expected = reference_log_prob(lm, [lm.eot_token_id], ids)
    assert lm.loglikelihood_rolling([request("loglikelihood_rolling", text)]) == pytest.approx([expected], abs=1e-4)
    windowed = LoopLMHarness(str(model), str(tokenizer), max_length=4)  # several windows, each token scored once
    assert windowed.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0] < 0


def test_generate_until_decodes_with_the_cache_and_stops(files):
    model, tokenizer = files
    lm = LoopLMHarness(str(model), str(tokenizer), batch_size=2, kv_sharing="last")
    prompts = ["def f(x):", "import os", "print("]
    outputs = lm.generate_until([request("generate_until", p, {"until": ["\n"], "max_gen_toks": 6}) for p in prompts])
    expected, _ = generate_text(lm.model, lm.tokenizer, prompts, GenerationConfig(max_new_tokens=6, kv_sharing="last"), ["\n"])
    assert outputs == expected and all("\n" not in o for o in outputs)


def test_bad_model_arguments_name_the_value(files):
    model, tokenizer = files
    with pytest.raises(ValueError, match="exit threshold 2.0"):
        LoopLMHarness(str(model), str(tokenizer), exit="q_exit", exit_threshold=2.0)
    with pytest.raises(ValueError, match="batch_size='auto'"):
        LoopLMHarness(str(model), str(tokenizer), batch_size="auto")


def test_lm_eval_runs_the_local_suite_through_the_command_line(files, tmp_path):
    model, tokenizer = files
    done = subprocess.run(
        [sys.executable, "-m", "looplm_mega.eval.harness", "--model", "looplm",
         "--model_args", f"pretrained={model},tokenizer={tokenizer},exit=q_exit,exit_threshold=0.9",
         "--tasks", "looplm_local", "--include_path", str(TASKS), "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["looplm_local_choice"]["acc,none"] <= 1.0
    assert results["looplm_local_perplexity"]["word_perplexity,none"] > 1.0
    assert results["looplm_local_generation"]["exact_match,none"] == 0.0  # a random model
