"""The model itself: configuration, causality, implementations agreeing, init, presets, loss, FLOPs."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2 import GPT2, GPT2Config, registry
from gpt2.loss import linear_cross_entropy
from gpt2.registry import ATTENTION, resolve_kernels


def tiny_config(**overrides):
    values = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2Config(**{**values, **overrides})


VARIANTS = {
    "gpt2": {},
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "rope": dict(position_embedding="rope"),
    "rope_gqa_nobias": dict(position_embedding="rope", n_kv_head=2, bias=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    """Changing token t changes no logit before t, and does change the logits at t."""
    model = GPT2(tiny_config(**VARIANTS[variant])).double().eval()
    ids = torch.randint(0, 97, (2, 23))
    t = 11
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 97
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_equals_sdpa(variant):
    model = GPT2(tiny_config(**VARIANTS[variant])).double().eval()
    ids = torch.randint(0, 97, (3, 29))
    eager = model.set_kernels(attn_impl="eager")(ids)
    sdpa = model.set_kernels(attn_impl="sdpa")(ids)
    torch.testing.assert_close(eager, sdpa, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_q, t_k", [(1, 9), (4, 9), (9, 9)])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_impls_match_reference(t_q, t_k, n_kv_head):
    """Bottom-right causal alignment (what a KV cache needs) against a per-query loop in float64."""
    B, H, D = 2, 4, 8
    q = torch.randn(B, H, t_q, D, dtype=torch.float64)
    k = torch.randn(B, n_kv_head, t_k, D, dtype=torch.float64)
    v = torch.randn(B, n_kv_head, t_k, D, dtype=torch.float64)
    expected = torch.empty_like(q)
    for h in range(H):
        kv = h // (H // n_kv_head)
        for i in range(t_q):
            visible = t_k - t_q + i + 1  # query i sits at position t_k - t_q + i
            scores = torch.einsum("bd,bjd->bj", q[:, h, i], k[:, kv, :visible]) / math.sqrt(D)  # (B, visible)
            expected[:, h, i] = (scores.softmax(-1)[:, :, None] * v[:, kv, :visible]).sum(1)
    for name in ("eager", "sdpa"):
        out = ATTENTION[name](q, k, v, causal=True)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=name)


def test_switching_kernels_keeps_the_model():
    model = GPT2(tiny_config())
    weight = model.transformer.wte.weight
    model.set_kernels(attn_impl="eager")
    assert model.config.attn_impl == "eager" and model.transformer.wte.weight is weight
    assert all(block.attn.config.attn_impl == "eager" for block in model.transformer.h)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        model.set_kernels(attn_impl="flash")
    assert model.config.attn_impl == "eager"


def test_models_from_one_config_own_their_kernels():
    """Each model owns a copy of its config: switching one model's kernels leaves another model
    built from the same config, and the config itself, as they were."""
    config = tiny_config(attn_impl="sdpa")
    a, b = GPT2(config), GPT2(config)
    b.set_kernels(attn_impl="eager", norm_impl="torch")
    assert b.config.attn_impl == "eager"
    assert config.attn_impl == "sdpa" and a.config.attn_impl == "sdpa"
    assert all(block.attn.config.attn_impl == "sdpa" for block in a.transformer.h)
    assert a.config == config and a.config is not config


def test_init_statistics():
    config = GPT2Config.from_preset("gpt2", n_layer=4, vocab_size=4096)
    model = GPT2(config)
    std_proj = 0.02 / math.sqrt(2 * config.n_layer)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(param == 0), name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(param == 1), name
        else:
            expected = std_proj if name.endswith("c_proj.weight") else 0.02
            # The sample std of n normals is within a few 1/sqrt(2n) relative of the truth.
            assert abs(param.std().item() - expected) < 5 * expected / math.sqrt(2 * param.numel()), name
            assert abs(param.mean().item()) < 5 * expected / math.sqrt(param.numel()), name
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(preset, expected):
    """The published GPT-2 sizes, counting the tied LM head once. Built on the meta device: no memory."""
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset(preset))
    assert model.num_parameters() == expected
    c = model.config
    assert model.num_parameters(exclude_embeddings=True) == expected - (c.vocab_size + c.n_positions) * c.n_embd


def test_small_preset_is_small():
    model = GPT2(GPT2Config.from_preset("gpt2-tiny"))
    assert model.num_parameters() < 6_000_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_head=4, n_kv_head=3), "must divide n_head"),
        (dict(attn_impl="flash"), "attn_impl must be one of"),
        (dict(norm_impl="apex"), "norm_impl must be one of"),
        (dict(position_embedding="alibi"), "position_embedding must be one of"),
        (dict(n_layer=0), "positive integer"),
        (dict(dropout=1.0), "dropout"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be positive and finite"),
        (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon must be positive and finite"),
        (dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon must be positive and finite"),
        (dict(rope_theta=0.0), "rope_theta must be positive and finite"),
        (dict(rope_theta=float("inf")), "rope_theta must be positive and finite"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_presets_and_overrides():
    with pytest.raises(ValueError, match="presets: gpt2, gpt2-medium"):
        GPT2Config.from_preset("gpt3")
    config = GPT2Config.from_preset("gpt2").with_overrides("n_layer=2, n_embd=96,bias=false,n_kv_head=3")
    assert (config.n_layer, config.n_embd, config.bias, config.n_kv_head) == (2, 96, False, 3)
    assert GPT2Config.from_preset("gpt2").with_overrides("n_head=2").n_kv_head == 2
    assert GPT2Config.from_preset("gpt2", n_kv_head=4).with_overrides("n_layer=2").n_kv_head == 4
    with pytest.raises(ValueError, match="key=value"):
        config.with_overrides("n_layers=2")
    with pytest.raises(ValueError, match="unknown GPT2Config field"):
        GPT2Config.from_dict({"n_layers": 2})


def test_triton_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use attn_impl='sdpa'"):
        GPT2(tiny_config(attn_impl="triton"))
    model = GPT2(tiny_config())
    with pytest.raises(RuntimeError, match="need a CUDA GPU"):
        model.set_kernels(norm_impl="triton")
    assert model.config.norm_impl == "torch"


def test_resolve_kernels(monkeypatch):
    assert resolve_kernels("sdpa") == ("sdpa", "torch")
    assert resolve_kernels("eager", "cuda") == ("eager", "torch")
    assert resolve_kernels("auto", "cpu") == ("sdpa", "torch")
    # On CUDA (here: the interpreter stands in), auto is SDPA unless a committed benchmark shows
    # our kernels faster on the GPU's family: not for an unmeasured family, nor for a slower one.
    assert resolve_kernels("auto", "cuda") == ("sdpa", "torch")
    monkeypatch.setattr(registry, "cuda_capability", lambda: (9, 0))
    monkeypatch.setitem(registry.TRITON_TRAINING_SPEEDUP, (9, 0), (0.65, "slower.csv"))
    assert registry.auto_kernels("cuda") == (("sdpa", "torch"), "PyTorch's kernels: ours trained at 0.65x their "
                                                                 "tokens/s on sm_90 (slower.csv)")
    monkeypatch.setitem(registry.TRITON_TRAINING_SPEEDUP, (9, 0), (1.3, "faster.csv"))
    # Measured faster: triton, with SDPA attention when training with dropout; inference, where
    # dropout does nothing, takes our attention whatever the config says.
    assert resolve_kernels("auto", "cuda") == ("triton", "triton")
    assert resolve_kernels("auto", "cuda", train_dropout=0.1) == ("sdpa", "triton")
    assert resolve_kernels("auto", "cpu") == ("sdpa", "torch")
    assert resolve_kernels("triton", "cuda") == ("triton", "triton")
    with pytest.raises(ValueError, match="--kernels triton: our triton attention kernel has no attention dropout"):
        resolve_kernels("triton", "cuda", train_dropout=0.1)
    with pytest.raises(ValueError, match="--kernels must be one of"):
        resolve_kernels("flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="need a CUDA GPU"):
        resolve_kernels("triton")


def test_auto_reads_the_committed_training_results():
    """TRITON_TRAINING_SPEEDUP holds what the committed training results say: for each file named,
    GPT-2 124M's triton over sdpa tokens/s to two digits, on a device of that family; and every
    committed results file with both runs has its entry, so a new result can't be left out."""
    import csv

    root = Path(__file__).resolve().parents[1]
    families = {"NVIDIA H100": (9, 0), "NVIDIA H200": (9, 0)}  # device names in the files, by family
    measured = {}
    for path in sorted(root.glob("benchmarks/results/*/training.csv")):
        rows = [r for r in csv.DictReader(path.open()) if r["metric"] == "tokens_per_s" and r["preset"] == "gpt2"
                and r["status"] == "ok" and r["dtype"] == "bf16"]
        tps = {r["provider"]: float(r["p50"]) for r in rows}
        if {"sdpa", "triton"} <= set(tps):
            device = rows[0]["device"]
            family = next(f for name, f in families.items() if device.startswith(name))
            measured[family] = (round(tps["triton"] / tps["sdpa"], 2), str(path.relative_to(root)))
    assert measured == registry.TRITON_TRAINING_SPEEDUP


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_matches_float64_cross_entropy(reduction, monkeypatch):
    """The chunked fused loss and its gradients against F.cross_entropy on full float64 logits,
    with chunks small enough that several are used and some targets ignored."""
    monkeypatch.setattr("gpt2.loss._MAX_CHUNK_ELEMENTS", 97 * 7)  # 7 rows per chunk
    model = GPT2(tiny_config()).double()
    ids = torch.randint(0, 97, (3, 17))
    labels = ids.clone()
    labels[0, 5:9] = -100
    loss = model(ids, labels=labels, reduction=reduction)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), reduction=reduction)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_per_token_loss_for_evaluation():
    model = GPT2(tiny_config()).double().eval()
    ids = torch.randint(0, 97, (2, 13))
    labels = ids.clone()
    labels[1, 4] = -100
    with torch.no_grad():
        per_token = model(ids, labels=labels, reduction="none")
        ref = F.cross_entropy(model(ids)[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    assert per_token.shape == (2, 12) and per_token[1, 3] == 0
    torch.testing.assert_close(per_token, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(ids, labels=labels, reduction="none")


def test_rope_keeps_qkv_in_one_dtype_under_autocast(monkeypatch):
    """Under bf16 autocast the rotary tables are fp32; q and k must still reach attention as bf16,
    like v (our triton kernel requires one dtype)."""
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return ATTENTION["sdpa"](q, k, v, **kwargs)

    monkeypatch.setitem(ATTENTION, "eager", spy)
    model = GPT2(tiny_config(position_embedding="rope", attn_impl="eager"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (1, 8)))
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)


def test_loss_without_grad_and_all_ignored():
    h = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(11, 8, dtype=torch.float64)
    t = torch.randint(0, 11, (6,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.T, t))
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((6,), -100)))


def test_flops_per_token():
    config = GPT2Config.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT2(config)
    n = 124_439_808 - 1024 * 768  # the position table is a lookup, not a matmul
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_dropout_trains_and_is_off_in_eval():
    model = GPT2(tiny_config(dropout=0.5))
    ids = torch.randint(0, 97, (2, 9))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)


def test_context_length_is_enforced():
    model = GPT2(tiny_config(n_positions=8))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_packed_documents_equal_separate_sequences(attn_impl, position_embedding):
    """A packed row of three documents (one of a single token), with document_ids and positions
    restarted per document, gives each document the logits it gets alone: nothing leaks across a
    boundary. float64, so any leak shows far above rounding."""
    from gpt2.documents import document_positions

    config = tiny_config(attn_impl=attn_impl, position_embedding=position_embedding, n_kv_head=1)
    model = GPT2(config).double().eval()
    lengths = [5, 1, 7]
    docs = [torch.randint(0, config.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    assert document_positions(ids).tolist() == [[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        together = model(packed, document_ids=ids, position_ids=document_positions(ids))
        apart = torch.cat([model(doc) for doc in docs], dim=1)
        leaking = model(packed)  # without the mask the later documents see the earlier ones
    torch.testing.assert_close(together, apart, rtol=1e-10, atol=1e-10)
    assert (leaking - apart)[:, lengths[0]:].abs().max() > 1e-3


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_document_mask_is_built_once_per_forward(attn_impl, monkeypatch):
    """The dense mask is built once for every layer, not once per layer."""
    from gpt2 import documents

    calls = []
    real = documents.document_mask
    monkeypatch.setattr(documents, "document_mask", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = GPT2(tiny_config(attn_impl=attn_impl, n_layer=3)).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        model(x, document_ids=torch.arange(11).repeat(2, 1) // 4)
    assert len(calls) == 1


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_one_document_per_row_is_plain_causal(attn_impl):
    model = GPT2(tiny_config(attn_impl=attn_impl)).double().eval()
    x = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(x, document_ids=torch.zeros_like(x)), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"document_ids must be \(batch, seq_len\)"):
        model(x, document_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="document_ids must be on input_ids' device cpu"):
        model(x, document_ids=torch.zeros(2, 11, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_dense_attention_refuses_documents_it_cannot_honour(attn_impl):
    """A direct caller of the registry: the prepared mask is causal, and the ids are not a mask."""
    from gpt2.documents import prepare_documents
    from gpt2.registry import ATTENTION

    q = k = v = torch.randn(1, 2, 6, 8)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    with pytest.raises(ValueError, match="hold a causal mask"):
        ATTENTION[attn_impl](q, k, v, causal=False, documents=prepare_documents(attn_impl, ids))
    with pytest.raises(ValueError, match=r"bool mask from prepare_documents"):
        ATTENTION[attn_impl](q, k, v, causal=True, documents=ids)


def test_config_from_name_or_path(tmp_path):
    """A preset by name, or a config.json (its directory too), whose keys we don't have (an HF
    GPT-2 config's) are ignored; anything else is one message naming both choices."""
    from gpt2.config import PRESETS

    assert GPT2Config.from_name_or_path("gpt2-tiny") == GPT2Config.from_preset("gpt2-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 3, "n_embd": 48, "n_head": 4,
                                                      "model_type": "gpt2", "resid_pdrop": 0.1}))
    for name in (tmp_path, tmp_path / "config.json"):
        config = GPT2Config.from_name_or_path(name)
        assert (config.n_layer, config.n_embd, config.n_head, config.dropout) == (3, 48, 4, 0.0)
    with pytest.raises(ValueError, match=f"neither a preset \\({', '.join(PRESETS)}\\) nor a config.json"):
        GPT2Config.from_name_or_path("gpt2-huge")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT2Config.from_name_or_path(tmp_path / "bad.json")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_gradient_checkpointing_gives_the_same_gradients_bit_for_bit(dropout, attn_impl):
    """Recomputing each block in the backward pass (non-reentrant, RNG state restored) changes no
    bit of the loss or of any gradient, dropout included; it recomputes exactly once per block, and
    not at all in eval, under no_grad or while decoding."""
    torch.manual_seed(0)
    plain = GPT2(tiny_config(dropout=dropout, n_layer=3, attn_impl=attn_impl))
    recomputing = GPT2(tiny_config(dropout=dropout, n_layer=3, attn_impl=attn_impl))
    recomputing.load_state_dict(plain.state_dict())
    recomputing.gradient_checkpointing_enable()
    ids = torch.randint(0, 97, (3, 17))
    calls = []
    for block in recomputing.transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    losses = []
    for model in (plain, recomputing):
        model.train()
        torch.manual_seed(1)
        loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    assert len(calls) == 2 * 3  # each block: its forward, then its recomputation
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        assert torch.equal(a.grad, b.grad), name
    calls.clear()
    with torch.no_grad():
        recomputing(ids)
    recomputing.eval()
    recomputing(ids, labels=ids).backward()
    assert len(calls) == 2 * 3  # one forward per block each time, no recomputation
