"""Sampling: the KV cache changes nothing, filters only ever allow what they should."""

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from gpt2.generation import filter_logits

VARIANTS = {
    "gpt2": {},
    "gqa": dict(n_kv_head=2),
    "mqa_rope": dict(n_kv_head=1, position_embedding="rope"),
}


def tiny_model(**overrides):
    config = GPT2Config(**{**dict(vocab_size=53, n_positions=48, n_embd=32, n_layer=2, n_head=4), **overrides})
    return GPT2(config).double().eval()  # float64: no near-ties between the two paths' logits


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.3, top_k=7, top_p=0.9)])
def test_cache_gives_the_same_tokens(variant, sampling):
    model = tiny_model(**VARIANTS[variant])
    prompt = torch.randint(0, 53, (3, 5))
    outs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(1234)
        outs.append(model.generate(prompt, 30, use_cache=use_cache, generator=generator, **sampling))
    assert outs[0].shape == (3, 35)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][:, :5], prompt, rtol=0, atol=0)


def test_cached_logits_match_full_forward():
    model = tiny_model(n_kv_head=2, position_embedding="rope")
    from gpt2.generation import KVCache

    ids = torch.randint(0, 53, (2, 12))
    caches = [KVCache() for _ in model.transformer.h]
    with torch.no_grad():
        first = model.lm_head(model.hidden_states(ids[:, :7], caches))
        rest = model.lm_head(model.hidden_states(ids[:, 7:], caches))
        full = model(ids)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-12, atol=1e-12)


def test_greedy_is_argmax_of_the_full_forward():
    model = tiny_model()
    prompt = torch.randint(0, 53, (2, 4))
    out = model.generate(prompt, 6, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(out[:, 4:], logits[:, 3:].argmax(-1), rtol=0, atol=0)


def test_top_k_and_top_p_only_allow_the_right_tokens():
    logits = torch.randn(4, 50)
    probs = logits.softmax(-1)
    kept = filter_logits(logits, top_k=5).isfinite()
    assert torch.equal(kept, probs >= probs.topk(5).values[:, -1:])
    p = 0.7
    kept = filter_logits(logits, top_p=p).isfinite()
    for row in range(4):
        order = probs[row].argsort(descending=True)
        mass_before = probs[row][order].cumsum(0) - probs[row][order]
        expected = torch.zeros(50, dtype=torch.bool)
        expected[order[mass_before < p]] = True  # the smallest prefix reaching p
        assert torch.equal(kept[row], expected)
        assert probs[row][kept[row]].sum() >= p


def test_top_k_keeps_exactly_k_with_ties():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.5]])
    assert filter_logits(logits, top_k=2).isfinite().sum() == 2


def test_sampling_only_draws_allowed_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 53, (64, 1))
    with torch.no_grad():
        logits = model(prompt)[:, -1].float()
    allowed = filter_logits(logits, top_k=4, top_p=0.5).isfinite()
    out = model.generate(prompt, 1, top_k=4, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert allowed[torch.arange(64), out[:, 1]].all()
    assert (allowed.sum(-1) <= 4).all()


def test_eos_pads_and_stops():
    model = tiny_model()
    prompt = torch.randint(0, 53, (2, 3))
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5])  # the token sequence 0 emits third
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    first = (out[0, 3:] == eos).nonzero()[0].item() + 3
    assert (out[0, first:] == eos).all()
    torch.testing.assert_close(out[:, :first], greedy[:, :first], rtol=0, atol=0)


def test_bad_arguments():
    model = tiny_model()
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        model.generate(prompt, 45)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 1, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1)
