"""A CPU run under DeepSpeed leaves /dev/shm as it found it: the shared-memory all-reduce buffer
DeepSpeed creates for each rank (when all ranks share one machine, as under the deepspeed
launcher) loses its name as soon as every rank has mapped it, whether the run then ends cleanly or
is killed (training/distributed.py)."""

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, run_config, write_dataset

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir() or torch.cuda.is_available(),
                                reason="DeepSpeed's shared-memory all-reduce: CPU runs on Linux")


def _record_buffer(folder: Path) -> None:
    """Write down this rank's buffer, and check that DeepSpeed made it, this process still maps
    it and its name is gone (the kernel marks such a mapping "(deleted)")."""
    import torch.distributed as dist

    from looplm_mega.training.distributed import shared_memory_buffer

    path = shared_memory_buffer()
    (folder / f"rank{dist.get_rank()}").write_text(str(path))
    maps = Path("/proc/self/maps").read_text()
    assert f"{path} (deleted)" in maps, f"{path} is not mapped, or still named: DeepSpeed made no buffer?"


def _train_then_record(config, folder: Path) -> None:
    _pretrain(config)
    _record_buffer(folder)


def _start_then_die(folder: Path) -> None:
    import deepspeed.comm

    from looplm_mega.training.distributed import init_distributed

    init_distributed()
    _record_buffer(folder)
    total = torch.full((4,), float(deepspeed.comm.get_rank() + 1))
    deepspeed.comm.inference_all_reduce(total)  # the all-reduce through the unnamed buffers still works
    assert total.tolist() == [3.0] * 4
    os.kill(os.getpid(), signal.SIGKILL)  # no exit handler runs


def _buffers(folder: Path) -> list[Path]:
    paths = [Path(f.read_text()) for f in sorted(folder.glob("rank*"))]
    assert len(paths) == 2
    return paths


@pytest.fixture
def as_the_deepspeed_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "2")  # all ranks on this machine: DeepSpeed makes its buffers


def test_a_two_process_run_leaves_no_shared_memory(as_the_deepspeed_launcher, tmp_path):
    config = run_config(write_dataset(tmp_path / "tokens"), tmp_path / "run", training={"train_steps": 2})
    run_distributed(_train_then_record, 2, config, tmp_path)
    assert [p for p in _buffers(tmp_path) if p.exists()] == []


def test_a_killed_run_leaves_no_shared_memory(as_the_deepspeed_launcher, tmp_path):
    with pytest.raises(Exception, match="SIGKILL|-9"):  # torch's join reports the first rank killed
        run_distributed(_start_then_die, 2, tmp_path)
    assert [p for p in _buffers(tmp_path) if p.exists()] == []
