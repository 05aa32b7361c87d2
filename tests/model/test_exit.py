import torch

from looplm_mega.model.exit import exit_cdf, exit_entropy, exit_log_probs, expected_exit_loop


def test_exit_distribution_matches_the_formula():
    torch.manual_seed(0)
    z = torch.randn(5, 3, 4, dtype=torch.float64) * 3
    lam = torch.sigmoid(z)
    expected = []
    survival = torch.ones_like(lam[0])
    for t in range(5):
        if t < 4:
            expected.append(lam[t] * survival)
            survival = survival * (1 - lam[t])
        else:
            expected.append(survival)
    p = exit_log_probs(z).exp()
    torch.testing.assert_close(p, torch.stack(expected).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.sum(0), torch.ones(3, 4))
    cdf = exit_cdf(z)
    torch.testing.assert_close(cdf[-1], torch.ones(3, 4))
    torch.testing.assert_close(cdf[:-1], (1 - torch.cumprod(1 - lam, 0)[:-1]).float(), rtol=1e-5, atol=1e-6)


def test_single_step_is_certain_and_extreme_gates_stay_finite():
    z = torch.tensor([[80.0, -80.0, 0.0]])
    assert torch.equal(exit_log_probs(z).exp(), torch.ones(1, 3))
    z = torch.tensor([[200.0], [-200.0], [3.0]])
    log_p = exit_log_probs(z)
    assert torch.isfinite(exit_entropy(log_p)).all()
    torch.testing.assert_close(expected_exit_loop(log_p), torch.tensor([1.0]))
