import pytest
import torch
import torch.distributed as dist

from looplm_mega.model.cross_entropy import IGNORE_INDEX, linear_cross_entropy, sliced_linear_cross_entropy
from tests.distributed import run_distributed
from tests.helpers import Slices


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(53, 16, generator=g, dtype=dtype) * 0.3).requires_grad_()
    labels = torch.randint(0, 53, (37,), generator=g)
    labels[[3, 11, 30]] = IGNORE_INDEX
    token_weights = torch.rand(37, generator=g, dtype=torch.float32, requires_grad=True)
    return hidden, weight, labels, token_weights


def _loss_and_grads(fused, chunk, **kw):
    hidden, weight, labels, token_weights = _inputs(**kw)
    loss, ce = linear_cross_entropy(hidden, weight, labels, token_weights, chunk_tokens=chunk, fused=fused)
    (loss * 1.7).backward()  # a non-unit upstream gradient must be honoured
    return loss, ce, hidden.grad, weight.grad, token_weights.grad


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
def test_fused_equals_naive_loss_and_every_gradient(chunk):
    naive = _loss_and_grads(False, chunk)
    fused = _loss_and_grads(True, chunk)
    for a, b in zip(fused, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.all(naive[1][[3, 11, 30]] == 0) and torch.all(naive[2][[3, 11, 30]] == 0)


def test_matches_hand_computation():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([2, 0])
    token_weights = torch.tensor([0.25, 0.5])
    loss, ce = linear_cross_entropy(hidden, weight, labels, token_weights, chunk_tokens=1)
    logits = [[1.0, 0.0, 1.0], [0.0, 2.0, 2.0]]
    expected_ce = [torch.logsumexp(torch.tensor(row), 0) - row[y] for row, y in zip(logits, [2, 0])]
    torch.testing.assert_close(ce, torch.stack(expected_ce))
    torch.testing.assert_close(loss, 0.25 * expected_ce[0] + 0.5 * expected_ce[1])


def test_bf16_autocast_is_close_to_fp32():
    reference = _loss_and_grads(True, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _loss_and_grads(True, 8)
    torch.testing.assert_close(mixed[0], reference[0], rtol=2e-2, atol=2e-2)
    assert mixed[2].dtype == torch.float32 and mixed[3].dtype == torch.float32
    torch.testing.assert_close(mixed[3], reference[3], rtol=5e-2, atol=5e-3)


def test_without_grad_nothing_is_kept():
    hidden, weight, labels, token_weights = _inputs()
    with torch.no_grad():
        loss, ce = linear_cross_entropy(hidden, weight, labels, token_weights, chunk_tokens=4)
    assert loss.grad_fn is None and torch.isfinite(ce).all()


@pytest.mark.parametrize("count, chunk, vocab", [(1, 64, 53), (4, 5, 53), (8, 37, 41), (8, 1, 53)])
def test_sliced_equals_fused_loss_and_every_gradient(count, chunk, vocab):
    """Rows padded to a multiple of the slices; with vocab 41 of 56 rows the last slice is all padding."""
    def run(sliced):
        hidden, weight, labels, token_weights = _inputs()
        labels = torch.where(labels >= vocab, labels % vocab, labels)
        weight = torch.cat((weight.detach(), torch.randn(56 - 53, 16))).requires_grad_()
        if sliced:
            slices = Slices(weight, count)
            loss, ce = sliced_linear_cross_entropy(hidden, slices, labels, token_weights, chunk, vocab_size=vocab)
            assert slices.gathered == list(range(count)) and not slices.grads  # the forward hands nothing over
            (loss * 1.7).backward()
            assert slices.gathered == 2 * list(range(count))
            weight_grad = slices.grad()
        else:
            loss, ce = linear_cross_entropy(hidden, weight, labels, token_weights, chunk_tokens=chunk, vocab_size=vocab)
            (loss * 1.7).backward()
            weight_grad = weight.grad
        return loss, ce, hidden.grad, weight_grad, token_weights.grad

    fused, sliced = run(False), run(True)
    for a, b in zip(sliced, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.all(sliced[3][vocab:] == 0)


def test_sliced_bf16_autocast_is_close_to_fp32():
    def run():
        hidden, weight, labels, token_weights = _inputs()
        slices = Slices(torch.cat((weight.detach(), torch.zeros(3, 16))), 4)
        loss, _ = sliced_linear_cross_entropy(hidden, slices, labels, token_weights, 8, vocab_size=53)
        loss.backward()
        return loss, hidden.grad, slices.grad()

    reference = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run()
    torch.testing.assert_close(mixed[0], reference[0], rtol=2e-2, atol=2e-2)
    assert mixed[1].dtype == torch.float32
    torch.testing.assert_close(mixed[2], reference[2], rtol=5e-2, atol=5e-3)


def _sliced_equals_fused_vocabulary_parallel() -> None:
    """Two ranks, each with half of a padded vocabulary (53 of 2 x 32 rows), as under TP: the
    sliced path's statistics combine across the ranks as the fused path's do."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def run(sliced):
        hidden, weight, labels, token_weights = _inputs()
        full = torch.cat((weight.detach(), torch.randn(64 - 53, 16, generator=torch.Generator().manual_seed(5))))
        local = full[rank * 32:(rank + 1) * 32].clone().requires_grad_()
        if sliced:
            slices = Slices(local, 4)
            loss, ce = sliced_linear_cross_entropy(hidden, slices, labels, token_weights, 7, vocab_size=53,
                                                   group=dist.group.WORLD)
            (loss * 1.7).backward()
            return loss, ce, hidden.grad, slices.grad(), token_weights.grad
        loss, ce = linear_cross_entropy(hidden, local, labels, token_weights, chunk_tokens=7, vocab_size=53,
                                        group=dist.group.WORLD)
        (loss * 1.7).backward()
        return loss, ce, hidden.grad, local.grad, token_weights.grad

    fused, sliced = run(False), run(True)
    for a, b in zip(sliced, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dist.destroy_process_group()


def test_sliced_equals_fused_under_vocabulary_parallelism():
    run_distributed(_sliced_equals_fused_vocabulary_parallel, 2, timeout=120)
