import pytest
import torch

from looplm_mega.inference.exit_rules import ExitRule


def test_q_exit_on_known_gates():
    # lambda = 1/2 at every step: CDF = 0.5, 0.75, 0.875, 1.
    zeros = torch.zeros(4, 1)
    steps = [ExitRule("q_exit", threshold=q).read_out_loops(zeros).item() for q in (0.0, 0.3, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0)]
    assert steps == [0, 0, 0, 1, 1, 2, 3, 3]
    # A saturated gate: fp32 rounds CDF(1) = 1 - e^-200 to 1; q = 1 still runs every step.
    saturated = torch.full((3, 2), 200.0)
    assert ExitRule("q_exit", threshold=1.0).read_out_loops(saturated).tolist() == [2, 2]
    assert ExitRule("q_exit", threshold=0.999).read_out_loops(saturated).tolist() == [0, 0]
    assert ExitRule("q_exit", threshold=0.5).read_out_loops(torch.zeros(1, 3)).tolist() == [0, 0, 0]  # T = 1


def test_static_none_and_hidden_difference():
    gates = torch.zeros(4, 3)
    assert ExitRule("static", loops=2).read_out_loops(gates).tolist() == [1, 1, 1]
    assert ExitRule().read_out_loops(gates).tolist() == [3, 3, 3]
    # Token 0 settles after step 2 (|h2 - h1| = 0), token 1 after step 3, token 2 never.
    states = [torch.tensor([[0.0], [0.0], [0.0]]), torch.tensor([[0.0], [1.0], [1.0]]),
              torch.tensor([[5.0], [1.05], [3.0]]), torch.tensor([[5.0], [1.05], [5.0]])]
    assert ExitRule("hidden_diff", eps=0.1).read_out_loops(gates, states).tolist() == [1, 2, 3]


def test_bad_rules_name_the_value():
    with pytest.raises(ValueError, match="static exit at 5 loops"):
        ExitRule("static", loops=5).read_out_loops(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="exit threshold 1.5"):
        ExitRule("q_exit", threshold=1.5).check(4)
    with pytest.raises(ValueError, match="exit='sometimes'"):
        ExitRule("sometimes").check(4)
    with pytest.raises(ValueError, match="needs the read-out states"):
        ExitRule("hidden_diff", eps=0.1).read_out_loops(torch.zeros(4, 1))
