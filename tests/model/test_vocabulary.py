import pytest
import torch
import torch.nn.functional as F

from looplm_mega.model.vocabulary import VocabularyMatrix, sliced_embedding
from tests.helpers import Slices


@pytest.mark.parametrize("count", [1, 4])
def test_sliced_embedding_equals_f_embedding_and_its_gradient(count):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 24, (3, 7), generator=g)
    ids[0, :3] = 5  # a repeated id: its gradient rows add up
    grad_out = torch.randn(3, 7, 8, generator=g)
    reference = F.embedding(ids, weight)
    reference.backward(grad_out)
    slices = Slices(weight, count)
    out = sliced_embedding(ids, slices)
    torch.testing.assert_close(out, reference)
    assert slices.gathered == list(range(count)) and not slices.grads
    out.backward(grad_out)
    assert slices.gathered == list(range(count))  # the backward reads no weight
    torch.testing.assert_close(slices.grad(), weight.grad)


def test_a_sliced_weight_is_read_whole_only_without_gradients():
    matrix = VocabularyMatrix()
    weight = torch.randn(8, 4)
    matrix.slices = Slices(weight, 2)
    with pytest.raises(RuntimeError, match="no_grad"):
        matrix.whole_weight()
    with torch.no_grad():
        torch.testing.assert_close(matrix.whole_weight(), weight)
