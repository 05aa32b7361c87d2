"""Looped pipeline parallelism: each rank owns a slice of the shared stack, and a micro-batch
circles the ring of ranks once per loop.

With P pipeline ranks and N layers, rank r holds layers [r N / P, (r + 1) N / P) only; the
embedding lives on rank 0, the final norm, exit gate and head on rank P - 1. Loop t of a
micro-batch on rank r is virtual stage t P + r, so rank r runs T stages that all use the same
layers (their weights are split P ways, never replicated), and the activations travel
P - 1 -> 0 between loops. That is the placement of torch.distributed.pipelining's interleaved
1F1B schedule (stage index % P == rank), which runs it. Two things make it exact here:
- scale_grads=False: every stage of a rank would otherwise divide the shared weights' gradients
  again; the loss is divided by the number of micro-batches once, in the loss function.
- the read-out of loop t happens on rank P - 1 before loop t + 1 exists. p(t|x) depends on the
  gates of loops 1..t only, so each read-out adds its exact share of the objective
  (losses.objective_terms over that one loop), and the survival log S_t, the loop's per-token CE
  (Stage II's next term needs it) and the running loss travel the ring with the activations. The
  last virtual stage's output is the micro-batch's loss.
Each virtual stage runs its part of the loop through LoopLM.loop_step, so truncated loops and
activation checkpointing hold as in the model.
The zero-bubble schedules split the weight gradient off and double-count shared weights
upstream: they are not offered.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

from looplm_mega.config import ConfigError
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.model.exit import exit_log_prob
from looplm_mega.model.looplm import LoopLM
from looplm_mega.model.losses import LoopTerms, Objective, objective_terms


def check_pipeline(config: LoopLMConfig, pp: int, micro_batches: Optional[int] = None) -> None:
    """A ConfigError naming the values when the model or the batch cannot be pipelined P ways."""
    if pp == 1:
        return
    if config.num_hidden_layers % pp:
        raise ConfigError(f"parallel.pp={pp} must divide num_hidden_layers={config.num_hidden_layers}")
    if config.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings with parallel.pp > 1: the embedding (first rank) and the head "
                          "(last rank) would share a weight across ranks; untie them or use parallel.pp=1")
    if micro_batches is not None and micro_batches % pp:
        raise ConfigError(f"the interleaved pipeline schedule needs a number of micro-batches per step that is a "
                          f"multiple of parallel.pp={pp}; got {micro_batches} (global batch / (micro batch x DP))")


def owned_layers(num_layers: int, pp: int, rank: int) -> range:
    per_rank = num_layers // pp
    return range(rank * per_rank, (rank + 1) * per_rank)


class LoopStage(nn.Module):
    """Virtual stage (loop `loop`, pipeline rank `rank`): this rank's part of one loop
    (LoopLM.loop_step, so every per-loop option holds here as in the model), preceded by the
    embedding on the first stage and, on the last rank, followed by the loop's read-out: its terms
    of the objective (losses.objective_terms), recorded in `readouts`. Carried between stages:
    (state, log survival [B, S], previous loop's CE [B, S], running loss)."""

    def __init__(self, model: LoopLM, loop: int, rank: int, pp: int, objective: Objective, beta: float, readouts: list):
        super().__init__()
        self.model = model
        self.loop, self.rank, self.pp = loop, rank, pp
        self.num_loops = model.config.total_ut_steps
        self.objective, self.beta = objective, beta
        self.readouts = readouts  # (loop, LoopTerms with a detached loss) of every read-out

    @property
    def first(self) -> bool:
        return self.loop == 0 and self.rank == 0

    def forward(self, *carried, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None):
        model = self.model
        if self.first:
            (input_ids,) = carried
            x = model.model.embed_tokens(input_ids)
            log_survival = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
            previous_ce = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
            loss = torch.zeros((), dtype=torch.float32, device=labels.device)
        else:
            x, log_survival, previous_ce, loss = carried
        rope, mask = model.positions(labels, segment_ids)
        stage2 = self.objective == "stage2"
        x, gate_logits = model.loop_step(x, self.loop, self.num_loops, rope, mask, detach_gate=stage2)
        if gate_logits is None:  # not the last rank: the loop goes on there
            return x, log_survival, previous_ce, loss
        last = self.loop == self.num_loops - 1
        z = gate_logits.flatten()
        # Stage II reads the exit distribution for its statistics only.
        log_p, log_survival_after = exit_log_prob(z.detach() if stage2 else z, log_survival.flatten(), last)
        terms = objective_terms(self.objective, model.tp.enter(x).flatten(0, 1)[None], z[None], log_p[None],
                                labels.flatten(), model.lm_head, self.loop, self.num_loops, self.beta,
                                previous_ce.flatten() if self.loop > 0 else None)
        self.readouts.append((self.loop, replace(terms, loss=terms.loss.detach())))
        loss = loss + terms.loss
        if last:
            return loss
        return x, log_survival_after.view_as(log_survival), terms.token_ce[0].view_as(previous_ce), loss


class LoopedPipeline:
    """This rank's T virtual stages and the interleaved 1F1B schedule over all T x P of them."""

    def __init__(self, model: LoopLM, pp_rank: int, pp: int, group, micro_batches: int, micro_batch_shape: tuple[int, int],
                 device: torch.device, objective: Objective = "stage1", beta: Optional[float] = None):
        config = model.config
        check_pipeline(config, pp, micro_batches)
        self.model, self.pp_rank, self.pp, self.micro_batches = model, pp_rank, pp, micro_batches
        self.readouts: list = []
        beta = config.entropy_beta if beta is None else beta
        loops = config.total_ut_steps
        self.stages = []
        for loop in range(loops):
            stage = LoopStage(model, loop, pp_rank, pp, objective, beta, self.readouts)
            inputs, outputs = self._example_io(stage, micro_batch_shape, device)
            self.stages.append(PipelineStage(stage, loop * pp + pp_rank, loops * pp, device, input_args=inputs,
                                             output_args=outputs, group=group))
        # The loss of a micro-batch is its mean over tokens; the step's is the mean over micro-batches.
        self.schedule = ScheduleInterleaved1F1B(self.stages, micro_batches, loss_fn=self._loss, scale_grads=False)

    @property
    def bubble_fraction(self) -> float:
        """Analytic idle fraction of the interleaved 1F1B schedule: (P - 1) / (T m + P - 1) for m
        micro-batches through T virtual stages per rank (Megatron's (P - 1) / (v m), as a share of
        the whole step)."""
        loops = self.model.config.total_ut_steps
        return (self.pp - 1) / (loops * self.micro_batches + self.pp - 1)

    def _example_io(self, stage: LoopStage, shape: tuple[int, int], device: torch.device):
        """What a stage receives and sends, given up front: torch would otherwise infer it by running
        every stage once on uninitialised tensors."""
        tp = self.model.tp
        rows, seq = shape
        local_seq = seq // tp.size if tp.sequence_parallel else seq
        dtype = next(self.model.parameters()).dtype
        # requires_grad: the receiving stage sends back the gradients of what needs them.
        carried = (torch.empty(rows, local_seq, self.model.config.hidden_size, dtype=dtype, device=device, requires_grad=True),
                   torch.empty(rows, seq, device=device, requires_grad=True), torch.empty(rows, seq, device=device),
                   torch.empty((), device=device, requires_grad=True))
        inputs = (torch.empty(rows, seq, dtype=torch.long, device=device),) if stage.first else carried
        last = stage.loop == stage.num_loops - 1 and stage.rank == stage.pp - 1
        return inputs, (carried[-1] if last else carried)

    def _loss(self, output: torch.Tensor, target=None) -> torch.Tensor:
        return output / self.micro_batches

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor,
                   segment_ids: Optional[torch.Tensor] = None) -> list[tuple[int, LoopTerms]]:
        """Forward and backward of one global batch (micro_batches x micro-batch rows, split here);
        gradients accumulate in the parameters. On the last rank returns the read-outs (loop,
        terms) of every micro-batch and loop; elsewhere an empty list."""
        return self._run(self.schedule.step, input_ids, labels, segment_ids)

    def eval_step(self, input_ids: torch.Tensor, labels: torch.Tensor,
                  segment_ids: Optional[torch.Tensor] = None) -> list[tuple[int, LoopTerms]]:
        """Forward only over the micro-batches; the read-outs as train_step's."""
        return self._run(self.schedule.eval, input_ids, labels, segment_ids)

    def _run(self, run, input_ids, labels, segment_ids) -> list[tuple[int, LoopTerms]]:
        self.readouts.clear()
        kwargs = {"labels": labels} if segment_ids is None else {"labels": labels, "segment_ids": segment_ids}
        # The loss is the last stage's output; torch asks for a target all the same.
        run(input_ids, target=labels, losses=[], return_outputs=False, **kwargs)
        return list(self.readouts)
