"""PNG plots of the loop-step evaluation (per_loop.PerLoopMetrics).

matplotlib is optional (the `eval` extra) and imported only when a plot is drawn. The figures use
the Agg canvas directly rather than pyplot, so drawing neither needs a display nor changes the
backend of a caller's own pyplot session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def require_matplotlib() -> None:
    """Fail early, before a long evaluation, when the plots could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install .[eval]") from None


def _figure(width: float = 6.4, height: float = 4.0):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    """Write the PNG under a temporary name in the same folder, then rename it: a reader never
    sees a half-written file, and a failed write leaves any previous plot in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: its files are private (0600)
    try:
        figure.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plot_ce_per_loop(path: str | Path, ce_per_loop: Sequence[float], accuracy_per_loop: Sequence[float],
                       adaptive_ce: Optional[float] = None, exit_threshold: Optional[float] = None,
                       title: str = "Validation per loop step") -> Path:
    """CE of each step's read-out (left axis), its accuracy (right axis) and, if given, the CE of
    reading each token out at its Q-exit step (a dashed line)."""
    figure = _figure()
    ax = figure.add_subplot()
    steps = range(1, len(ce_per_loop) + 1)
    ce_line = ax.plot(steps, ce_per_loop, "o-", color="tab:blue", label="cross-entropy")
    ax.set_xlabel("loop step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.ticklabel_format(axis="y", useOffset=False)  # absolute values, not "+4.597" and offsets
    ax.set_xticks(list(steps))
    lines = list(ce_line)
    if adaptive_ce is not None:
        label = "adaptive CE" + (f" (q={exit_threshold:g})" if exit_threshold is not None else "")
        lines.append(ax.axhline(adaptive_ce, color="tab:blue", linestyle="--", alpha=0.6, label=label))
    accuracy_axis = ax.twinx()
    lines += accuracy_axis.plot(steps, accuracy_per_loop, "s-", color="tab:orange", label="accuracy")
    accuracy_axis.set_ylabel("next-token accuracy")
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    ax.set_title(title)
    return _save(figure, path)


def plot_exit_histogram(path: str | Path, exit_loop_counts: Sequence[int],
                        exit_prob_per_loop: Optional[Sequence[float]] = None,
                        exit_threshold: Optional[float] = None, title: str = "Exit steps") -> Path:
    """Fraction of tokens exiting at each step under Q-exit (bars) and, if given, the mean exit
    probability p(t) of each step (markers): the two agree only where the gate is confident."""
    figure = _figure()
    ax = figure.add_subplot()
    total = max(sum(exit_loop_counts), 1)
    steps = list(range(1, len(exit_loop_counts) + 1))
    label = "Q-exit" + (f" (q={exit_threshold:g})" if exit_threshold is not None else "")
    ax.bar(steps, [c / total for c in exit_loop_counts], color="tab:green", alpha=0.7, label=label)
    if exit_prob_per_loop is not None:
        ax.plot(steps, exit_prob_per_loop, "D", color="black", label="mean p(t)")
    ax.set_xlabel("exit step")
    ax.set_ylabel("fraction of tokens")
    ax.set_xticks(steps)
    ax.set_ylim(0, 1)
    ax.legend(loc="best")
    ax.set_title(title)
    return _save(figure, path)
