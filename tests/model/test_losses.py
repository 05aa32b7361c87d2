import math

import torch

from looplm_mega.model.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from looplm_mega.model.exit import exit_log_prob, exit_log_probs
from looplm_mega.model.losses import objective_terms

from tests.helpers import build_model


def _problem(seed=0, steps=3, tokens=6, hidden=4, vocab=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(steps, tokens, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    z = torch.randn(steps, tokens, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[2] = IGNORE_INDEX
    return h, w, z, y


def _head(weight, fused, chunk_tokens):
    return lambda hidden, labels, token_weights: linear_cross_entropy(
        hidden, weight, labels, token_weights, chunk_tokens=chunk_tokens, fused=fused)


def _hand_ce(h, w, y):
    """CE[t][i] with python loops."""
    steps, tokens, _ = h.shape
    out = torch.zeros(steps, tokens, dtype=torch.float64)
    for t in range(steps):
        for i in range(tokens):
            if y[i] == IGNORE_INDEX:
                continue
            logits = w @ h[t, i]
            out[t, i] = torch.logsumexp(logits, 0) - logits[y[i]]
    return out


def test_stage1_equals_hand_computation():
    h, w, z, y = _problem()
    ce = _hand_ce(h, w, y)
    lam = torch.sigmoid(z)
    total, count = 0.0, 0
    for i in range(h.shape[1]):
        if y[i] == IGNORE_INDEX:
            continue
        survival, probs = 1.0, []
        for t in range(3):
            probs.append(lam[t, i] * survival if t < 2 else survival)
            survival = survival * (1 - lam[t, i])
        entropy = -sum(p * math.log(p) for p in probs)
        total += sum(p * ce[t, i] for t, p in enumerate(probs)) - 0.1 * entropy
        count += 1
    for fused in (True, False):
        out = objective_terms("stage1", h.float(), z.float(), exit_log_probs(z.float()), y, _head(w.float(), fused, 4), 0, 3,
                              beta=0.1)
        torch.testing.assert_close(out.loss, (total / count).float(), rtol=1e-5, atol=1e-6)
        valid = y != IGNORE_INDEX
        torch.testing.assert_close(out.ce_per_loop, (ce[:, valid].mean(1)).float(), rtol=1e-5, atol=1e-6)


def test_stage1_gradients_fused_equal_naive():
    h, w, z, y = _problem(seed=1, steps=4, tokens=9)
    results = []
    for fused in (True, False):
        hh, ww, zz = (t.float().clone().requires_grad_() for t in (h, w, z))
        objective_terms("stage1", hh, zz, exit_log_probs(zz), y, _head(ww, fused, 5), 0, 4, beta=0.05).loss.backward()
        results.append((hh.grad, ww.grad, zz.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stage2_equals_hand_computation():
    _, _, z, y = _problem(steps=4)
    g = torch.Generator().manual_seed(3)
    ce = torch.rand(4, 6, generator=g, dtype=torch.float64) * 0.02 + torch.linspace(2.0, 1.99, 4, dtype=torch.float64).unsqueeze(1)
    valid = [i for i in range(6) if y[i] != IGNORE_INDEX]
    total = 0.0
    for t in range(1, 4):
        terms = []
        for i in valid:
            improvement = max(0.0, float(ce[t - 1, i] - ce[t, i]))
            w = 1 / (1 + math.exp(-50.0 * (improvement - 0.005)))
            lam = 1 / (1 + math.exp(-float(z[t, i])))
            terms.append(-(w * math.log(1 - lam) + (1 - w) * math.log(lam)))
        total += sum(terms) / len(terms)
    given_ce = lambda hidden, labels, weights: (torch.zeros(()), ce.float().flatten())  # noqa: E731
    h = torch.zeros(4, 6, 2)
    loss = objective_terms("stage2", h, z.float(), exit_log_probs(z.float()), y, given_ce, 0, 4).loss
    torch.testing.assert_close(loss, torch.tensor(total / 4, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_stage2_trains_only_the_gate():
    model = build_model()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=ids, objective="stage2")
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert out.ce_per_loop.shape == (3,)


def test_loop_by_loop_terms_add_up_to_the_whole_objectives():
    """A pipeline forms the objectives one loop at a time, carrying the log-survival and the previous
    loop's CE; the terms add up to the whole objectives, and so do their gradients and statistics."""
    h, w, z, y = _problem(steps=4)
    head = _head(w, fused=True, chunk_tokens=4)
    for name in ("stage1", "stage2"):
        z_whole, z_loops = z.clone().requires_grad_(), z.clone().requires_grad_()
        whole = objective_terms(name, h, z_whole, exit_log_probs(z_whole), y, head, 0, 4, beta=0.1)
        log_survival, previous_ce, total = torch.zeros(6), None, None
        for t in range(4):
            log_p, log_survival = exit_log_prob(z_loops[t], log_survival, last=t == 3)
            terms = objective_terms(name, h[t:t + 1], z_loops[t:t + 1], log_p[None], y, head, t, 4, 0.1, previous_ce)
            previous_ce = terms.token_ce[0]
            total = terms if total is None else total + terms
        # The exit distribution is formed in fp32.
        torch.testing.assert_close(total.loss.double(), whole.loss.double(), rtol=1e-6, atol=1e-6)
        for field in ("ce_per_loop", "token_ce", "exit_entropy", "mean_exit_loop", "gate_mean_per_loop"):
            torch.testing.assert_close(getattr(total, field).double(), getattr(whole, field).double(), rtol=1e-6, atol=1e-6)
        whole.loss.backward()
        total.loss.backward()
        torch.testing.assert_close(z_loops.grad, z_whole.grad, rtol=1e-6, atol=1e-6)
