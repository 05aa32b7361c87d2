"""What ZeRO-3 needs to hold what it promises for a looped model: every layer of the shared stack
is called once per loop, and DeepSpeed 0.19 counts, releases and reduces per module as if each
were called once; it gathers a module's weights again for its backward even where the backward
reads none of them (the embedding, the fused head); and it gathers a module's weights whole, for
the embedding and the head a [vocabulary, hidden] matrix, held with its gradient. The DeepSpeed engine
applies these after deepspeed.initialize; each is measured in the README ("Memory per rank") and
held by tests/training/test_zero3.py."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime.zero.utils import apply_to_tensors_only
from torch import nn

from looplm_mega.model.vocabulary import VocabularyMatrix


def share_master_weights(optimizer) -> None:
    """ZeRO-3 keeps no second fp32 copy of the weights when the partitioned weights are fp32
    already on the optimizer's device (its own comment says so), but DeepSpeed 0.19 tests that by
    comparing a torch.device with a device name, which is never equal: an fp32 run holds the
    weights twice (4 more bytes a parameter, split over the ranks). The copy is made the alias
    DeepSpeed meant, before Adam holds any state of it."""
    for weights, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if (weights is not None and weights.dtype == master.dtype and weights.device == master.device
                and weights.data_ptr() != master.data_ptr()):
            master.data = weights.data


class _RestoreGradientCount(torch.autograd.Function):
    """Identity on a module's output; in the backward, before the module's own, it gives the
    module back the count of this call's input gradients (see release_after_each_call)."""

    @staticmethod
    def forward(ctx, output, module, count):
        ctx.module, ctx.count = module, count
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.module.ds_grads_remaining = ctx.count
        return grad, None, None


def _restore_gradient_count(module, inputs, output):
    count = getattr(module, "ds_grads_remaining", 0)  # this call's (DeepSpeed resets it at every call)
    if not (count and torch.is_grad_enabled()):
        return output
    return apply_to_tensors_only(lambda t: _RestoreGradientCount.apply(t, module, count) if t.requires_grad else t, output)


def release_after_each_call(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's weights before its backward and releases them once the
    gradients of its inputs are in, counted in module.ds_grads_remaining. DeepSpeed 0.19 resets
    that count at every forward call, so a layer called once per loop counts only its last call:
    the first backward use releases, the T - 1 others drive the count below zero and never do,
    and from the second loop of the backward on the whole stack stays gathered on every rank until
    the optimizer step. Restoring the call's count as each use's backward begins releases the
    weights after every use, as they are released after every use in the forward."""
    for module in model.modules():
        if "post_bwd_fn" in module.__dict__:  # the modules DeepSpeed hooked
            module.register_forward_hook(_restore_gradient_count)


class _LinearReducedPerCall(torch.autograd.Function):
    """F.linear (no bias) whose weight gradient goes to `hand_off` as soon as this call's backward
    forms it, instead of back to autograd. The weight is kept as the parameter object, not as a
    saved tensor: ZeRO-3 swaps its data for the gathered weight before this call's backward
    and back after, and nothing here keeps the gathered tensor alive in between."""

    @staticmethod
    def forward(ctx, x, weight, hand_off):
        device = x.device.type
        ctx.autocast = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.hand_off, ctx.weight = hand_off, weight
        ctx.save_for_backward(x)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        (x,), weight = ctx.saved_tensors, ctx.weight
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the products as the forward formed them
            grad_x = torch.matmul(grad, weight).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = torch.matmul(grad.reshape(-1, grad.shape[-1]).T, x.reshape(-1, x.shape[-1]))
        ctx.hand_off(weight, grad_weight.to(weight.dtype))
        return grad_x, None, None


class _GradientHandedOff(torch.autograd.Function):
    """The weight itself, whose gradient goes to `hand_off` instead of to autograd's accumulator.
    Nothing is saved: the backward needs no weight, only the parameter object to name."""

    @staticmethod
    def forward(ctx, weight, hand_off):
        ctx.weight, ctx.hand_off = weight, hand_off
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        ctx.hand_off(ctx.weight, grad)
        return None, None


class _NotGatheredForBackward:
    """Stands in for the functions DeepSpeed applies to a module's outputs and inputs to gather the
    module's weights before its backward and release them after, for a module whose backward
    reads none of them."""

    @staticmethod
    def apply(output):
        return output


class HandedGradients:
    """Weight gradients ZeRO-3 gets from us as the backward forms them, rather than from its hook
    after autograd's accumulation (see hand_gradients_to_zero3)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.handed: set[int] = set()
        self.reduced: set[int] = set()  # parameters reduced in the micro-batch that starts a step
        self._reduce = optimizer.reduce_independent_p_g_buckets_and_remove_grads
        self._partition = optimizer.partition_grads
        self._flush = optimizer._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads
        optimizer.reduce_independent_p_g_buckets_and_remove_grads = self._reduce_unless_handed
        optimizer.partition_grads = self._partition_adding_repeats

    def per_call(self, linear: nn.Linear) -> None:
        self.handed.add(id(linear.weight))
        linear.forward = lambda x: _LinearReducedPerCall.apply(x, linear.weight, self.hand_off)

    def not_gathered_for_backward(self, module: VocabularyMatrix) -> None:
        self.handed.add(id(module.weight))
        module.weight_hook = lambda weight: _GradientHandedOff.apply(weight, self.hand_off)
        module.pre_bwd_fn = module.post_bwd_fn = _NotGatheredForBackward

    def in_slices(self, module: VocabularyMatrix, slices: "PartitionSlices") -> None:
        self.handed.add(id(module.weight))
        module.slices = slices
        # DeepSpeed's hooks would gather the whole weight around the module's forward and backward.
        offload = self.optimizer.parameter_offload
        own = (module._forward_pre_hooks, module._forward_hooks)
        for hook in offload.forward_hooks + offload.backward_hooks:
            if any(hook.hooks_dict_ref() is hooks for hooks in own):
                hook.remove()

    def partition(self, param: nn.Parameter, grad_partition: torch.Tensor) -> None:
        """This rank's partition of a parameter's reduced gradient, formed without DeepSpeed."""
        self._partition_adding_repeats([param], [grad_partition])

    def new_step(self) -> None:
        self.reduced.clear()

    def hand_off(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        comm_dtype = self.optimizer.get_param_comm_dtype(param)
        if any(p is param for p in self.optimizer.ipg_buckets[comm_dtype].params):
            self._flush(comm_dtype)  # the bucket reads this parameter's previous gradient from it
        if param.shape == grad.shape:
            param.grad = grad
        else:  # a partitioned weight: the .grad setter compares shapes with .data, so lend it one
            partition, param.data = param.data, param.data.new_empty(()).expand(grad.shape)
            param.grad = grad
            param.data = partition
        self._reduce(param)

    def _reduce_unless_handed(self, param: nn.Parameter) -> None:
        # DeepSpeed's hook after autograd's accumulation: every use of a handed parameter has been
        # reduced already, and autograd got no gradient for it.
        if id(param) not in self.handed:
            self._reduce(param)

    def _partition_adding_repeats(self, params: list, grad_partitions: list):
        # DeepSpeed copies a reduced gradient into its partition in a step's first micro-batch and
        # adds it in the later ones; a parameter reduced once per call needs its later calls added.
        if self.optimizer.micro_step_id != 0:
            return self._partition(params, grad_partitions)
        repeats = [p.ds_id in self.reduced for p in params]
        self.reduced.update(p.ds_id for p in params)
        buffers = self._partition([p for p, r in zip(params, repeats) if not r],
                                  [g for g, r in zip(grad_partitions, repeats) if not r])
        if any(repeats):
            self.optimizer.micro_step_id = 1  # "not the first micro-batch": add
            try:
                buffers += self._partition([p for p, r in zip(params, repeats) if r],
                                           [g for g, r in zip(grad_partitions, repeats) if r])
            finally:
                self.optimizer.micro_step_id = 0
        return buffers


class PartitionSlices:
    """A vocabulary matrix as ZeRO-3 partitions it, read one partition at a time (the model's
    VocabularySlices): the rows divide evenly over the data-parallel ranks, so rank i's partition
    is whole rows, slice i. Its owner broadcasts a slice; a slice's gradient is reduced to its
    owner, averaged as DeepSpeed's reduce-scatter averages (divided by the ranks first, in the
    parameter's communication dtype), and handed to ZeRO-3 as the owner's gradient partition. The
    embedding and the head then hold one slice of their weight and one of its gradient at a time
    where they held both whole."""

    def __init__(self, param: nn.Parameter, handed: HandedGradients):
        self.param, self.handed = param, handed
        self.group = param.ds_process_group
        self.count, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        rows, hidden = param.ds_shape
        self.rows, self.shape = rows // self.count, (rows // self.count, hidden)
        self.owners = [dist.get_global_rank(self.group, index) for index in range(self.count)]

    @staticmethod
    def possible(module: VocabularyMatrix, users: int, optimizer) -> bool:
        """Where the slices are exact and DeepSpeed's gradient path is the plain one. `users`: the
        modules that share the weight (a tied weight keeps the whole-matrix path); the plain,
        unfused head reads its weight whole in its backward and keeps it too."""
        weight = module.weight
        if users > 1 or module.backward_reads_weight or weight.ds_persist:
            return False
        group_size = dist.get_world_size(weight.ds_process_group)
        return (group_size > 1 and weight.ds_shape[0] % group_size == 0
                and weight.ds_tensor.numel() == weight.ds_numel // group_size
                and not optimizer.offload_param and optimizer.all2all_process_group is None
                and optimizer.gradient_predivide_factor == 1.0)

    def gather(self, index: int) -> torch.Tensor:
        mine = self.param.ds_tensor.view(self.shape)
        buffer = mine if index == self.rank else mine.new_empty(self.shape)
        dist.broadcast(buffer, self.owners[index], group=self.group)
        return buffer

    def hand_off(self, index: int, grad: torch.Tensor) -> None:
        grad = grad.to(self.handed.optimizer.get_param_comm_dtype(self.param)).div_(self.count)
        dist.reduce(grad, self.owners[index], group=self.group)
        if index == self.rank:
            self.handed.partition(self.param, grad.view(-1).to(self.handed.optimizer.gradient_accumulation_dtype))


def hand_gradients_to_zero3(optimizer, model: nn.Module) -> HandedGradients:
    """What ZeRO-3 cannot leave to autograd's accumulator and its own hooks without holding far
    more than it promises:
    - The looped stack's. Autograd sums the gradients of a weight used T times before it hands
      the sum, once, to the weight's accumulator, where ZeRO-3's hook reduce-scatters it: after
      the weight's last use in the backward, which for the shared stack is the first loop, the
      last one the backward reaches. Every rank held the whole stack's full gradient from the
      backward's first loop to its last (4 bytes a parameter of the stack; measured in the
      README). Each call of a stack's linear layer hands its weight gradient to ZeRO-3 as its
      backward forms it, so at most one layer's gradient is whole at a time, as in a model
      without loops. The linear layers hold nearly all of the stack's parameters; its norms'
      few stay with autograd.
    - The embedding's and the fused head's. Their backward reads none of the weight, but
      autograd accumulates into the weight's full-shaped tensor, so ZeRO-3 gathers the whole
      [vocabulary, hidden] matrix again for the backward. Their gradients are handed over and
      the weights stay partitioned.
    - Both vocabulary matrices whole: gathered for the forward, the head's weight and the fused
      loss's fp32 gradient of it were held at once, and the embedding's dense gradient, a floor
      that does not shrink with the ranks (the head's alone 0.64x of what ZeRO-3 must hold at
      DP 4 for the `small` preset, whose vocabulary matrices are 32% of its parameters each).
      Where PartitionSlices.possible, they are read one partition at a time instead.
    The engine calls new_step() before each step's first micro-batch."""
    handed = HandedGradients(optimizer)
    for layer in model.model.layers.modules():
        if type(layer) is nn.Linear and layer.bias is None:
            handed.per_call(layer)
    matrices = [m for m in model.modules() if isinstance(m, VocabularyMatrix)]
    users = Counter(id(m.weight) for m in matrices)
    for module in matrices:
        if PartitionSlices.possible(module, users[id(module.weight)], optimizer):
            handed.in_slices(module, PartitionSlices(module.weight, handed))
    matrices = [m for m in matrices if m.slices is None]
    # A tied weight is handed over only if no module that uses it reads it in its backward.
    read_in_backward = {id(m.weight) for m in matrices if m.backward_reads_weight}
    for module in matrices:
        if id(module.weight) not in read_in_backward:
            handed.not_gathered_for_backward(module)
    return handed
