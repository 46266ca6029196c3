"""gpt2_kernels/reference.py: the dense references themselves, against computations by hand. The
kernels are tested against them (test_attention.py, test_layer_norm.py); here they earn that trust."""

import math

import pytest
import torch

from gpt2_kernels import attention_ref
from gpt2_kernels.reference import attention_scale, attention_scores, causal_mask


def test_reference_document_mask():
    """attention_ref's document mask by hand: with documents [0, 3) and [3, 5), token 3 attends to
    itself alone (causal), so its output is v[3]; non-causal, token 0 averages v[0:3] under equal scores."""
    v = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    q = k = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    document_ids = torch.tensor([[0, 0, 0, 1, 1]])
    out = attention_ref(q, k, v, causal=True, document_ids=document_ids)
    torch.testing.assert_close(out[0, 0, 3], v[0, 0, 3])
    out = attention_ref(q, k, v, causal=False, document_ids=document_ids)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, :3].mean(0))
    torch.testing.assert_close(out[0, 0, 4], v[0, 0, 3:].mean(0))


def test_scale_defaults_to_inverse_sqrt_head_dim():
    assert attention_scale(64) == 1 / 8 and attention_scale(64, 0.5) == 0.5 and attention_scale(64, 0.0) == 0.0


@pytest.mark.parametrize("t_q", [1, 4, 9])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_causal_queries_are_the_last_positions(t_q, n_kv_head):
    """Fewer queries than keys (a KV cache): the queries are the last t_q positions, so their rows
    are those of the full sequence's last t_q queries; GQA reads K/V head h // (H / H_kv)."""
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k, v = (torch.randn(2, n_kv_head, 9, 8, dtype=torch.float64) for _ in range(2))
    full = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(attention_ref(q[:, :, -t_q:], k, v, causal=True), full[:, :, -t_q:], rtol=1e-12,
                               atol=1e-12)
    repeated = [x.repeat_interleave(4 // n_kv_head, dim=1) for x in (k, v)]
    torch.testing.assert_close(full, attention_ref(q, *repeated, causal=True), rtol=1e-12, atol=1e-12)
    assert causal_mask(2, 4, "cpu").tolist() == [[True, True, True, False], [True, True, True, True]]


def test_masks_combine_and_lse_is_the_rows_logsumexp():
    """A bool mask and causality hide a key each on their own; lse is each row's logsumexp of its
    visible scaled scores, by hand."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[3, 1] = False
    out, lse = attention_ref(q, k, v, causal=True, softmax_scale=0.7, mask=mask, return_lse=True)
    for i in range(5):
        keys = [j for j in range(i + 1) if mask[i, j]]
        scores = 0.7 * torch.einsum("hd,hjd->hj", q[0, :, i], k[0, :, keys])  # (H, visible)
        torch.testing.assert_close(lse[0, :, i], torch.logsumexp(scores, -1))
        torch.testing.assert_close(out[0, :, i], torch.einsum("hj,hjd->hd", scores.softmax(-1), v[0, :, keys]))
    hidden = attention_scores(q, k, causal=True, mask=mask)
    assert torch.isinf(hidden[0, :, 3, 1]).all() and torch.isinf(hidden[0, :, 1, 2]).all()


def test_same_precision_keeps_the_inputs_dtype_and_upcast_computes_in_float64():
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.bfloat16) for _ in range(3))
    assert attention_ref(q, k, v, upcast=False).dtype == torch.bfloat16
    exact = attention_ref(q, k, v)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, attention_ref(*(x.double() for x in (q, k, v)), upcast=False), rtol=0, atol=0)


def test_dropout_drops_probabilities_after_the_softmax():
    """dropout_p = 1 drops every probability; otherwise kept ones are scaled by 1 / (1 - p), as
    F.dropout on the probabilities with the same generator state."""
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    assert torch.equal(attention_ref(q, k, v, upcast=False, dropout_p=1.0), torch.zeros_like(q))
    torch.manual_seed(1)
    got = attention_ref(q, k, v, upcast=False, dropout_p=0.25)
    torch.manual_seed(1)
    probs = torch.softmax(attention_scores(q, k, causal=True), dim=-1)
    torch.testing.assert_close(got, torch.nn.functional.dropout(probs, p=0.25) @ v)
    assert not math.isclose(got.abs().sum().item(), attention_ref(q, k, v, upcast=False).abs().sum().item())
