"""The pipeline engine's own duties: clipping to the global norm, skipping non-finite steps."""

import math

import torch
import torch.distributed as dist

from looplm_mega.parallel.build import build_model
from looplm_mega.parallel.state import initialize_parallel
from looplm_mega.training.optimizer import parameter_groups
from looplm_mega.training.pipeline_engine import PipelineEngine

from tests.distributed import run_distributed
from tests.helpers import tiny_config
from tests.training.runs import run_config


def _engine_steps(config) -> None:
    dist.init_process_group("gloo")
    state = initialize_parallel(pp=2)
    torch.manual_seed(0)
    model = build_model(tiny_config(num_hidden_layers=2), state.pp_rank, 2)
    engine = PipelineEngine(model, parameter_groups(model, 0.1), config, state, torch.device("cpu"))
    engine.configure(2, 2, 8, "stage1")
    pipeline = engine.pipeline
    engine.configure(2, 2, 8, "stage1")
    assert engine.pipeline is pipeline  # the same shape: the schedule is kept
    ids = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = engine.train_batch(batches)
    assert not metrics.skipped and metrics.grad_norm > 1e-3 and math.isfinite(metrics.loss)
    assert metrics.micro_batches == 2 and metrics.tokens == 32 and len(metrics.ce_per_loop) == 3
    moved = sum(float((p - before[n]).abs().max()) > 0 for n, p in model.named_parameters())
    assert moved > 0  # clipped, but a step
    # A NaN weight on the first rank: a non-finite loss on the last, the step skipped on both.
    if state.pp_rank == 0:
        with torch.no_grad():
            model.model.embed_tokens.weight[ids[0, 0]] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = engine.train_batch(batches)
    assert metrics.skipped and engine.skipped_steps == 1 and not math.isfinite(metrics.loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.isnan(), before[n].isnan()) and torch.equal(p.nan_to_num(), before[n].nan_to_num()), n
    dist.destroy_process_group()


def test_pipeline_engine_clips_and_skips_non_finite_steps(dataset, tmp_path):
    config = run_config(dataset, tmp_path, optimizer={"lr": 1e-2, "grad_clip": 1e-3})
    run_distributed(_engine_steps, 2, config, timeout=300)
