"""The DeepSpeed pretraining loop, for real: several gloo processes on this CPU."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from looplm_mega.config import load_yaml, save_yaml
from looplm_mega.model import LoopLM, LoopLMConfig
from looplm_mega.training.config import RunConfig
from looplm_mega.training.consolidate import consolidate

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, _pretrain_each, run_config, train_losses


@pytest.fixture(scope="module")
def zero3_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3")
    run_distributed(_pretrain, 2, run_config(dataset, run_dir, deepspeed={"zero_stage": 3}))
    return run_dir


def test_zero3_matches_zero0_on_two_processes(dataset, zero3_run, tmp_path):
    run_distributed(_pretrain, 2, run_config(dataset, tmp_path, deepspeed={"zero_stage": 0}))
    zero0, zero3 = train_losses(tmp_path), train_losses(zero3_run)
    assert sorted(zero0) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([zero3[s] for s in zero0], list(zero0.values()), rtol=1e-5)
    assert zero0[6] != zero0[1]  # it trained
    # Both consolidate into the same single-file model, which loads under the released names.
    models = [consolidate(run / "checkpoints", run / "model") for run in (tmp_path, zero3_run)]
    states = [load_file(str(m / "model.safetensors")) for m in models]
    assert states[0].keys() == states[1].keys()
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, rtol=1e-4, atol=1e-5)
    model = LoopLM(load_yaml(LoopLMConfig, models[1] / "config.yaml"))
    model.load_full_state_dict(states[1])


def test_resume_under_zero3_equals_the_uninterrupted_run_bit_for_bit(dataset, zero3_run, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(zero3_run / "checkpoints" / "step00000003", checkpoints / "step00000003")
    (checkpoints / "latest").write_text("step00000003")
    run_distributed(_pretrain, 2, run_config(dataset, tmp_path, deepspeed={"zero_stage": 3}))
    resumed, uninterrupted = train_losses(tmp_path), train_losses(zero3_run)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)]
    assert (checkpoints / "latest").read_text() == "step00000006"


def test_gradient_accumulation_equals_a_larger_micro_batch(dataset, tmp_path):
    # Without document masking every micro-batch has the same number of labelled tokens, so the
    # mean of micro-batch means is the mean over the global batch.
    data = {"reset_attention_mask": False}
    configs = [run_config(dataset, tmp_path / f"micro{m}", data=data, training={"micro_batch_size": m, "save_interval": 0})
               for m in (2, 8)]
    run_distributed(_pretrain_each, 1, configs)
    accumulated, whole = train_losses(tmp_path / "micro2"), train_losses(tmp_path / "micro8")
    np.testing.assert_allclose(list(accumulated.values()), list(whole.values()), rtol=1e-5)


def test_sigterm_writes_a_loadable_checkpoint_and_exits_cleanly(dataset, tmp_path):
    config = run_config(dataset, tmp_path / "run", training={"train_steps": 500, "save_interval": 0})
    path = tmp_path / "run.yaml"
    save_yaml(config, path)
    process = subprocess.Popen([sys.executable, "-m", "looplm_mega.pretrain", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert process.poll() is None, process.communicate()[0][-3000:]  # it died before training
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "stop requested" in output
    tag = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    stopped_at = json.loads((tmp_path / "run" / "checkpoints" / tag / "trainer_state.json").read_text())["state"]["step"]
    assert 2 <= stopped_at < 500
    done = subprocess.run([sys.executable, "-m", "looplm_mega.pretrain", "--config", str(path),
                           "--training.train_steps", str(stopped_at + 1)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed at step {stopped_at}" in done.stdout
    assert max(train_losses(tmp_path / "run")) == stopped_at + 1


def test_config_errors_stop_before_any_work(dataset, tmp_path):
    path = tmp_path / "run.yaml"
    save_yaml(run_config(dataset, tmp_path), path)
    done = subprocess.run([sys.executable, "-m", "looplm_mega.pretrain", "--config", str(path), "--training.precision", "fp16"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "training.precision: 'fp16' is not one of" in done.stderr


def _pretrain_with_bad_forwards(config: RunConfig, corruption: str, bad_calls: list, expect_error: str) -> None:
    """Training forwards whose number is in bad_calls (or all, with -1) get a corrupted loss:
    "nan_loss" (a NaN value) or "nan_gradient" (a finite value whose gradient is NaN)."""
    from looplm_mega.model.looplm import LoopLM

    original, calls = LoopLM.forward, [0]
    corrupt = (lambda loss: loss * float("nan")) if corruption == "nan_loss" else _NanGradient.apply

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_calls or -1 in bad_calls:
                output.terms.loss = corrupt(output.loss)
        return output

    LoopLM.forward = forward
    try:
        _pretrain(config)
    except FloatingPointError as e:
        assert expect_error and expect_error in str(e), str(e)
        return
    assert not expect_error


class _NanGradient(torch.autograd.Function):
    """The identity whose backward gives NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_loss_skips_its_whole_step_and_too_many_stop_the_run(dataset, tmp_path):
    # Forwards 9 and 10 are micro-batches of step 3 (4 per step): that step alone is skipped.
    config = run_config(dataset, tmp_path / "skip", training={"save_interval": 0})
    run_distributed(_pretrain_with_bad_forwards, 1, config, "nan_loss", [9, 10], "")
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1, 1, 1]
    assert [np.isfinite(r["loss"]) for r in train] == [True, True, False, True, True, True]
    assert train[-1]["consumed_samples"] == 6 * 8 and np.isfinite(records[-1]["loss"])
    stop = run_config(dataset, tmp_path / "stop", training={"save_interval": 0, "max_nonfinite_steps": 3})
    run_distributed(_pretrain_with_bad_forwards, 1, stop, "nan_loss", [-1], "3 optimizer steps in a row had a non-finite loss")


def test_a_run_without_validation_split_trains_and_skips_validation(dataset, tmp_path):
    config = run_config(dataset, tmp_path, data={"split": "100,0,0"}, training={"train_steps": 2, "save_interval": 0})
    run_distributed(_pretrain, 1, config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train"]


def test_zero_offload_trains_like_zero2(dataset, tmp_path):
    configs = [run_config(dataset, tmp_path / name, deepspeed={"zero_stage": 2, "offload_optimizer": offload},
                          training={"train_steps": 3, "save_interval": 0})
               for name, offload in (("plain", False), ("offload", True))]
    run_distributed(_pretrain_each, 1, configs)
    plain, offload = train_losses(tmp_path / "plain"), train_losses(tmp_path / "offload")
    np.testing.assert_allclose(list(offload.values()), list(plain.values()), rtol=1e-4)


def test_torchrun_launches_the_same_module(dataset, tmp_path):
    path = tmp_path / "run.yaml"
    save_yaml(run_config(dataset, tmp_path / "run", training={"train_steps": 2, "save_interval": 0}), path)
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "looplm_mega.pretrain",
                           "--config", str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 x cpu" in done.stdout and sorted(train_losses(tmp_path / "run")) == [1, 2]



@pytest.mark.parametrize("stage", [0, 2])
def test_steps_with_non_finite_gradients_are_skipped(dataset, tmp_path, stage):
    # Forward 5 is the first micro-batch of step 2 (4 micro-batches per step): that step is skipped.
    config = run_config(dataset, tmp_path / "skip", deepspeed={"zero_stage": stage}, training={"save_interval": 0})
    run_distributed(_pretrain_with_bad_forwards, 1, config, "nan_gradient", [5], "")
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in train) and np.isfinite(records[-1]["loss"])
    stop = run_config(dataset, tmp_path / "stop", deepspeed={"zero_stage": stage},
                      training={"save_interval": 0, "max_nonfinite_steps": 2})
    run_distributed(_pretrain_with_bad_forwards, 1, stop, "nan_gradient", [-1], "steps in a row had a non-finite loss or gradient")
