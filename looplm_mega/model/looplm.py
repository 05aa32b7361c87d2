"""LoopLM: one stack of N decoder layers applied T times with shared weights (Ouro).

    x_0 = embed(input_ids)
    for t in 1..T:  x_t = norm(layers(x_{t-1}))          # the same layers and norm every loop
                    lambda_t = sigmoid(gate(x_t))         # per-token exit gate
                    logits_t = lm_head(x_t)               # read-out of loop t
`loop_step` is one iteration; the model's forward, the pipeline's virtual stages
(parallel/pipeline.py) and generation (inference/generate.py) all run their loops through it.
RoPE cos/sin are the same in every loop. Parameter names are those of the released checkpoints
(model.embed_tokens, model.layers.{i}..., model.norm, model.early_exit_gate, lm_head), so the
state dict is the released format as it is, except that the embedding and head rows are padded to
LoopLMConfig.make_vocab_size_divisible_by (load_full_state_dict pads released tensors to them).

With a TensorParallel of size > 1 the model holds this rank's shards (parallel.tensor_parallel);
with sequence parallelism its activations between blocks are sequence shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from looplm_mega.model.attention import AttentionMask, positions_from_segments
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.model.cross_entropy import linear_cross_entropy, sliced_linear_cross_entropy
from looplm_mega.model.exit import exit_log_probs
from looplm_mega.model.layers import SINGLE, DecoderLayer, RMSNorm, RotaryEmbedding, mark_tensor_parallel
from looplm_mega.model.losses import LoopTerms, Objective, objective_terms
from looplm_mega.model.vocabulary import VocabularyMatrix, sliced_embedding
from looplm_mega.parallel.tensor_parallel import TensorParallel, padded_vocab_size, partition_dim, shard, shard_shape


@dataclass
class LoopLMOutput:
    hidden_states: list[torch.Tensor]  # T x [B, S, H]: the normed read-out state of each loop (sequence shards under SP)
    gate_logits: torch.Tensor  # [T, B, S]: z_t, lambda_t = sigmoid(z_t)
    exit_gates: torch.Tensor  # [T, B, S]: lambda_t
    exit_probs: torch.Tensor  # [T, B, S]: p(t|x)
    terms: Optional[LoopTerms] = None  # the objective over all loops and its statistics (with labels)

    @property
    def loss(self) -> Optional[torch.Tensor]:
        return None if self.terms is None else self.terms.loss

    @property
    def ce_per_loop(self) -> Optional[torch.Tensor]:
        return None if self.terms is None else self.terms.ce_per_loop


class VocabParallelEmbedding(VocabularyMatrix, nn.Embedding):
    """The token embedding; under TP each rank holds a contiguous slice of the (padded) vocabulary,
    looks up the ids in its range and the partial results are summed across the group."""

    def __init__(self, rows: int, hidden: int, tp: TensorParallel):
        super().__init__(rows // tp.size, hidden)
        self.tp = tp
        mark_tensor_parallel(self, 0, tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return self._lookup(input_ids)
        local = input_ids - self.tp.rank * self.num_embeddings
        outside = (local < 0) | (local >= self.num_embeddings)
        out = self._lookup(local.masked_fill(outside, 0)).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.exit(out)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.forward_weight()) if self.slices is None else sliced_embedding(ids, self.slices)


class ExitGate(nn.Linear):
    """lambda_t = sigmoid(gate(h_t)), replicated on every TP rank."""

    def __init__(self, hidden: int, tp: TensorParallel):
        super().__init__(hidden, 1, bias=True)
        self.tp = tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.tp.replicated_weight(self.weight), self.tp.replicated_weight(self.bias))


class LoopLMBackbone(nn.Module):
    """Everything under the `model.` prefix of the released checkpoints."""

    def __init__(self, config: LoopLMConfig, tp: TensorParallel):
        super().__init__()
        rows = padded_vocab_size(config.vocab_size, tp.size, config.make_vocab_size_divisible_by)
        self.embed_tokens = VocabParallelEmbedding(rows, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)
        self.early_exit_gate = ExitGate(config.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class LMHead(VocabularyMatrix, nn.Linear):
    """The read-out head. Called with hidden states alone it gives logits; with labels and token
    weights it gives the weighted per-token cross-entropy without materialising the logits
    (cross_entropy.linear_cross_entropy). The loss runs inside this module's own forward so that
    ZeRO-3 gathers the head weight for it. The fused loss forms every gradient in the forward, so
    its backward reads none of the weight; the plain one's does.
    Vocab-parallel under TP: the hidden states given with labels are already whole sequences,
    entered into the TP region by the caller (LoopLM.forward).
    With `slices` set the loss reads the weight one slice at a time
    (cross_entropy.sliced_linear_cross_entropy)."""

    def __init__(self, config: LoopLMConfig, tp: TensorParallel):
        rows = padded_vocab_size(config.vocab_size, tp.size, config.make_vocab_size_divisible_by)
        super().__init__(config.hidden_size, rows // tp.size, bias=False)
        self.vocab_size = config.vocab_size
        self.fused = config.fused_cross_entropy
        self.chunk_tokens = config.cross_entropy_chunk_tokens
        self.tp = tp
        mark_tensor_parallel(self, 0, tp)

    @property
    def backward_reads_weight(self) -> bool:
        return not self.fused

    def forward(self, hidden, labels=None, token_weights=None):
        if labels is None:
            logits = F.linear(self.tp.enter(hidden, hidden.ndim - 2), self.whole_weight())
            return self.tp.gather_vocab(logits)[..., : self.vocab_size]
        group = self.tp.group if self.tp.enabled else None
        if self.slices is not None:
            return sliced_linear_cross_entropy(hidden, self.slices, labels, token_weights, self.chunk_tokens,
                                               vocab_size=self.vocab_size, group=group)
        return linear_cross_entropy(hidden, self.forward_weight(), labels, token_weights, self.chunk_tokens, self.fused,
                                    vocab_size=self.vocab_size, group=group)


class LoopLM(nn.Module):
    def __init__(self, config: LoopLMConfig, tensor_parallel: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.tp = tensor_parallel
        # torch's layers draw their own default init from the generator, as much as their (here
        # sharded) sizes ask; rewinding it makes reset_parameters draw the same full tensors at
        # every TP degree.
        rng = torch.get_rng_state()
        self.model = LoopLMBackbone(config, tensor_parallel)
        self.lm_head = LMHead(config, tensor_parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        torch.set_rng_state(rng)
        # Built on the meta device (parallel/build.py), nothing is drawn here:
        # that builder materialises a rank's part and draws the same values, tensor by tensor.
        if not self.lm_head.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter to its initial value (initial_tensors), this rank's TP shard of it."""
        for name, module in self.named_modules():
            for param_name, full in self.initial_tensors(name, module).items():
                getattr(module, param_name).copy_(self.tensor_parallel_shard(f"{name}.{param_name}", full))

    def initial_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """The initial full tensors of one module's own parameters, drawn from torch's generator
        where random. Called for every module in named_modules' order (what reset_parameters and
        the pipeline's builder do), the draws are the same at every layout: the full tensor is
        drawn and a rank keeps its shard, so the model is the same at any TP degree (and the
        padded vocabulary rows are zero).

        Normal(0, initializer_range) for matrices; the projections that write into the residual
        stream are scaled by 1/sqrt(2 N) (GPT-2/Megatron). The sandwich norms on the attention and
        MLP outputs start at sublayer_norm_init: they fix the scale of what each sub-layer adds,
        and at 1 every loop would overwrite its input (measured: README, "Initialisation")."""
        config = self.config
        values = {}
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = config.initializer_range
            if name.endswith(("o_proj", "down_proj")):
                std /= math.sqrt(2 * config.num_hidden_layers)
            weight = torch.empty(self._full_shape(f"{name}.weight", module.weight))
            values["weight"] = nn.init.normal_(weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                values["bias"] = torch.zeros(self._full_shape(f"{name}.bias", module.bias))
        elif isinstance(module, RMSNorm):
            is_sublayer_output = name.endswith(("input_layernorm_2", "post_attention_layernorm_2"))
            values["weight"] = torch.full(self._full_shape(f"{name}.weight", module.weight),
                                          config.sublayer_norm_init if is_sublayer_output else 1.0)
        # Exit gate bias: lambda = 1/T at the start, so every loop gets a share of the exit mass
        # (a zero bias, lambda = 1/2, puts half of it on loop 1, which then trains fastest and
        # pulls the distribution further towards exiting early).
        if isinstance(module, ExitGate) and config.total_ut_steps > 1:
            values["bias"] = torch.full((1,), -math.log(config.total_ut_steps - 1))
        return values

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.config.vocab_size, self.tp.size, self.config.make_vocab_size_divisible_by)

    def _full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        """The shape of the unsharded, unpadded tensor behind parameter `name`."""
        shape = list(shard_shape(param))
        dim = partition_dim(name)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            shape[0] = self.config.vocab_size
        elif dim is not None:
            shape[dim] *= self.tp.size
        return tuple(shape)

    def tensor_parallel_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's TP slice of a full tensor (weights, or anything shaped like them)."""
        return shard(full, name, self.tp.rank, self.tp.size, self.padded_vocab_size)

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load full tensors with the released names and shapes (a consolidated or exported model):
        this rank takes its TP shard, the vocabulary rows are padded."""
        self.load_state_dict({name: self.tensor_parallel_shard(name, tensor) for name, tensor in state_dict.items()}, strict=strict)

    def set_rope_theta(self, theta: float) -> None:
        """Change the RoPE base on a live model (RoPE annealing between curriculum stages)."""
        self.config.rope_theta = theta
        self.model.rotary_emb.set_theta(theta)

    def num_parameters(self) -> int:
        """Parameters of the whole model (every TP shard, no vocabulary padding); a tied weight
        counts once, as named_parameters yields it once."""
        return sum(math.prod(self._full_shape(name, p)) for name, p in self.named_parameters())

    def positions(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                  position_ids: Optional[torch.Tensor] = None) -> tuple[tuple[torch.Tensor, torch.Tensor], AttentionMask]:
        """RoPE cos/sin and the attention mask of a batch, the same in every loop. segment_ids [B, S]
        restricts attention to each document and restarts positions per document."""
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.model.rotary_emb(position_ids), AttentionMask(segment_ids)

    def loop_step(self, x: torch.Tensor, loop: int, num_loops: int, rope, mask: AttentionMask,
                  caches: Optional[Sequence] = None, detach_gate: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Loop `loop` (0-based) of `num_loops`: this model's layers of the shared stack once, then the
        final norm and the exit gate where this model holds them (a pipeline's earlier ranks hold
        layers only). Returns the state passed on (after the norm: the loop's read-out state) and
        the gate logits [B, S] (whole sequences under SP), or None without a gate.

        Every per-loop option lives here, so the model, the pipeline's virtual stages and generation
        honour it alike: `truncated_loops` runs the loops before the last k without a graph (their
        read-out still trains the norm, gate and head); `activation_checkpointing` recomputes a
        whole loop ("loop") or each layer ("layer") in the backward, non-reentrant (reentrant
        checkpointing computes the shared weights' gradient twice under ZeRO-2/3). `caches`
        (decoding) holds one KV cache slot per layer for this loop. `detach_gate`: Stage II trains
        the gate alone, on states without a gradient path back into the LM."""
        config = self.config
        truncated = config.truncated_loops
        tracked = torch.is_grad_enabled() and (truncated is None or loop >= num_loops - truncated)
        with torch.set_grad_enabled(tracked):
            if tracked and config.activation_checkpointing == "loop":
                x = checkpoint(self._stack, x, rope, mask, use_reentrant=False)
            else:
                x = self._stack(x, rope, mask, caches)
        if not hasattr(self.model, "early_exit_gate"):
            return x, None
        gate_logits = self.model.early_exit_gate(x.detach() if detach_gate else x).squeeze(-1)
        return x, self.tp.gather_sequence(gate_logits, seq_dim=1)

    def _stack(self, x: torch.Tensor, rope, mask: AttentionMask, caches: Optional[Sequence] = None) -> torch.Tensor:
        per_layer = self.config.activation_checkpointing == "layer" and torch.is_grad_enabled()
        layers = self.model.layers.values() if isinstance(self.model.layers, nn.ModuleDict) else self.model.layers
        for i, layer in enumerate(layers):
            if caches is not None:
                x = layer(x, rope, mask, caches[i])
            elif per_layer:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask)
        return self.model.norm(x) if hasattr(self.model, "norm") else x

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        num_loops: Optional[int] = None,
        segment_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        objective: Objective = "stage1",
        beta: Optional[float] = None,
    ) -> LoopLMOutput:
        """input_ids [B, S]. labels [B, S] are aligned with the inputs (labels[:, i] is the token
        that follows position i; -100 is ignored). segment_ids [B, S] (document index of each
        token, see attention.segment_ids_from_eod) restricts attention to each document and
        restarts positions per document. num_loops overrides the loop count T for this call."""
        config = self.config
        num_loops = num_loops or config.total_ut_steps
        rope, mask = self.positions(input_ids, segment_ids, position_ids)
        x = self.model.embed_tokens(input_ids)  # sequence shards under SP
        states, gates = [], []
        for loop in range(num_loops):
            x, gate_logits = self.loop_step(x, loop, num_loops, rope, mask, detach_gate=objective == "stage2")
            states.append(x)
            gates.append(gate_logits)
        gate_logits = torch.stack(gates).float()  # [T, B, S] on every rank
        log_p = exit_log_probs(gate_logits)
        output = LoopLMOutput(states, gate_logits, torch.sigmoid(gate_logits), log_p.exp())
        if labels is None:
            return output
        # The vocab-parallel head reads whole sequences: replicated states enter the TP region
        # (their gradient is all-reduced), sequence shards are all-gathered.
        hidden = self.tp.enter(torch.stack(states), seq_dim=2).flatten(1, 2)  # [T, B*S, H]
        beta = config.entropy_beta if beta is None else beta
        output.terms = objective_terms(objective, hidden, gate_logits.flatten(1), log_p.flatten(1), labels.flatten(),
                                       self.lm_head, 0, num_loops, beta)
        return output
