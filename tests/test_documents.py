"""gpt2/documents.py: document ids and positions of packed rows, the collate function, a batch's
document arguments, and the dense mask."""

import pytest
import torch

from gpt2 import documents


def test_document_ids_from_end_of_text():
    """A packed row's documents: the end-of-text token closes its document and belongs to it."""
    eot = 0
    rows = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert documents.document_ids(rows, eot).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    batch = documents.WithDocumentIds(eot, restart_positions=True)([{"input_ids": r} for r in rows])
    assert batch["document_ids"].tolist() == documents.document_ids(rows, eot).tolist()
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_without_restart_positions_the_batch_has_no_positions():
    rows = torch.tensor([[5, 0, 7]])
    batch = documents.WithDocumentIds(0)([{"input_ids": r} for r in rows])
    assert set(batch) == {"input_ids", "document_ids"}


def test_document_kwargs_are_what_the_batch_carries_on_the_device():
    """Only the model's document arguments the batch has, moved to the device; nothing else of it."""
    ids = torch.tensor([[0, 0, 1]])
    batch = {"input_ids": torch.tensor([[5, 0, 7]]), "labels": torch.tensor([[5, 0, 7]]), "document_ids": ids}
    kwargs = documents.document_kwargs(batch, "meta")
    assert set(kwargs) == {"document_ids"} and kwargs["document_ids"].is_meta
    batch["position_ids"] = documents.document_positions(ids)
    assert set(documents.document_kwargs(batch, "cpu")) == {"document_ids", "position_ids"}
    assert documents.document_kwargs({"input_ids": ids}, "cpu") == {}


@pytest.mark.parametrize("causal", [True, False])
def test_document_mask_by_brute_force(causal):
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    mask = documents.document_mask(ids, causal)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert mask[b, 0, i, j] == (ids[b, i] == ids[b, j] and (j <= i or not causal))


def test_prepare_documents_per_implementation():
    """The dense causal mask for eager and sdpa; for triton, the kernel's document bounds (needs Triton)."""
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    for attn_impl in ("eager", "sdpa"):
        assert torch.equal(documents.prepare_documents(attn_impl, ids), documents.document_mask(ids, causal=True))
    pytest.importorskip("triton")
    from gpt2_kernels import DocumentBounds

    bounds = documents.prepare_documents("triton", ids)
    assert isinstance(bounds, DocumentBounds)
    assert bounds.start.tolist() == [[0, 0, 2, 2, 2, 5]] and bounds.end.tolist() == [[2, 2, 5, 5, 5, 6]]
