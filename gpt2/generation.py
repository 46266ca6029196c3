"""Autoregressive sampling with a KV cache: temperature, top-k, top-p (nucleus), greedy, EOS."""

from __future__ import annotations

import torch

from gpt2.errors import InputError


class KVCache:
    """One layer's keys and values so far, (B, n_kv_head, T_past, hs), grown by concatenation."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k, v):
        """Append this step's k, v (B, nkv, T, hs); return everything cached, this step included."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class NonFiniteLogitsError(InputError):
    """The model's logits hold nan or inf: there is no distribution to sample from (and argmax over
    nan picks garbage), which a model whose weights or config are broken gives."""


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top_k largest and outside the smallest set whose
    probability reaches top_p (the most likely token is always kept). logits: (B, V) float."""
    if top_k is not None and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)  # exactly k, even with ties
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Continue input_ids (B, T) by max_new_tokens tokens; returns (B, T + new).

    temperature 0 is greedy, as is one below float32's smallest normal number (the logits are
    divided in float32, where it rounds to 0 or loses its precision). A sequence that emits
    eos_token_id keeps emitting it (as padding) and generation stops once every sequence has.
    Without the cache the whole prefix is recomputed each step; with a fixed generator both paths
    draw the same random numbers, so they give the same tokens (up to floating-point ties).
    vocab_size: the tokenizer's size when it is smaller than the model's vocabulary; ids from it on
    (which the tokenizer can't decode) are never produced. NonFiniteLogitsError (an InputError) when
    the model's logits hold nan or inf.
    """
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.n_positions:
        raise InputError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
            f"the model's context of {model.config.n_positions}"
        )
    greedy = temperature < torch.finfo(torch.float32).tiny
    was_training = model.training
    model.eval()
    caches = [KVCache() for _ in model.transformer.h] if use_cache else None
    tokens = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_input = input_ids
    for _ in range(max_new_tokens):
        h = model.hidden_states(step_input if use_cache else tokens, caches)
        logits = model.lm_head(h[:, -1]).float()  # (B, V), the last position only
        if not logits.isfinite().all():
            raise NonFiniteLogitsError("the model's logits are not finite (nan/inf): its weights or config are broken")
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")  # rows the model has and the tokenizer lacks
        if greedy:
            next_token = logits.argmax(dim=-1)
        else:
            # The largest logit shifted to 0 before dividing: a small temperature then sends the others
            # towards -inf (probability 0), never the largest to inf (and softmax's inf - inf to nan).
            logits = logits - logits.amax(dim=-1, keepdim=True)
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if eos_token_id is not None:
            next_token = torch.where(finished, eos_token_id, next_token)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
        if eos_token_id is not None and finished.all():
            break
    model.train(was_training)
    return tokens
