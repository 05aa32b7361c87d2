"""Mano (knowledge manipulation), the Ouro paper's synthetic task: evaluate an arithmetic
expression over F_23 written in prefix notation.

    <bos> <len_3> - * a b + c d <ans> x <pad> ...

An expression with n operators is a random binary tree with n internal nodes (operators drawn
uniformly from + - *) and n + 1 leaves (numbers drawn uniformly from 0..22): 2n + 1 tokens. The
model reads the expression and must put the value mod 23 right after <ans>. Training draws n
uniformly from 1..L for every sequence; the test set uses exactly n = L. Only the answer token
is scored and trained on (the expression tokens are random, so there is nothing else to learn).

Vocabulary (fixed ids; only how many <len_i> tokens exist depends on L):

    id 0..22          the numbers; token id == value, so an answer token *is* the answer
    id 23 24 25       + - *
    id 26 27 28       <bos> <ans> <pad>
    id 29 + (i - 1)   <len_i>, i = 1..L           vocab_size(L) = 29 + L

A smaller modulus p (2..23, `modulus=`) keeps the vocabulary and its ids and only draws numbers
from 0..p-1. The paper's F_23 has 3 x 23^2 = 1587 operator-table facts to memorise before any
composition can be learnt: measured, a 2-layer hidden-64 model trained on single operators alone
was at 70% after 2,000 steps, more than a CPU run can afford. With p = 5 (75 facts) a 1-layer
hidden-64 model still answered only about half of the single operators after 4,000 steps of the
1..3 mixture; with p = 3 (27 facts) it knew all of them after about 1,500 steps, leaving the rest
of a CPU run to composing them. p = 2 is degenerate: + and - are both XOR, so a tree of them is
the parity of its leaves, which one attention layer computes without composing anything.

The test set is held out: its expressions are distinct, and training never sees one of them. An
expression is identified by its prefix tokens (prefix notation of binary operators is unambiguous,
so equal tokens mean equal trees); a training draw whose tokens are a test expression's is
redrawn and counted (ManoBatch.excluded). Only draws with exactly L operators can collide. For the
test to measure composition rather than recall, the space must also dwarf the training draws:
count_expressions(L, p) = p^(L+1) 3^L Catalan(L) is 10,935 for p = 3 at L = 3 (a few thousand
steps draw every one), but 7.4 million at L = 5 and 210 million at L = 6.

Every sequence is padded on the right to seq_len(L) = 2L + 5 tokens, so a batch is one tensor.
Randomness is numpy's: training batch k is a function of (seed, k, the held-out set) alone (random
access, so a resumed or re-run job sees the same data), and the test set of (L, size, seed) is
always the same.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import AbstractSet, Iterator, Optional, Sequence

import numpy as np
import torch

from looplm_mega.model.cross_entropy import IGNORE_INDEX

MODULUS = 23
PLUS, MINUS, TIMES = 23, 24, 25
OPERATORS = (PLUS, MINUS, TIMES)
BOS, ANS, PAD = 26, 27, 28
FIRST_LEN_TOKEN = 29
# numpy seed-sequence streams: the training and test data never share random numbers, even when
# their seeds are equal.
TRAIN_STREAM, TEST_STREAM = 0, 1
DEFAULT_TEST_SEED = 1_000_003


def vocab_size(max_ops: int) -> int:
    _check_ops(max_ops, "max_ops")
    return FIRST_LEN_TOKEN + max_ops


def seq_len(max_ops: int) -> int:
    """<bos> <len_n>, 2n + 1 expression tokens, <ans> x."""
    _check_ops(max_ops, "max_ops")
    return 2 * max_ops + 5


def len_token(num_ops: int) -> int:
    _check_ops(num_ops, "num_ops")
    return FIRST_LEN_TOKEN + num_ops - 1


def token_name(token: int) -> str:
    """A readable name of a token id (for printing examples)."""
    if 0 <= token < MODULUS:
        return str(token)
    names = {PLUS: "+", MINUS: "-", TIMES: "*", BOS: "<bos>", ANS: "<ans>", PAD: "<pad>"}
    if token in names:
        return names[token]
    if token >= FIRST_LEN_TOKEN:
        return f"<len_{token - FIRST_LEN_TOKEN + 1}>"
    raise ValueError(f"token id {token} is not in the Mano vocabulary")


def render(tokens: Sequence[int]) -> str:
    """'<bos> <len_2> + 3 * 4 5 <ans> 0', without the padding."""
    return " ".join(token_name(int(t)) for t in tokens if int(t) != PAD)


def apply_operator(op: int, a: int, b: int, modulus: int = MODULUS) -> int:
    if op == PLUS:
        return (a + b) % modulus
    if op == MINUS:
        return (a - b) % modulus
    if op == TIMES:
        return (a * b) % modulus
    raise ValueError(f"token id {op} is not an operator (+ - * are {OPERATORS})")


def random_expression(num_ops: int, rng: np.random.Generator, modulus: int = MODULUS) -> tuple[list[int], int]:
    """A random expression with exactly `num_ops` operators: (prefix tokens, value mod `modulus`).

    Tree shape: the root's left subtree takes k of the remaining num_ops - 1 operators, k uniform
    in 0..num_ops-1, recursively (the random-binary-search-tree distribution: every shape has a
    chance, balanced ones more often than under the uniform-over-shapes law). All random numbers
    are drawn up front, three numpy calls per expression, which keeps batch generation cheap."""
    _check_ops(num_ops, "num_ops")
    check_modulus(modulus)
    ops = iter(rng.integers(0, len(OPERATORS), size=num_ops).tolist())
    leaves = iter(rng.integers(0, modulus, size=num_ops + 1).tolist())
    splits = iter(rng.random(num_ops).tolist())
    tokens: list[int] = []

    def build(n: int) -> int:  # appends the subtree's tokens in prefix order, returns its value
        if n == 0:
            leaf = next(leaves)
            tokens.append(leaf)
            return leaf
        op = OPERATORS[next(ops)]
        tokens.append(op)
        left = int(next(splits) * n)  # operators in the left subtree: 0..n-1
        a = build(left)
        b = build(n - 1 - left)
        return apply_operator(op, a, b, modulus)

    value = build(num_ops)
    return tokens, value


def count_expressions(num_ops: int, modulus: int = MODULUS) -> int:
    """How many distinct expressions have exactly `num_ops` operators: modulus^(n+1) leaves x
    3^n operators x Catalan(n) tree shapes."""
    _check_ops(num_ops, "num_ops")
    check_modulus(modulus)
    shapes = math.comb(2 * num_ops, num_ops) // (num_ops + 1)
    return modulus ** (num_ops + 1) * len(OPERATORS) ** num_ops * shapes


def expression_key(tokens: Sequence[int]) -> bytes:
    """An expression's identity: its prefix tokens (every id is below 256), as compact bytes."""
    return bytes(int(t) for t in tokens)


@dataclass
class ManoBatch:
    input_ids: torch.Tensor  # [B, seq_len] (right-padded with <pad>)
    labels: torch.Tensor  # [B, seq_len]: the answer at the <ans> position, -100 elsewhere
    answer_positions: torch.Tensor  # [B]: the index of <ans>, whose next token is the answer
    answers: torch.Tensor  # [B]: the value, 0..modulus-1 (== the answer token id)
    num_ops: torch.Tensor  # [B]: operators in each expression
    # Draws redrawn while making the batch: held-out expressions (training), repeats (the test set).
    excluded: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, end: int) -> "ManoBatch":
        """Rows start..end (for evaluation in chunks; `excluded` belongs to the whole batch)."""
        return ManoBatch(*(t[start:end] for t in (self.input_ids, self.labels, self.answer_positions,
                                                    self.answers, self.num_ops)))

    def expression_keys(self) -> list[bytes]:
        """expression_key of each row's expression (the tokens between <len_n> and <ans>)."""
        return [expression_key(row[2:position]) for row, position in
                zip(self.input_ids.tolist(), self.answer_positions.tolist())]


def make_batch(num_ops: Sequence[int], rng: np.random.Generator, max_ops: int, modulus: int = MODULUS,
               exclude: AbstractSet[bytes] = frozenset(), distinct: bool = False) -> ManoBatch:
    """One sequence per entry of num_ops, padded to seq_len(max_ops). Labels follow
    LoopLM.forward's convention (labels[:, i] is the token after position i): the only label is
    the answer, at the <ans> position. A draw whose expression_key is in `exclude` (or, with
    `distinct`, already in the batch) is redrawn from the same generator, so the batch stays a
    function of its seed; the redraws are counted."""
    if distinct:
        exclude = set(exclude)
    length = seq_len(max_ops)
    ids = np.full((len(num_ops), length), PAD, dtype=np.int64)
    labels = np.full((len(num_ops), length), IGNORE_INDEX, dtype=np.int64)
    positions, answers = [], []
    excluded = 0
    for row, n in enumerate(num_ops):
        if not 1 <= n <= max_ops:
            raise ValueError(f"num_ops={n} is outside 1..max_ops={max_ops}")
        expression, value = random_expression(int(n), rng, modulus)
        while exclude and expression_key(expression) in exclude:
            excluded += 1
            expression, value = random_expression(int(n), rng, modulus)
        if distinct:
            exclude.add(expression_key(expression))
        sequence = [BOS, len_token(int(n)), *expression, ANS, value]
        ids[row, : len(sequence)] = sequence
        answer_position = len(sequence) - 2  # the <ans> token
        labels[row, answer_position] = value
        positions.append(answer_position)
        answers.append(value)
    return ManoBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.tensor(positions),
                     torch.tensor(answers), torch.tensor([int(n) for n in num_ops]), excluded)


class MANO:
    """Training batches generated on the fly. Batch k depends only on (seed, k, held_out): every
    sequence's operator count is uniform in 1..max_ops, then its expression is drawn as in
    random_expression, and redrawn while it is one of `held_out`'s (the test set's) expressions."""

    def __init__(self, max_ops: int, batch_size: int, seed: int = 0, modulus: int = MODULUS,
                 held_out: Optional[ManoBatch] = None):
        _check_ops(max_ops, "max_ops")
        check_modulus(modulus)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.max_ops, self.batch_size, self.seed, self.modulus = max_ops, batch_size, seed, modulus
        self.exclude = frozenset(held_out.expression_keys()) if held_out is not None else frozenset()
        held = Counter(len(key) // 2 for key in self.exclude)  # 2n + 1 tokens: n operators
        for n, count in held.items():
            if n <= max_ops and count >= count_expressions(n, modulus):
                raise ValueError(f"the held-out set holds all {count} expressions with {n} operators over "
                                 f"Z_{modulus}: training could draw none of them")

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.max_ops)

    @property
    def seq_len(self) -> int:
        return seq_len(self.max_ops)

    def batch(self, index: int) -> ManoBatch:
        rng = np.random.default_rng([self.seed, TRAIN_STREAM, index])
        num_ops = rng.integers(1, self.max_ops + 1, size=self.batch_size).tolist()
        return make_batch(num_ops, rng, self.max_ops, self.modulus, self.exclude)

    def __iter__(self) -> Iterator[ManoBatch]:
        index = 0
        while True:
            yield self.batch(index)
            index += 1


def make_test_set(max_ops: int, size: int = 2000, seed: int = DEFAULT_TEST_SEED, modulus: int = MODULUS) -> ManoBatch:
    """The held-out test set: `size` distinct expressions with exactly max_ops operators, the same
    for the same (max_ops, size, seed, modulus) whatever the training seed (its numbers come from a
    stream that training never uses), and a smaller set is a prefix of a larger one. Pass it to
    MANO as `held_out` to keep its expressions out of training."""
    if size < 1:
        raise ValueError(f"test set size={size} must be at least 1")
    space = count_expressions(max_ops, modulus)
    if size > space:
        raise ValueError(f"test set size={size} exceeds the {space} distinct expressions with {max_ops} "
                         f"operators over Z_{modulus}")
    rng = np.random.default_rng([seed, TEST_STREAM])
    return make_batch([max_ops] * size, rng, max_ops, modulus, distinct=True)


@torch.no_grad()
def loop_predictions(model: torch.nn.Module, data: ManoBatch, num_loops: Optional[int] = None,
                     batch_size: int = 1000) -> torch.Tensor:
    """[T, N]: the argmax over the full vocabulary of each loop's read-out at the <ans> position
    (what greedy decoding would emit; a non-number counts as wrong). The model is put in eval mode
    for the call and its mode restored."""
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(data), batch_size):
            part = data.slice(start, start + batch_size)
            hidden = model(part.input_ids, num_loops=num_loops).hidden_states  # T x [b, S, H]
            rows = torch.arange(len(part))
            at_answer = torch.stack([h[rows, part.answer_positions] for h in hidden])  # [T, b, H]
            chunks.append(model.lm_head(at_answer).argmax(dim=-1))
        return torch.cat(chunks, dim=1)
    finally:
        model.train(was_training)


def loop_accuracies(model: torch.nn.Module, data: ManoBatch, num_loops: Optional[int] = None) -> list[float]:
    """Exact-match accuracy of the answer read out after each loop 1..T."""
    predictions = loop_predictions(model, data, num_loops)
    return (predictions == data.answers).float().mean(dim=1).tolist()


def answer_accuracy(model: torch.nn.Module, data: ManoBatch, num_loops: Optional[int] = None) -> float:
    """Exact-match accuracy of the answer token read out after the last loop (num_loops: that many
    loops instead of the model's total_ut_steps). Chance is 1/modulus (4.3% for 23)."""
    return loop_accuracies(model, data, num_loops)[-1]


def check_modulus(modulus: int) -> None:
    if not isinstance(modulus, (int, np.integer)) or isinstance(modulus, bool) or not 2 <= modulus <= MODULUS:
        raise ValueError(f"modulus={modulus!r} must be an integer in 2..{MODULUS} "
                         f"(the number tokens are 0..{MODULUS - 1})")


def _check_ops(value: int, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer of at least 1 (operators per expression)")
