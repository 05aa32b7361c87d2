import pytest
import torch
import torch.nn.functional as F

from looplm_mega.eval.per_loop import evaluate_per_loop
from looplm_mega.model.attention import segment_ids_from_eod
from looplm_mega.model.cross_entropy import IGNORE_INDEX
from looplm_mega.model.exit import exit_cdf

from tests.helpers import build_model

EOD = 0


@pytest.fixture(scope="module")
def model():
    return build_model(seed=1).eval()


def _batch(seed: int, batch: int = 2, seq: int = 24) -> dict:
    """Packed documents with ignored labels at document ends, as collate_batch gives them."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 97, (batch, seq + 1), generator=generator)
    tokens[:, [6, 15]] = EOD
    segments = segment_ids_from_eod(tokens, EOD)
    labels = tokens[:, 1:].clone()
    labels[segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX
    return {"input_ids": tokens[:, :-1], "labels": labels, "segment_ids": segments[:, :-1]}


def test_per_loop_ce_and_exit_statistics_equal_the_models_own(model):
    batch = _batch(0)
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["labels"], segment_ids=batch["segment_ids"])
    metrics = evaluate_per_loop(model, [batch], chunk_tokens=5)  # chunks that do not divide the tokens
    assert metrics.num_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(torch.tensor(metrics.ce_per_loop), out.ce_per_loop.float(), rtol=1e-5, atol=1e-5)
    assert metrics.mean_expected_exit_loop == pytest.approx(out.terms.mean_exit_loop.item(), rel=1e-5)
    valid = batch["labels"] != IGNORE_INDEX
    torch.testing.assert_close(torch.tensor(metrics.exit_prob_per_loop, dtype=torch.float32),
                               out.exit_probs[:, valid].mean(dim=1))
    assert sum(metrics.exit_prob_per_loop) == pytest.approx(1.0)


def test_batches_are_weighted_by_their_valid_tokens_and_num_loops_overrides_t(model):
    first, second = _batch(1), _batch(2)
    second["labels"][:, :10] = IGNORE_INDEX  # fewer valid tokens than the first batch
    both = {k: torch.cat([first[k], second[k]]) for k in first}
    with torch.no_grad():
        out = model(both["input_ids"], labels=both["labels"], segment_ids=both["segment_ids"], num_loops=5)
    # Tuples are accepted as well as dicts.
    metrics = evaluate_per_loop(model, [first, (second["input_ids"], second["labels"], second["segment_ids"])],
                                  num_loops=5)
    assert metrics.num_loops == 5 and len(metrics.exit_loop_counts) == 5
    torch.testing.assert_close(torch.tensor(metrics.ce_per_loop), out.ce_per_loop.float(), rtol=1e-5, atol=1e-5)


def test_accuracy_by_hand(model):
    """Labels are the step-1 predictions, one in four of them changed: step 1 scores exactly 3/4,
    and every step scores the fraction of labels its own argmax hits."""
    input_ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predictions = [model.lm_head(h).argmax(-1)[0] for h in model(input_ids).hidden_states]
    labels = predictions[0].clone()
    labels[-1] = IGNORE_INDEX  # 8 valid labels
    labels[[0, 3]] = (labels[[0, 3]] + 1) % 97  # 2 of them wrong for step 1
    metrics = evaluate_per_loop(model, [(input_ids, labels[None])])
    assert metrics.num_tokens == 8
    assert metrics.accuracy_per_loop[0] == 6 / 8
    for step, predicted in enumerate(predictions):
        hits = sum(int(predicted[i] == labels[i]) for i in range(8))
        assert metrics.accuracy_per_loop[step] == hits / 8


def test_q_exit_histogram(model):
    batch = _batch(4)
    valid_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    everything = evaluate_per_loop(model, [batch], exit_threshold=1.0)
    assert everything.exit_loop_counts == [0, 0, valid_tokens]
    assert everything.mean_exit_loop == 3
    assert everything.adaptive_ce == pytest.approx(everything.ce_per_loop[-1])
    assert everything.adaptive_accuracy == pytest.approx(everything.accuracy_per_loop[-1])
    early = evaluate_per_loop(model, [batch], exit_threshold=1e-6)  # p(1) > q for every token
    assert early.exit_loop_counts == [valid_tokens, 0, 0]
    assert early.adaptive_ce == pytest.approx(early.ce_per_loop[0])
    # In between, each token's CE is read at its own exit step (computed here from the logits).
    middle = evaluate_per_loop(model, [batch], exit_threshold=0.5)
    assert sum(middle.exit_loop_counts) == valid_tokens
    valid = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        out = model(batch["input_ids"], segment_ids=batch["segment_ids"])
        ce = torch.stack([F.cross_entropy(model.lm_head(h[valid]), batch["labels"][valid], reduction="none")
                          for h in out.hidden_states])
    exit_at = (exit_cdf(out.gate_logits[:, valid]) >= 0.5).int().argmax(dim=0)  # the first step reaching q
    assert middle.exit_loop_counts == torch.bincount(exit_at, minlength=3).tolist()
    assert 0 < middle.exit_loop_counts[0] < valid_tokens  # the test exercises a real mixture
    assert middle.adaptive_ce == pytest.approx(ce[exit_at, torch.arange(valid_tokens)].mean().item(), rel=1e-5)


def test_bad_values_are_named(model):
    batch = _batch(5)
    with pytest.raises(ValueError, match="exit_threshold=-0.1"):
        evaluate_per_loop(model, [batch], exit_threshold=-0.1)
    with pytest.raises(ValueError, match="num_loops=0"):
        evaluate_per_loop(model, [batch], num_loops=0)
    batch["input_ids"][0, 0] = 97
    with pytest.raises(ValueError, match=r"token id 97 .*\(vocab_size=97\)"):
        evaluate_per_loop(model, [batch])
    empty = (_batch(5)["input_ids"], torch.full_like(batch["labels"], IGNORE_INDEX))
    with pytest.raises(ValueError, match="no valid labels"):
        evaluate_per_loop(model, [empty])
