"""Packed documents: several documents in one row, kept apart.

Pretraining packs documents back to back into rows of block_size tokens, each document closed by
the end-of-text token (gpt2/data.py); the evaluation joins its texts into one stream
(gpt2/evaluation.py). Document masking keeps attention inside each document, as Llama 3 pretrains,
and restarted positions start every document at position 0. Everything about that lives here:

    ids = document_ids(input_ids, eot_id)              # (B, T): which document each token is in
    positions = document_positions(ids)                # (B, T): 0 at the start of every document
    collate = WithDocumentIds(eot_id, restart_positions=True)  # a DataLoader collate_fn adding both
    model(input_ids, **document_kwargs(batch, device))  # what a batch carries of them, on device

and, inside the model, what each attention implementation takes as ``documents``, built once per
forward for every layer (prepare_documents: the dense mask of document_mask, or our kernel's
document bounds).

Depends on torch only; the triton document bounds are imported from gpt2_kernels when asked for.
"""

from __future__ import annotations

import torch

DOCUMENT_KWARGS = ("document_ids", "position_ids")  # the model's keyword arguments for packed documents


def document_ids(input_ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) each token's document within its packed row: the count of end-of-text tokens before
    it, so the end-of-text token that closes a document belongs to that document."""
    ends = (input_ids == eot_id).long()
    return ends.cumsum(dim=1) - ends


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's position within its own document (ids non-decreasing along T): the
    positions to use when every document should start at position 0."""
    t = torch.arange(document_ids.shape[1], device=document_ids.device)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, t, 0).cummax(dim=1).values  # where the token's document starts
    return t - first


class WithDocumentIds:
    """A DataLoader collate_fn: the usual batch of {"input_ids": (B, T)} plus its "document_ids"
    (document_ids above), for document-masked attention over packed rows, and with
    restart_positions its "position_ids", 0 at the start of every document."""

    def __init__(self, eot_id: int, restart_positions: bool = False):
        self.eot_id, self.restart_positions = eot_id, restart_positions

    def __call__(self, items):
        batch = torch.utils.data.default_collate(items)
        batch["document_ids"] = document_ids(batch["input_ids"], self.eot_id)
        if self.restart_positions:
            batch["position_ids"] = document_positions(batch["document_ids"])
        return batch


def document_kwargs(batch: dict, device) -> dict:
    """The model's document arguments a batch carries, on device: none, or its document_ids
    (document masking) and position_ids (restarted positions), for ``model(input_ids, **...)``."""
    return {name: batch[name].to(device) for name in DOCUMENT_KWARGS if name in batch}


def document_mask(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j: the same document (ids (B, T),
    non-decreasing along T) and, when causal, j <= i. The dense form of what our kernel does."""
    mask = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    if causal:
        t = document_ids.shape[1]
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    return mask[:, None]


def prepare_documents(attn_impl: str, document_ids: torch.Tensor):
    """What attn_impl takes as `documents` for causal attention within each document of ids (B, T),
    non-decreasing along T: the dense (B, 1, T, T) mask for eager and sdpa, the document bounds for
    triton (gpt2_kernels.document_bounds, which checks the order: one device-to-host sync). Built once
    per forward and shared by every layer, as flash-attn's cu_seqlens or FlexAttention's block mask."""
    if attn_impl == "triton":
        from gpt2_kernels import document_bounds

        return document_bounds(document_ids)
    return document_mask(document_ids, causal=True)
