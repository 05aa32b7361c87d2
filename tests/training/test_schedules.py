import pytest

from looplm_mega.training.config import OptimizerConfig, ScheduleConfig
from looplm_mega.training.schedules import learning_rate

OPT = OptimizerConfig(lr=1.0, min_lr=0.1)


def _curve(kind, total=100, warmup=10, **kw):
    schedule = ScheduleConfig(kind=kind, warmup_steps=warmup, **kw)
    return [learning_rate(s, total, OPT, schedule) for s in range(total)]


def test_warmup_is_linear_to_the_peak():
    curve = _curve("constant")
    assert curve[0] == pytest.approx(0.1) and curve[9] == pytest.approx(1.0) and curve[50] == 1.0


def test_cosine_falls_monotonically_to_min_lr():
    curve = _curve("cosine")
    tail = curve[10:]
    assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert curve[10] == pytest.approx(1.0) and learning_rate(100, 100, OPT, ScheduleConfig("cosine", 10)) == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    curve = _curve("wsd", decay_fraction=0.2)
    assert all(v == 1.0 for v in curve[10:80])
    assert curve[80] == 1.0 and curve[90] == pytest.approx(0.55) and curve[99] < 0.15
