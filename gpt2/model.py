"""GPT-2, from scratch.

Pre-LayerNorm transformer (Radford et al. 2019): token + learned position embeddings, n_layer
blocks of LN -> causal self-attention -> residual and LN -> MLP (tanh-GELU) -> residual, a final
LN, and an LM head tied to the token embedding. Parameter names follow Hugging Face's GPT-2
checkpoints (transformer.wte, transformer.h.0.attn.c_attn, ...), so interop is a key-for-key copy
plus a transpose of the Conv1D weights (gpt2/hf.py).

Attention and LayerNorm run through gpt2/registry.py, chosen by config.attn_impl and
config.norm_impl at every call. The residual stream travels between blocks as (x, residual):
each LayerNorm first adds the pending branch output x into the residual, then normalises it,
which is exactly the fused `add_layer_norm` kernel's contract.

Activation checkpointing (`gradient_checkpointing_enable()`, transformers' name; pretrain.py's
--gradient_checkpointing) keeps only each block's inputs during training and recomputes the block
in the backward pass (torch.utils.checkpoint, non-reentrant, RNG state restored so dropout masks
repeat): the same gradients, bit for bit, for about a third more compute.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2 import hf
from gpt2.config import GPT2Config
from gpt2.documents import prepare_documents
from gpt2.errors import InputError
from gpt2.generation import generate
from gpt2.loss import IGNORE_INDEX, linear_cross_entropy
from gpt2.registry import ATTENTION, NORM, check_available


class LayerNorm(nn.Module):
    """LayerNorm whose forward can also fold in the residual add: ln(x) or ln(x + residual)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias else None

    def forward(self, x, residual=None):
        """Returns (normed, new_residual). With no residual yet, x itself starts the stream."""
        norm, add_norm = NORM[self.config.norm_impl]
        eps = self.config.layer_norm_epsilon
        if residual is None:
            return norm(x, self.weight, self.bias, eps), x
        return add_norm(x, residual, self.weight, self.bias, eps)


def rotary_tables(config: GPT2Config, positions: torch.Tensor, dtype):
    """cos and sin for rotating channel pairs (i, i + D/2) by position * theta_i: (T, head_dim) for
    positions (T,), or (B, 1, T, head_dim) for per-row positions (B, T)."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, D)
    if positions.dim() == 2:
        angles = angles[:, None]  # (B, 1, T, D): one table per row, shared by the heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE (GPT-NeoX / Llama layout) on x (B, nh, T, hs), returned in x's dtype (under
    autocast the tables are fp32 while q and k are bf16; attention needs q, k, v in one dtype)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k, v in one projection; with grouped-query attention k and v have fewer heads.
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary=None, kv_cache=None, documents=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nkv, T_past + T, hs)
        dropout_p = self.config.dropout if self.training else 0.0
        y = ATTENTION[self.config.attn_impl](q, k, v, causal=True, dropout_p=dropout_p,
                                             documents=documents)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = LayerNorm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config)
        self.mlp = MLP(config)

    def forward(self, x, residual, rotary=None, kv_cache=None, documents=None):
        h, residual = self.ln_1(x, residual)  # residual += x; h = ln_1(residual)
        x = self.attn(h, rotary, kv_cache, documents)
        h, residual = self.ln_2(x, residual)  # residual += attention output
        return self.mlp(h), residual  # the MLP output is added by the next LayerNorm


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        # The model's own copy (replace() validates it): set_kernels on one model must not switch
        # another built from the same config, nor change the caller's.
        config = dataclasses.replace(config)
        check_available(config.attn_impl, config.norm_impl)
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config),
            )
        )
        if config.position_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()  # one matrix embeds and un-embeds
        self.gradient_checkpointing = False  # a training setting, not saved with the model
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # since each block adds two of them and the stream's variance grows with every add.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_kernels(self, attn_impl: str | None = None, norm_impl: str | None = None) -> GPT2:
        """Switch the attention / LayerNorm implementation in place (every module reads the config)."""
        attn_impl = attn_impl or self.config.attn_impl
        norm_impl = norm_impl or self.config.norm_impl
        GPT2Config(**{**self.config.to_dict(), "attn_impl": attn_impl, "norm_impl": norm_impl})  # validates
        check_available(attn_impl, norm_impl)
        self.config.attn_impl, self.config.norm_impl = attn_impl, norm_impl
        return self

    def tie_weights(self) -> None:
        """Point the LM head at the token embedding's matrix (transformers' name). Accelerate's FSDP2
        preparation calls it after moving the model to the meta device and again after loading the
        gathered weights, either of which leaves two separate matrices otherwise."""
        self.lm_head.weight = self.transformer.wte.weight

    def gradient_checkpointing_enable(self) -> GPT2:
        """Recompute each block in the backward pass instead of keeping its activations (training
        only; cached decoding and no-grad calls run as before)."""
        self.gradient_checkpointing = True
        return self

    def gradient_checkpointing_disable(self) -> GPT2:
        self.gradient_checkpointing = False
        return self

    def hidden_states(self, input_ids, kv_caches=None, document_ids=None, position_ids=None):
        """The final LayerNorm's output, (B, T, C). With KV caches, input_ids continue the cached
        prefix. document_ids (B, T): attention stays within each document (packed rows);
        position_ids (B, T): positions other than 0..T-1 (gpt2.documents.document_positions
        restarts them at every document)."""
        B, T = input_ids.shape
        past = kv_caches[0].length if kv_caches else 0
        if past + T > self.config.n_positions:
            raise InputError(
                f"sequence of {past + T} tokens is longer than the model's context (n_positions="
                f"{self.config.n_positions})"
            )
        documents = None
        if document_ids is not None:
            if kv_caches:
                raise InputError("document_ids mask whole sequences; cached decoding takes none")
            if document_ids.shape != (B, T):
                raise InputError(f"document_ids must be (batch, seq_len) = {(B, T)}, got {tuple(document_ids.shape)}")
            if document_ids.device != input_ids.device:
                raise InputError(f"document_ids must be on input_ids' device {input_ids.device}, "
                                 f"got {document_ids.device}")
            # once for every layer: the dense mask (eager, sdpa) or our kernel's document bounds
            documents = prepare_documents(self.config.attn_impl, document_ids)
        positions = torch.arange(past, past + T, device=input_ids.device) if position_ids is None else position_ids
        x = self.transformer.wte(input_ids)  # (B, T, C)
        rotary = None
        if self.config.position_embedding == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            rotary = rotary_tables(self.config, positions, x.dtype)
        x = self.transformer.drop(x)
        residual = None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not kv_caches
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x, residual = checkpoint(block, x, residual, rotary, None, documents, use_reentrant=False)
            else:
                x, residual = block(x, residual, rotary, kv_caches[i] if kv_caches else None, documents)
        h, _ = self.transformer.ln_f(x, residual)
        return h

    def forward(self, input_ids, labels=None, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                document_ids=None, position_ids=None):
        """Logits (B, T, vocab) without labels. With labels (aligned with input_ids; the shift to
        next-token targets happens here, as in Hugging Face), the next-token cross-entropy: the mean
        over non-ignored targets, their sum with reduction="sum" (for token-weighted averages), or,
        under torch.no_grad(), each target's NLL as (B, T - 1) with reduction="none".

        The loss never materialises the whole batch's logits: linear_cross_entropy computes them
        chunk by chunk (softmax and loss in fp32) and keeps only the gradient it needs (gpt2/loss.py).
        document_ids and position_ids: see hidden_states.
        """
        h = self.hidden_states(input_ids, document_ids=document_ids, position_ids=position_ids)
        if labels is None:
            return self.lm_head(h)
        targets = labels[:, 1:]
        h = h[:, :-1]
        loss = linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1), ignore_index, reduction
        )
        return loss.view(targets.shape) if reduction == "none" else loss

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, counting the tied LM head once. exclude_embeddings drops wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM appendix B estimate:

        Every parameter in a matmul costs 2 FLOPs per token forward (multiply + add) and 4
        backward (grad w.r.t. its input and w.r.t. itself): 6N. N counts the tied wte once, as the
        LM head's matmul, and leaves out wpe, which is a lookup. Attention adds QK^T and AV:
        2 * 2 * T * hs FLOPs per head per token forward, times 3 for backward: 12 * L * H * hs * T.
        That counts the full T x T square although causal attention needs only half of it (the
        convention nanoGPT, PaLM and most MFU tables use). Grouped-query attention saves
        parameters (smaller c_attn, so smaller N) but not attention FLOPs: every query head still
        scores T keys.
        """
        n = self.num_parameters()
        if "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        cfg = self.config
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    generate = generate

    def save_pretrained(self, save_directory, eos_token_id: int | None = None) -> None:
        hf.save_pretrained(self, save_directory, eos_token_id)

    @classmethod
    def from_pretrained(cls, path_or_name, **config_overrides) -> GPT2:
        return hf.from_pretrained(cls, path_or_name, **config_overrides)
