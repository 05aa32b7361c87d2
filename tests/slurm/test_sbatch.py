"""examples/slurm/*.sbatch on a real (local, one-node, 2-CPU) SLURM cluster, in CPU mode: a tiny
model trained by 2 tasks, a checkpoint-and-requeue on SIGUSR1 that resumes where it stopped, and
the DeepSpeed-launcher variant. About two minutes; LOOPLM_SKIP_SLURM=1 skips it (conftest.py)."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.slurm.cluster import Cluster
from tests.training.runs import MODEL, write_dataset

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(os.environ.get("LOOPLM_SKIP_SLURM") == "1", reason="LOOPLM_SKIP_SLURM=1")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "slurm"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "tokens")


def _overrides(dataset: str, steps: int, save_interval: int) -> str:
    """The tiny run of tests/training/runs.py, as dotted overrides of configs/run/tiny_cpu.yaml."""
    model = " ".join(f"--model.{k} {v}" for k, v in MODEL.items() if k != "preset")
    return (f"{model} --data.prefixes=[{dataset}] --data.seq_length 32 --data.split 90,10 "
            f"--training.micro_batch_size 2 --training.global_batch_size 8 --training.train_steps {steps} "
            f"--training.log_interval 1 --training.save_interval {save_interval} --training.eval_iters 2 "
            f"--training.keep_last 2 --schedule.warmup_steps 2 --deepspeed.zero_stage 2 --wandb.mode disabled")


def _submit(cluster: Cluster, script: str, tmp_path: Path, dataset: str, steps: int, save_interval: int) -> tuple:
    """Submit the script in CPU mode with 2 tasks of 1 CPU; (job id, run dir, its output file)."""
    run_dir = tmp_path / "run"
    env = cluster.env(LOOPLM_CPU="1", LOOPLM_RUN_DIR=str(run_dir), LOOPLM_CONFIG="configs/run/tiny_cpu.yaml",
                      LOOPLM_OVERRIDES=_overrides(dataset, steps, save_interval), LOOPLM_PYTHON=sys.executable,
                      LOOPLM_WORKDIR=str(ROOT))
    job = cluster.submit(SCRIPTS / script, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                         "--gpus-per-node=0", "--time=15", f"--output={tmp_path}/%x-%j.out", env=env, cwd=ROOT)
    return job, run_dir, tmp_path / f"looplm-pretrain-{job}.out"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def _train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def _assert_both_ranks_trained(checkpoint: Path, steps: int) -> None:
    """Each rank wrote its own RNG state and its ZeRO-2 optimizer shard, whose Adam state (of that
    rank's partition of the parameters) has taken `steps` steps."""
    for rank in (0, 1):
        assert (checkpoint / f"rng_rank{rank:05d}.pt").exists()
        shard = torch.load(checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)
        adam = list(shard["optimizer_state_dict"]["base_optimizer_state"]["state"].values())
        assert adam and all(int(s["step"]) == steps for s in adam), f"rank {rank}: {[s['step'] for s in adam]}"
        assert any(s["exp_avg"].abs().sum() > 0 for s in adam), f"rank {rank}: Adam moments are all zero"


def test_usr1_checkpoints_requeues_and_the_job_resumes_where_it_stopped(local_slurm, tmp_path, dataset):
    """pretrain.sbatch, srun, 2 tasks: SIGUSR1 to the batch shell (what `--signal=B:USR1@300` sends
    before the time limit) -> every rank checkpoints and exits -> `scontrol requeue` -> the same job
    runs again, resumes from that checkpoint and completes the run."""
    cluster = local_slurm.get()
    assert "#SBATCH --signal=B:USR1@" in (SCRIPTS / "pretrain.sbatch").read_text()
    steps = 40
    job, run_dir, output = _submit(cluster, "pretrain.sbatch", tmp_path, dataset, steps, save_interval=4)
    latest = run_dir / "checkpoints" / "latest"
    # The signal as soon as the first checkpoint (step 4) is there, well before the last step.
    deadline = time.monotonic() + 300
    while not latest.exists():
        state = cluster.job(job)
        assert state.get("JobState") not in ENDED and time.monotonic() < deadline, f"no checkpoint: {state}\n{_read(output)}"
        for _ in range(20):
            if latest.exists():
                break
            time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    state = cluster.wait_for_job(job, 400)
    log = _read(output)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{state}\n{log}"
    # The first attempt stopped at a checkpoint of its own, before the end ...
    stopped = re.search(r"^0: stop requested .* checkpoint written at step (\d+), exiting$", log, re.M)
    assert stopped and "pretrain.sbatch: SIGUSR1: asking every rank to checkpoint and exit" in log, log
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < steps
    assert f"requeueing job {job}" in log
    # ... and the second one started there: every step was trained (and logged) exactly once.
    assert f"job {job} restart 1 on localhost: 2 tasks" in log and f"resumes from step{stop_step:08d}" in log, log
    assert re.search(rf"^0: pretraining .* on 2 x cpu .*, {steps} steps, resumed at step {stop_step}$", log, re.M), log
    assert _train_steps(run_dir) == list(range(1, steps + 1))
    jobs_log = (run_dir / "logs" / "jobs.log").read_text()
    assert f"restart 0 requeued at step{stop_step:08d}" in jobs_log and "restart 1" in jobs_log, jobs_log
    # The run's last checkpoint, written by both ranks after all the steps.
    assert latest.read_text().strip() == f"step{steps:08d}"
    final = run_dir / "checkpoints" / f"step{steps:08d}"
    assert json.loads((final / "trainer_state.json").read_text())["state"]["step"] == steps
    _assert_both_ranks_trained(final, steps)
    assert re.search(r"^1: ", log, re.M), "no output from rank 1"


def test_the_deepspeed_launcher_variant_trains_on_both_ranks(local_slurm, tmp_path, dataset):
    """pretrain_deepspeed.sbatch: a hostfile from the allocation, DeepSpeed's runner with
    --launcher slurm, one srun step of 2 tasks; the job completes with a checkpoint of both ranks."""
    cluster = local_slurm.get()
    steps = 2
    job, run_dir, output = _submit(cluster, "pretrain_deepspeed.sbatch", tmp_path, dataset, steps, save_interval=1)
    state = cluster.wait_for_job(job, 300)
    log = _read(output)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), f"{state}\n{log}"
    assert (run_dir / "logs" / f"hostfile-{job}").read_text().split() == ["localhost", "slots=2"]
    assert re.search(r"cmd = srun -n 2 .*looplm_mega/pretrain.py", log), log
    assert re.search(rf"^0: pretraining .* on 2 x cpu .*, {steps} steps, from scratch$", log, re.M), log
    assert _train_steps(run_dir) == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{steps:08d}"
    _assert_both_ranks_trained(run_dir / "checkpoints" / f"step{steps:08d}", steps)
