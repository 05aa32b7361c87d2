"""The smoke set: `python -m pytest -q -m "not slow" tests` runs in under a minute. Slow are the
tests that start processes of their own (several ranks, launchers, tool command lines, a local
SLURM): listed here by module, in one place, so that a new slow module is one line."""

import os

import pytest
import torch

from looplm_mega.training.distributed import cpu_threads

# Under pytest-xdist the workers split the cores, and so do the processes they start (tools run as
# command lines inherit OMP_NUM_THREADS).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = cpu_threads(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)

SLOW_MODULES = (
    "tests/eval/test_harness.py",
    "tests/examples/test_quickstart.py",
    "tests/examples/test_recipes.py",
    "tests/faults/",
    "tests/parallel/",
    "tests/slurm/",
    "tests/tasks/",
    "tests/test_cli.py",
    "tests/test_packaging.py::test_a_plain_install",
    "tests/test_pretrain.py",
    "tests/data/test_gpt_dataset.py::test_rank_0_builds",
    "tests/data/test_preprocess.py",
    "tests/tools/",
    "tests/training/test_curriculum.py",
    "tests/training/test_optimizer.py",
    "tests/training/test_pipeline_engine.py",
    "tests/training/test_stop_signals.py",
    "tests/training/test_trainer.py",
    "tests/training/test_trainer_pipeline.py",
    "tests/training/test_trainer_tensor_parallel.py",
    "tests/training/test_upcycle.py",
)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.startswith(SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
