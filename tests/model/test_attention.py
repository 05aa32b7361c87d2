import pytest
import torch
from torch.utils.checkpoint import checkpoint

from looplm_mega.model.attention import (
    AttentionMask, attention, flash_attn_module, positions_from_segments, resolve_backend, segment_ids_from_eod,
)

from tests.helpers import requires_cuda


def test_segments_and_positions_from_eod():
    ids = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [1, 2, 3, 4, 5, 6, 7]])
    segments = segment_ids_from_eod(ids, eod_token_id=0)
    assert segments.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0] * 7]
    assert positions_from_segments(segments).tolist() == [[0, 1, 0, 1, 2, 0, 0], list(range(7))]


def test_varlen_boundaries_never_merge_rows():
    segments = torch.tensor([[0, 0, 1], [0, 1, 1], [2, 2, 2]])
    cu, max_len = AttentionMask(segments).varlen()
    assert cu.tolist() == [0, 2, 3, 4, 6, 9] and max_len == 3


def test_dense_mask_is_causal_within_documents():
    mask = AttentionMask(torch.tensor([[0, 0, 1, 1]])).dense()[0, 0]
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_flash_backend_refuses_clearly_without_its_requirements():
    q = torch.zeros(1, 4, 2, 8)
    assert resolve_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match="attention_backend='flash' needs the flash-attn package"):
        resolve_backend("flash", q)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.skipif(flash_attn_module() is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("documents", [False, True])
def test_flash_attn_agrees_with_sdpa(documents):
    torch.manual_seed(0)
    q = torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    segments = None
    if documents:
        segments = torch.cat([torch.zeros(2, 20), torch.ones(2, 30), torch.full((2, 14), 2)], 1).long().cuda()
    flash = attention(q, k, v, AttentionMask(segments), backend="flash")
    sdpa = attention(q, k, v, AttentionMask(segments), backend="sdpa")
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)


def test_attention_traces_into_one_graph_under_checkpointing():
    # torch.compile of the loop step (tools/benchmark.py --compile) must not fall back to eager
    # where activation checkpointing wraps the layer (a higher-order op: no graph break allowed).
    torch._dynamo.reset()
    q, k, v = torch.randn(3, 1, 8, 2, 4, requires_grad=True).unbind(0)
    checkpointed = lambda q, k, v: checkpoint(attention, q, k, v, AttentionMask(), use_reentrant=False)  # noqa: E731
    explained = torch._dynamo.explain(checkpointed)(q, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
