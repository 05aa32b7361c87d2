import pytest
import torch

from looplm_mega.model.cross_entropy import IGNORE_INDEX, linear_cross_entropy


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
