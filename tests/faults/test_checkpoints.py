"""Runs that lose their ranks or change their layout, for real on two gloo processes: a kill -9 at
each phase of a save, then a resume; resumes at another data- or tensor-parallel layout. Each is
compared with a run that was never interrupted (6 steps under ZeRO-2 on 2 ranks, checkpoints at
steps 3 and 6): the same losses, every step once in metrics.jsonl."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from looplm_mega.training.checkpoint import LATEST, complete_checkpoints

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, run_config, train_losses, write_dataset

ZERO2 = {"zero_stage": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "tokens")


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    run_distributed(_pretrain, 2, run_config(dataset, run_dir, deepspeed=ZERO2))
    return run_dir


def _resumable_copy(source: Path, tag: str, run_dir: Path) -> Path:
    """A run directory holding only `source`'s checkpoint `tag`, as latest."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / LATEST).write_text(tag)
    return run_dir


def _train_records(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def _assert_continues(run_dir: Path, reference: Path, steps: list[int]) -> None:
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == steps
    np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)


# --- kill -9 during a save -----------------------------------------------------------------------
PHASES = ["before_shards", "during_a_shard", "before_manifest", "before_latest", "after_latest"]


def _pretrain_killed(config, phase: str, pids: str) -> None:
    """pretrain, every rank killed (SIGKILL, no handler runs) at `phase` of its first save."""
    import looplm_mega.training.checkpoint as checkpoint
    from looplm_mega.training.deepspeed_engine import DeepSpeedEngine

    Path(pids, os.environ["RANK"]).write_text(str(os.getpid()))

    def kill_every_rank():
        for f in Path(pids).iterdir():
            if int(f.read_text()) != os.getpid():
                os.kill(int(f.read_text()), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    save, write_text = DeepSpeedEngine.save, checkpoint._write_text

    def engine_save(self, checkpoint_dir, tag):
        if phase == "before_shards":
            kill_every_rank()
        written = save(self, checkpoint_dir, tag)
        if phase == "during_a_shard":
            written[0].write_bytes(written[0].read_bytes()[: written[0].stat().st_size // 2])
            kill_every_rank()
        return written

    def written_text(path, text):
        if (phase, path.name) in (("before_manifest", checkpoint.MANIFEST), ("before_latest", LATEST)):
            kill_every_rank()
        write_text(path, text)

    DeepSpeedEngine.save = engine_save
    checkpoint._write_text = written_text
    checkpoint._prune = lambda *args, **kwargs: kill_every_rank()  # after latest moved
    _pretrain(config)


@pytest.mark.parametrize("phase", PHASES)
def test_a_kill_at_any_phase_of_a_save_resumes_from_a_complete_checkpoint(dataset, reference, tmp_path, phase):
    run_dir = _resumable_copy(reference, "step00000003", tmp_path / "run")
    config = run_config(dataset, run_dir, deepspeed=ZERO2)
    (tmp_path / "pids").mkdir()
    with pytest.raises(Exception, match="SIGKILL|exited with codes"):  # every rank killed
        run_distributed(_pretrain_killed, 2, config, phase, str(tmp_path / "pids"), timeout=300)
    assert _train_records(run_dir) == [4, 5, 6]  # the lost attempt trained and logged, then died saving step 6
    latest = (run_dir / "checkpoints" / LATEST).read_text()
    assert latest == ("step00000006" if phase == "after_latest" else "step00000003")
    run_distributed(_pretrain, 2, config)
    assert _train_records(run_dir) == [4, 5, 6]  # every step once, as after a clean run
    _assert_continues(run_dir, reference, [4, 5, 6])
    assert (run_dir / "checkpoints" / LATEST).read_text() == "step00000006"
    assert complete_checkpoints(run_dir / "checkpoints")[-1] == "step00000006"


# --- a resume at another layout ------------------------------------------------------------------
def test_nodes_lost_then_added_the_run_continues_at_each_data_parallel_size(dataset, reference, tmp_path):
    every_step = {"save_interval": 1}
    dp1 = _resumable_copy(reference, "step00000003", tmp_path / "dp1")
    run_distributed(_pretrain, 1, run_config(dataset, dp1, deepspeed=ZERO2, training=every_step))  # DP 2 -> 1
    _assert_continues(dp1, reference, [4, 5, 6])
    dp2 = _resumable_copy(dp1, "step00000004", tmp_path / "dp2")
    run_distributed(_pretrain, 2, run_config(dataset, dp2, deepspeed=ZERO2))  # DP 1 -> 2
    _assert_continues(dp2, reference, [5, 6])
    assert not list(dp1.glob(".converting-*")) and not list(dp2.glob(".converting-*"))


def test_a_tensor_parallel_checkpoint_continues_without_tensor_parallelism(dataset, reference, tmp_path):
    tp2 = _resumable_copy(reference, "step00000003", tmp_path / "tp2")  # DP 2 -> TP 2
    run_distributed(_pretrain, 2, run_config(dataset, tp2, deepspeed=ZERO2, parallel={"tp": 2}, training={"save_interval": 1}))
    _assert_continues(tp2, reference, [4, 5, 6])
    tp1 = _resumable_copy(tp2, "step00000004", tmp_path / "tp1")  # TP 2 -> 1
    run_distributed(_pretrain, 1, run_config(dataset, tp1, deepspeed=ZERO2))
    _assert_continues(tp1, reference, [5, 6])


def test_a_zero3_checkpoint_with_other_optimizer_sub_groups_continues_through_conversion(dataset, tmp_path):
    # ZeRO-3's optimizer files are laid out by sub-group: a checkpoint written with other sub-groups
    # (DeepSpeed's default, as every ZeRO-3 checkpoint from before they were sized) cannot load as
    # it is; the run converts it, as for any other layout, and continues as it would have.
    old = {"zero_stage": 3, "extra": {"zero_optimization": {"sub_group_size": 10**9}}}
    reference = tmp_path / "reference"
    run_distributed(_pretrain, 2, run_config(dataset, reference, deepspeed=old))
    resumed = _resumable_copy(reference, "step00000003", tmp_path / "resumed")
    run_distributed(_pretrain, 2, run_config(dataset, resumed, deepspeed={"zero_stage": 3}))
    _assert_continues(resumed, reference, [4, 5, 6])
    assert not list(resumed.glob(".converting-*"))


@pytest.mark.parametrize("damage", ["latest", "shard"])
def test_a_damaged_checkpoint_stops_the_entry_point_with_one_message(dataset, reference, tmp_path, damage):
    import subprocess
    import sys

    from looplm_mega.config import save_yaml

    run_dir = _resumable_copy(reference, "step00000006", tmp_path / "run")
    if damage == "latest":
        (run_dir / "checkpoints" / LATEST).write_text("step00000009")
    else:
        shard = sorted((run_dir / "checkpoints" / "step00000006").glob("*optim_states.pt"))[0]
        shard.write_bytes(shard.read_bytes()[:1000])
    save_yaml(run_config(dataset, run_dir, deepspeed=ZERO2), tmp_path / "run.yaml")
    done = subprocess.run([sys.executable, "-m", "looplm_mega.pretrain", "--config", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("checkpoint error: ") and "--training.resume_from none" in message
    assert ("names 'step00000009'" if damage == "latest" else "optim_states.pt: 1,000 bytes") in message
