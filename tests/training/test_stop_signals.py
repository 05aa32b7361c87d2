"""Stop signals: a request, not a kill, from the first moment of the entry point."""

import os
import signal
import subprocess
import sys
import time

from looplm_mega.config import save_yaml
from looplm_mega.training import stop_signals

from tests.training.runs import run_config


def test_a_signal_becomes_a_request_and_uninstall_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop_signals.install()
    try:
        assert not stop_signals.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert stop_signals.requested()
    finally:
        stop_signals.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before and not stop_signals.requested()


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (Linux: SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (sig - 1) & 1)


def test_a_signal_during_start_up_stops_the_run_cleanly_before_it_trains(dataset, tmp_path):
    path = tmp_path / "run.yaml"
    save_yaml(run_config(dataset, tmp_path / "run", training={"train_steps": 50}), path)
    process = subprocess.Popen([sys.executable, "-m", "looplm_mega.pretrain", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not _catches(process.pid, signal.SIGUSR1):
        assert process.poll() is None and time.time() < deadline, "the entry point never installed its handler"
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR1)  # still importing torch: seconds before the engine exists
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "stop requested (SIGTERM/SIGUSR1): nothing trained yet, exiting" in output, output
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
