import csv
import multiprocessing
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from looplm_mega.model import LoopLM
from looplm_mega.tasks import mano
from looplm_mega.tasks.mano_train import CSV_FIELDS, ManoRun, append_row, parse_shape, sweep_grid, train_mano

NUMBER_OF_SHAPES = {1: 1, 2: 2, 3: 5, 4: 14}  # Catalan numbers: binary trees with n internal nodes


def evaluate_prefix(tokens: list[int], modulus: int) -> int:
    """An evaluator independent of the generator: scan the prefix expression from the right with a
    stack (the generator builds a tree top-down and evaluates it recursively)."""
    table = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    stack = []
    for token in reversed(tokens):
        name = mano.token_name(token)
        if name in table:
            left, right = stack.pop(), stack.pop()
            stack.append(table[name](left, right) % modulus)
        else:
            stack.append(int(name))
    assert len(stack) == 1, f"not one expression: {tokens}"
    return stack[0]


def check_sequence(ids: torch.Tensor, labels: torch.Tensor, position: int, answer: int, num_ops: int,
                   max_ops: int, modulus: int) -> None:
    """The layout of one row, and its answer against the independent evaluator."""
    row = ids.tolist()
    assert len(row) == 2 * max_ops + 5
    assert row[0] == mano.BOS and mano.token_name(row[1]) == f"<len_{num_ops}>"
    expression = row[2:position]
    assert len(expression) == 2 * num_ops + 1
    assert sum(t in mano.OPERATORS for t in expression) == num_ops
    assert all(t in mano.OPERATORS or 0 <= t < modulus for t in expression)
    assert row[position] == mano.ANS and row[position + 1] == answer
    assert set(row[position + 2:]) <= {mano.PAD}
    assert answer == evaluate_prefix(expression, modulus)
    # Labels: only the answer, at the <ans> position (labels[i] is the token after position i).
    expected = torch.full_like(labels, -100)
    expected[position] = answer
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("max_ops,modulus", [(1, 23), (4, 23), (6, 7), (10, 2)])
def test_training_batches_are_well_formed_and_answers_are_right(max_ops, modulus):
    data = mano.MANO(max_ops, batch_size=200, seed=3, modulus=modulus)
    for index in range(2):
        batch = data.batch(index)
        assert batch.input_ids.shape == batch.labels.shape == (200, mano.seq_len(max_ops))
        assert batch.input_ids.max() < mano.vocab_size(max_ops)
        for i in range(len(batch)):
            check_sequence(batch.input_ids[i], batch.labels[i], int(batch.answer_positions[i]),
                           int(batch.answers[i]), int(batch.num_ops[i]), max_ops, modulus)


def test_answers_of_hand_written_expressions():
    assert evaluate_prefix([mano.MINUS, mano.TIMES, 3, 9, mano.PLUS, 20, 5], 23) == (27 - 25) % 23
    assert evaluate_prefix([mano.MINUS, 0, 1], 23) == 22
    assert mano.apply_operator(mano.TIMES, 22, 22) == 1 and mano.apply_operator(mano.MINUS, 2, 5, 7) == 4


def test_training_lengths_cover_1_to_L_and_the_test_set_uses_exactly_L():
    train = mano.MANO(5, batch_size=500, seed=0).batch(0)
    counts = Counter(train.num_ops.tolist())
    assert sorted(counts) == [1, 2, 3, 4, 5] and min(counts.values()) > 60  # ~100 each
    test = mano.make_test_set(5, 300)
    assert test.num_ops.tolist() == [5] * 300
    assert test.answer_positions.tolist() == [2 * 5 + 3] * 300


def test_tree_shapes_operators_and_leaves_are_random():
    rng = np.random.default_rng(0)
    for n, shapes in NUMBER_OF_SHAPES.items():
        seen = {tuple(t in mano.OPERATORS for t in mano.random_expression(n, rng)[0]) for _ in range(600)}
        assert len(seen) == shapes, n
    tokens = [t for _ in range(500) for t in mano.random_expression(4, rng)[0]]
    operators = Counter(t for t in tokens if t in mano.OPERATORS)
    leaves = Counter(t for t in tokens if t not in mano.OPERATORS)
    assert set(operators) == set(mano.OPERATORS) and min(operators.values()) > 0.8 * 2000 / 3
    assert set(leaves) == set(range(23)) and min(leaves.values()) > 0.6 * 2500 / 23


def test_batches_are_deterministic_from_the_seed():
    a, b = mano.MANO(4, 16, seed=1), mano.MANO(4, 16, seed=1)
    assert torch.equal(a.batch(5).input_ids, b.batch(5).input_ids)
    assert torch.equal(next(iter(a)).input_ids, b.batch(0).input_ids)  # iteration = batch 0, 1, ...
    assert not torch.equal(a.batch(5).input_ids, a.batch(6).input_ids)
    assert not torch.equal(a.batch(5).input_ids, mano.MANO(4, 16, seed=2).batch(5).input_ids)


def test_the_held_out_test_set_is_fixed():
    first = mano.make_test_set(3, 3)
    assert [mano.render(row) for row in first.input_ids] == [
        "<bos> <len_3> + 20 * + 2 11 14 <ans> 18",
        "<bos> <len_3> + + 21 14 + 0 14 <ans> 3",
        "<bos> <len_3> + * + 4 0 2 16 <ans> 1",
    ]
    assert torch.equal(mano.make_test_set(3, 3).input_ids, first.input_ids)
    assert torch.equal(mano.make_test_set(3, 50).input_ids[:3], first.input_ids)  # a prefix of a larger set
    assert not torch.equal(mano.make_test_set(3, 3, seed=1).input_ids, first.input_ids)
    # The training stream of the same seed is another one.
    train = mano.MANO(3, 3, seed=mano.DEFAULT_TEST_SEED).batch(0)
    assert not torch.equal(train.input_ids, first.input_ids)


def all_expressions(num_ops: int, modulus: int) -> set[tuple[int, ...]]:
    """Every prefix expression with num_ops operators, enumerated (independently of the generator's
    counting formula)."""
    if num_ops == 0:
        return {(leaf,) for leaf in range(modulus)}
    return {(op, *left, *right) for op in mano.OPERATORS for k in range(num_ops)
            for left in all_expressions(k, modulus) for right in all_expressions(num_ops - 1 - k, modulus)}


@pytest.mark.parametrize("num_ops,modulus", [(1, 23), (2, 2), (3, 3), (4, 2)])
def test_count_expressions_counts_what_the_generator_can_draw(num_ops, modulus):
    space = all_expressions(num_ops, modulus)
    assert mano.count_expressions(num_ops, modulus) == len(space)
    if num_ops <= 2:  # small enough to draw every one
        rng = np.random.default_rng(0)
        drawn = {tuple(mano.random_expression(num_ops, rng, modulus)[0]) for _ in range(20 * len(space))}
        assert drawn == space


def test_training_never_draws_a_test_expression():
    """A space of 144 expressions with L = 2 operators over Z_2, 60 of them held out: without the
    exclusion training draws them often; with it never, and every redraw is counted."""
    test = mano.make_test_set(2, 60, modulus=2)
    held = set(test.expression_keys())
    assert len(held) == 60 and test.num_ops.tolist() == [2] * 60
    plain = mano.MANO(2, 200, seed=0, modulus=2)
    assert sum(key in held for i in range(5) for key in plain.batch(i).expression_keys()) > 100
    data = mano.MANO(2, 200, seed=0, modulus=2, held_out=test)
    batches = [data.batch(i) for i in range(5)]
    assert not held & {key for b in batches for key in b.expression_keys()}
    assert sum(b.excluded for b in batches) > 100
    assert sum(int((b.num_ops == 2).sum()) for b in batches) > 400  # the other 2-operator expressions remain
    assert torch.equal(data.batch(3).input_ids, batches[3].input_ids)  # still a function of the seed and index


def test_the_test_set_is_distinct_and_bounded_by_the_space():
    whole = mano.make_test_set(2, 144, modulus=2)  # every expression, each once
    assert len(set(whole.expression_keys())) == 144
    with pytest.raises(ValueError, match="size=145 exceeds the 144 distinct expressions with 2 operators over Z_2"):
        mano.make_test_set(2, 145, modulus=2)
    with pytest.raises(ValueError, match="holds all 144 expressions with 2 operators over Z_2"):
        mano.MANO(3, 4, modulus=2, held_out=whole)  # training at L = 3 draws 2-operator expressions too


def test_labels_follow_the_looplm_convention():
    """LoopLM's loss on a Mano batch is the CE of the answer read out at the <ans> position."""
    run = ManoRun(layers=1, loops=2, max_ops=3, hidden_size=16, num_heads=2)
    torch.manual_seed(0)
    model = LoopLM(run.model_config())
    batch = mano.MANO(3, 8, seed=0).batch(0)
    output = model(batch.input_ids, labels=batch.labels)
    rows = torch.arange(len(batch))
    for step, hidden in enumerate(output.hidden_states):
        logits = model.lm_head(hidden[rows, batch.answer_positions])
        assert torch.allclose(output.ce_per_loop[step], F.cross_entropy(logits.float(), batch.answers), atol=1e-5)


class _Oracle(torch.nn.Module):
    """A stand-in model whose read-out at position i is the one-hot of token i + 1 (`shift`=1): a
    perfect answerer if answer_accuracy reads the right position."""

    def __init__(self, vocab: int, shift: int = 1, loops: int = 3):
        super().__init__()
        self.vocab, self.shift, self.loops = vocab, shift, loops
        self.lm_head = torch.nn.Identity()

    def forward(self, input_ids, num_loops=None):
        hidden = F.one_hot(torch.roll(input_ids, -self.shift, dims=1), self.vocab).float()
        return SimpleNamespace(hidden_states=[hidden] * (num_loops or self.loops))


def test_answer_accuracy_reads_the_answer_position():
    test = mano.make_test_set(4, 100)
    vocab = mano.vocab_size(4)
    assert mano.answer_accuracy(_Oracle(vocab), test) == 1.0
    assert mano.answer_accuracy(_Oracle(vocab, shift=0), test) == 0.0  # predicts <ans>: not a number
    assert mano.loop_accuracies(_Oracle(vocab), test, num_loops=2) == [1.0, 1.0]


def test_answer_accuracy_of_a_looplm_and_its_mode_is_kept():
    run = ManoRun(layers=1, loops=3, max_ops=2, hidden_size=16, num_heads=2)
    model = LoopLM(run.model_config()).train()
    test = mano.make_test_set(2, 64)
    accuracies = mano.loop_accuracies(model, test)
    assert len(accuracies) == 3 and all(0 <= a <= 1 for a in accuracies)
    assert mano.answer_accuracy(model, test) == accuracies[-1]
    assert len(mano.loop_accuracies(model, test, num_loops=5)) == 5
    assert model.training


@pytest.mark.parametrize("objective", ["stage1", "last"])
def test_a_tiny_training_run_gives_a_csv_row(tmp_path, objective):
    lines = []
    run = ManoRun(layers=1, loops=2, max_ops=2, steps=3, batch_size=8, hidden_size=16, num_heads=2,
                  test_size=20, objective=objective)
    row = train_mano(run, log=lines.append, log_every=1, eval_every=2)
    assert set(row) == set(CSV_FIELDS)
    assert row["config"] == "1x2" and row["depth"] == 2 and row["steps"] == 3 and 0 <= row["accuracy"] <= 1
    assert 1 / 23 <= row["baseline"] <= 1 and isinstance(row["excluded"], int)
    assert 0 < row["cpu_seconds"] and 0 < row["seconds"]
    assert len(row["loop_accuracy"].split("/")) == 2 and row["params"] > 0
    assert any("step 3/3" in line and "it/s" in line and "ETA" in line for line in lines)
    assert any("step 2 test accuracy" in line for line in lines)
    path = tmp_path / "sub" / "results.csv"
    append_row(path, row)
    append_row(path, {**row, "seed": 1})
    text = path.read_text()
    assert text.count("config,layers") == 1
    assert [r["seed"] for r in csv.DictReader(text.splitlines())] == ["0", "1"]


def _append_rows(path, worker: int) -> None:
    row = dict.fromkeys(CSV_FIELDS, "x")
    for i in range(25):
        append_row(path, {**row, "config": f"{worker}x{i}"})


def test_processes_appending_to_one_csv_write_one_header_and_whole_rows(tmp_path):
    path = tmp_path / "shared.csv"
    context = multiprocessing.get_context("fork")  # torch is already imported: no start-up cost
    workers = [context.Process(target=_append_rows, args=(path, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_FIELDS) and lines.count(lines[0]) == 1
    rows = list(csv.DictReader(lines))
    assert sorted(r["config"] for r in rows) == sorted(f"{w}x{i}" for w in range(4) for i in range(25))
    assert all(len(r) == len(CSV_FIELDS) and r["params"] == "x" for r in rows)


def test_a_training_run_counts_its_excluded_draws():
    run = ManoRun(layers=1, loops=1, max_ops=2, modulus=2, steps=4, batch_size=64, hidden_size=16, num_heads=2,
                  test_size=100)
    row = train_mano(run, log=None)
    assert row["excluded"] > 20  # 100 of the 144 two-operator expressions are held out


def test_sweep_grid_order_varies_the_seed_fastest_and_unlooped_shapes_run_one_objective():
    grid = sweep_grid(["2x1", "2x4"], [3], ["last", "stage1"], [1e-3, 2e-3], [10], [0, 1], hidden_size=16)
    assert [(r.config_name, r.objective, r.lr, r.seed) for r in grid[:6]] == [
        ("2x1", "last", 1e-3, 0), ("2x1", "last", 1e-3, 1), ("2x1", "last", 2e-3, 0), ("2x1", "last", 2e-3, 1),
        ("2x4", "last", 1e-3, 0), ("2x4", "last", 1e-3, 1)]
    assert [(r.config_name, r.objective) for r in grid[8:9]] == [("2x4", "stage1")]
    assert len(grid) == 12 and all(r.hidden_size == 16 for r in grid)


def test_bad_inputs_name_the_value(tmp_path):
    assert parse_shape(" 12X3 ") == (12, 3)
    for bad in ("2y4", "2x0", "x4", ""):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_shape(bad)
    with pytest.raises(ValueError, match="layers=0"):
        ManoRun(layers=0)
    with pytest.raises(ValueError, match="objective='final'"):
        ManoRun(objective="final")
    with pytest.raises(ValueError, match="max_ops=0"):
        mano.MANO(0, 4)
    with pytest.raises(ValueError, match="modulus=24"):
        mano.MANO(3, 4, modulus=24)
    with pytest.raises(ValueError, match="num_ops=5 is outside 1..max_ops=4"):
        mano.make_batch([5], np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match="token id -5"):
        mano.token_name(-5)
    with pytest.raises(ValueError, match="result row lacks the columns"):
        append_row(tmp_path / "x.csv", {"config": "2x4"})
    assert not (tmp_path / "x.csv").exists()
