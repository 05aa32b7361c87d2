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
  gates of loops 1..t only, so each read-out adds its exact share of the Stage I objective
  (losses.stage1_loop_readout), and the survival log S_t and the running loss travel the ring
  with the activations. The last virtual stage's output is the micro-batch's loss.
The zero-bubble schedules split the weight gradient off and double-count shared weights
upstream: they are not offered.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
from torch.utils.checkpoint import checkpoint

from looplm_mega.config import ConfigError
from looplm_mega.model.attention import AttentionMask, positions_from_segments
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.model.losses import stage1_loop_readout, stage2_loop_readout
from looplm_mega.model.looplm import LoopLM
from looplm_mega.parallel.tensor_parallel import TensorParallel


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


def build_pipeline_model(config: LoopLMConfig, pp_rank: int, pp: int, tp: TensorParallel = TensorParallel()) -> LoopLM:
    """The whole model drawn from the seed (the same tensors as at PP=1), then cut down to this
    rank's part. Layers keep their global index in the names (`model.layers.7...` on the rank
    that owns layer 7), so checkpoints carry the released names."""
    model = LoopLM(config, tp)
    if pp == 1:
        return model
    mine = owned_layers(config.num_hidden_layers, pp, pp_rank)
    model.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in mine})
    if pp_rank != 0:
        del model.model.embed_tokens
    if pp_rank != pp - 1:
        del model.model.norm, model.model.early_exit_gate, model.lm_head
    return model


class LoopStage(nn.Module):
    """Virtual stage (loop `step`, pipeline rank `rank`): the rank's layers, preceded by the
    embedding on the first stage and followed by the loop's read-out on the last rank.
    Carried between stages: (hidden, log survival [B, S], previous loop's CE [B, S], running loss)."""

    def __init__(self, model: LoopLM, step: int, rank: int, pp: int, objective: str, beta: float, readouts: list):
        super().__init__()
        self.model = model
        self.step, self.rank, self.pp = step, rank, pp
        self.num_loops = model.config.total_ut_steps
        self.objective, self.beta = objective, beta
        self.readouts = readouts  # (step, CE, entropy share, exit-step share, mean gate) of every read-out
        layers = model.model.layers
        self.layers = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)

    @property
    def first(self) -> bool:
        return self.step == 0 and self.rank == 0

    def forward(self, *carried, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None):
        model, config = self.model, self.model.config
        if self.first:
            (input_ids,) = carried
            x = model.model.embed_tokens(input_ids)
            log_survival = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
            previous_ce = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
            loss = torch.zeros((), dtype=torch.float32, device=labels.device)
        else:
            x, log_survival, previous_ce, loss = carried
        if segment_ids is not None:
            positions = positions_from_segments(segment_ids)
        else:
            positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
        rope, mask = model.model.rotary_emb(positions), AttentionMask(segment_ids)
        per_layer = config.activation_checkpointing != "none" and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, rope, mask, use_reentrant=False) if per_layer else layer(x, rope, mask)
        if self.rank == self.pp - 1:
            x = model.model.norm(x)
            tp = model.tp
            # Stage II trains the gate alone: it reads the LM's states without a gradient path back.
            gate_input = x.detach() if self.objective == "stage2" else x
            gate_logits = tp.gather_sequence(model.model.early_exit_gate(gate_input).squeeze(-1), seq_dim=1).flatten()
            hidden, flat_labels = tp.enter(x).flatten(0, 1), labels.flatten()
            if self.objective == "stage2":
                readout = stage2_loop_readout(hidden, gate_logits, log_survival.flatten(), previous_ce.flatten(),
                                              flat_labels, model.lm_head, self.step, self.num_loops)
            else:
                readout = stage1_loop_readout(hidden, gate_logits, log_survival.flatten(), flat_labels,
                                              model.lm_head, self.beta, self.step, self.num_loops)
            gate_mean = torch.sigmoid(gate_logits.detach().float()).mean()
            self.readouts.append((self.step, readout.ce, readout.entropy, readout.exit_loop, gate_mean))
            loss = loss + readout.loss
            log_survival = readout.log_survival.view_as(log_survival)
            previous_ce = readout.token_ce.view_as(previous_ce)
            if self.step == self.num_loops - 1:
                return loss
        return x, log_survival, previous_ce, loss


class LoopedPipeline:
    """This rank's T virtual stages and the interleaved 1F1B schedule over all T x P of them."""

    def __init__(self, model: LoopLM, pp_rank: int, pp: int, group, micro_batches: int, micro_batch_shape: tuple[int, int],
                 device: torch.device, objective: str = "stage1", beta: Optional[float] = None):
        config = model.config
        check_pipeline(config, pp, micro_batches)
        self.model, self.pp_rank, self.pp, self.micro_batches = model, pp_rank, pp, micro_batches
        self.readouts: list = []
        beta = config.entropy_beta if beta is None else beta
        steps = config.total_ut_steps
        self.stages = []
        for t in range(steps):
            stage = LoopStage(model, t, pp_rank, pp, objective, beta, self.readouts)
            inputs, outputs = self._example_io(stage, micro_batch_shape, device)
            self.stages.append(PipelineStage(stage, t * pp + pp_rank, steps * pp, device, input_args=inputs,
                                             output_args=outputs, group=group))
        # The loss of a micro-batch is its mean over tokens; the step's is the mean over micro-batches.
        self.schedule = ScheduleInterleaved1F1B(self.stages, micro_batches, loss_fn=self._loss, scale_grads=False)

    @property
    def bubble_fraction(self) -> float:
        """Analytic idle fraction of the interleaved 1F1B schedule: (P - 1) / (T m + P - 1) for m
        micro-batches through T virtual stages per rank (Megatron's (P - 1) / (v m), as a share of
        the whole step)."""
        steps = self.model.config.total_ut_steps
        return (self.pp - 1) / (steps * self.micro_batches + self.pp - 1)

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
        last = stage.step == stage.num_loops - 1 and stage.rank == stage.pp - 1
        return inputs, (carried[-1] if last else carried)

    def _loss(self, output: torch.Tensor, target=None) -> torch.Tensor:
        return output / self.micro_batches

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> dict:
        """Forward and backward of one global batch (micro_batches x micro-batch rows, split here);
        gradients accumulate in the parameters. On the last rank returns the step's loss and
        per-loop metrics (means over micro-batches); elsewhere an empty dict."""
        self.readouts.clear()
        kwargs = {"labels": labels} if segment_ids is None else {"labels": labels, "segment_ids": segment_ids}
        losses: list = []
        # The loss is the last stage's output; torch asks for a target all the same.
        self.schedule.step(input_ids, target=labels, losses=losses, return_outputs=False, **kwargs)
        return self._summary(losses) if self.is_last else {}

    def eval_step(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> dict:
        """Forward only over the micro-batches; the same summary as train_step."""
        self.readouts.clear()
        kwargs = {"labels": labels} if segment_ids is None else {"labels": labels, "segment_ids": segment_ids}
        losses: list = []
        self.schedule.eval(input_ids, target=labels, losses=losses, return_outputs=False, **kwargs)
        return self._summary(losses) if self.is_last else {}

    def _summary(self, losses: list) -> dict:
        steps = self.model.config.total_ut_steps
        ce, gates = torch.zeros(steps), torch.zeros(steps)
        entropy = exit_loop = 0.0
        for step, step_ce, step_entropy, step_exit, gate_mean in self.readouts:
            ce[step] += float(step_ce)
            gates[step] += float(gate_mean)
            entropy += float(step_entropy)
            exit_loop += float(step_exit)
        n = self.micro_batches
        return {"loss": float(sum(loss.detach() for loss in losses)), "ce_per_loop": ce / n,
                "exit_entropy": entropy / n, "mean_exit_loop": exit_loop / n, "gate_mean_per_loop": gates / n}
