"""SIGTERM and SIGUSR1 as a request to stop: the trainer checkpoints at the next step boundary and
exits 0, so a scheduler (SLURM's --signal, a preemption) can requeue the job.

The entry point installs the handlers before its heavy imports: importing torch and DeepSpeed and
building the engine take tens of seconds, and a signal in that window would otherwise take the
signals' default action and kill the rank. A request that arrives before the first step stops the
run at its first step boundary without training. Plain module state, since a signal handler has
no other place to put it, and there is one run per process.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested = False
_previous: dict = {}


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Route the stop signals to the request flag (idempotent)."""
    for sig in STOP_SIGNALS:
        if sig not in _previous:
            _previous[sig] = signal.signal(sig, _on_signal)


def uninstall() -> None:
    """Give the signals back their handlers from before install() and forget any request."""
    global _requested
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _requested = False


def requested() -> bool:
    return _requested
