"""A tiny GPT-2 with our Triton kernels, end to end: it trains like PyTorch's SDPA and F.layer_norm
(convergence), compiles into one graph forward and backward, counts FLOPs, and exports.

Convergence: a tiny GPT-2 trained a few steps with our Triton kernels (attention and fused
add+LayerNorm) follows the same loss curve as with PyTorch's SDPA and F.layer_norm.

Both runs start from identical weights and train on identical data in float32. The kernels agree
with float64 to ~1e-6 relative (tests/test_attention.py, tests/test_layer_norm.py), as PyTorch
does, so the two runs differ only by fp32 rounding: measured, the losses agree to 1 fp32 ulp
(2.4e-7 on a loss near 4) over these steps. Tolerances:
* losses, step by step: 2e-5 absolute, ~40 ulps of the loss, headroom for other platforms'
  reduction orders (a GPU run of this test); a LayerNorm input gradient with 1% noise moves the
  loss by 2.5e-4 after one step, 10x over it.
* every parameter's gradient at step 0: max abs difference <= 2e-5 x that gradient's max abs
  (measured: 4e-7). This is the sharper end-to-end check: at GPT-2 initialisation attention is
  nearly uniform, so even a 1%-noisy dK barely moves the loss (2e-6 after 5 steps; AdamW's update
  is scale-free), but it shows in c_attn's gradient at once (measured 2.6e-4, 13x the bound).
"""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils.flop_counter import FlopCounterMode

import gpt2_kernels
from gpt2 import GPT2, GPT2Config
from gpt2.registry import triton_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 5
LOSS_ATOL = 2e-5
GRAD_RTOL = 2e-5

pytestmark = pytest.mark.skipif(triton_unavailable_reason() is not None, reason=str(triton_unavailable_reason()))


def _train(model, input_ids, steps):
    """AdamW steps on one batch; returns the losses and the first step's gradients."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses, first_grads = [], None
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads


def test_triton_kernels_train_like_torch(monkeypatch):
    # head_dim 32; T = 40 is not a multiple of any tile, so every kernel sees partial blocks; two
    # query heads share one K/V head, so dK/dV sum over query heads inside the kernel.
    config = GPT2Config(
        vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=2, n_kv_head=1,
        attn_impl="sdpa", norm_impl="torch",
    )
    reference = GPT2(config).to(DEVICE)
    ours = copy.deepcopy(reference).set_kernels(attn_impl="triton", norm_impl="triton")
    assert reference.config.attn_impl == "sdpa" and ours.config.attn_impl == "triton"
    # One batch, seen every step: the models memorise it, so the loss falls fast and the two
    # trajectories are compared where they move, not on a plateau.
    input_ids = torch.randint(0, config.vocab_size, (2, 40), device=DEVICE)

    # Spy on the kernels, to be sure the triton run really goes through them: every LayerNorm after
    # the first is the fused add+LayerNorm (2 per block), attention once per block.
    calls = {"flash_attention": 0, "layer_norm": 0, "add_layer_norm": 0}
    for name in calls:
        original = getattr(gpt2_kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(gpt2_kernels, name, spy)

    reference_losses, reference_grads = _train(reference, input_ids, STEPS)
    our_losses, our_grads = _train(ours, input_ids, STEPS)

    n_layer = config.n_layer
    assert calls == {"flash_attention": STEPS * n_layer, "layer_norm": STEPS, "add_layer_norm": STEPS * 2 * n_layer}
    assert our_losses[-1] < our_losses[0] - 0.2, f"not training: {our_losses}"
    for step, (ref_loss, our_loss) in enumerate(zip(reference_losses, our_losses)):
        assert abs(ref_loss - our_loss) <= LOSS_ATOL, (
            f"step {step}: triton loss {our_loss:.6f} vs torch {ref_loss:.6f}\n"
            f"triton: {our_losses}\ntorch:  {reference_losses}"
        )
    for name, want in reference_grads.items():
        err = (our_grads[name] - want).abs().max().item()
        assert err <= GRAD_RTOL * want.abs().max().item() + 1e-12, f"step-0 gradient of {name}: max error {err:.2e}"


def _tiny_triton_model(**overrides):
    values = dict(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                  attn_impl="triton", norm_impl="triton")
    return GPT2(GPT2Config(**{**values, **overrides})).to(DEVICE)


def _recording_backend(graphs: list):
    """AOTAutograd with no compiler (as backend="aot_eager"), keeping the forward and backward graphs
    it captures: the aten-level graphs in which our ops must appear, as opaque nodes."""

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _our_ops(graph_module) -> collections.Counter:
    return collections.Counter(
        node.target.name() for node in graph_module.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("gpt2_suite.")
    )


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("t, variant", [
    (17, {}),  # learned positions, every head its own K/V
    (17, dict(n_kv_head=1, position_embedding="rope")),  # T <= 32: the autotune-prune fallback's lengths
    (32, dict(n_kv_head=1, position_embedding="rope")),
    (128, dict(n_kv_head=1, position_embedding="rope")),  # several query and key blocks
], ids=["mha-17", "gqa-rope-17", "gqa-rope-32", "gqa-rope-128"])
def test_compiled_model_is_one_graph_forward_and_backward(fresh_dynamo, t, variant):
    """torch.compile(model, fullgraph=True) of a triton GPT-2 captures the whole forward, and
    AOTAutograd the whole backward, each as one graph holding our ops as opaque nodes (so dynamo
    never traces Triton, nor its interpreter here). The compiled graphs run the same kernels as
    eager mode on the same inputs: loss and every gradient bitwise equal on CPU (on CUDA, within a
    few fp32 ulps, in case a cuBLAS call gets differently laid-out operands)."""
    torch.manual_seed(0)
    model = _tiny_triton_model(**variant)
    input_ids = torch.randint(0, 97, (2, t), device=DEVICE)
    eager_loss = model(input_ids, labels=input_ids)
    eager_loss.backward()
    eager_grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    graphs = []
    compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
    loss = compiled(input_ids, labels=input_ids)
    loss.backward()

    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert len(graphs) == 2, f"{len(graphs)} graphs: expected one forward and one backward"
    n_layer = model.config.n_layer
    assert _our_ops(graphs[0]) == {"gpt2_suite::flash_attention": n_layer, "gpt2_suite::add_layer_norm": 2 * n_layer,
                                   "gpt2_suite::layer_norm": 1}
    assert _our_ops(graphs[1]) == {"gpt2_suite::flash_attention_backward": n_layer,
                                   "gpt2_suite::layer_norm_backward": 2 * n_layer + 1}
    ulps = 0 if DEVICE == "cpu" else 4
    for name, got, want in [("loss", loss, eager_loss)] + [
        (name, p.grad, eager_grads[name]) for name, p in model.named_parameters()
    ]:
        bound = ulps * torch.finfo(want.dtype).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=name)


def test_documents_compile_into_one_graph_and_are_prepared_once(fresh_dynamo, monkeypatch):
    """document_ids through a triton GPT-2: the model builds the document bounds once per forward
    for all its layers (gpt2_kernels.document_bounds, one call), and torch.compile(fullgraph=True)
    still captures one forward and one backward graph with every layer's op, matching eager mode."""
    calls = []
    real = gpt2_kernels.document_bounds
    monkeypatch.setattr(gpt2_kernels, "document_bounds", lambda ids: calls.append(ids) or real(ids))
    torch.manual_seed(0)
    model = _tiny_triton_model(n_layer=3, n_kv_head=1, position_embedding="rope")
    input_ids = torch.randint(0, 97, (2, 40), device=DEVICE)
    document_ids = (torch.arange(40, device=DEVICE) // torch.tensor([[7], [40]], device=DEVICE)).contiguous()
    eager_loss = model(input_ids, labels=input_ids, document_ids=document_ids)
    assert len(calls) == 1
    eager_loss.backward()
    eager_grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    graphs = []
    compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
    loss = compiled(input_ids, labels=input_ids, document_ids=document_ids)
    loss.backward()
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert len(graphs) == 2
    assert _our_ops(graphs[0])["gpt2_suite::flash_attention"] == 3
    assert _our_ops(graphs[1])["gpt2_suite::flash_attention_backward"] == 3
    ulps = 0 if DEVICE == "cpu" else 4
    for name, got, want in [("loss", loss, eager_loss)] + [
        (name, p.grad, eager_grads[name]) for name, p in model.named_parameters()
    ]:
        bound = ulps * torch.finfo(want.dtype).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=name)


def _flops(model, input_ids):
    """FlopCounterMode's totals, (forward, backward), for one training step."""
    with FlopCounterMode(display=False) as forward:
        loss = model(input_ids, labels=input_ids)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def test_flop_counter_counts_triton_attention_as_eager_attention():
    """FlopCounterMode sees our attention (it used to count none of it). Forward, the triton model
    counts exactly what the same model with eager attention counts through its two matmuls per
    layer. Backward, ours follows torch's SDPA formula (the one FlopCounterMode applies to SDPA's
    CUDA kernels), which also counts the recomputation of S = QK^T: 2 B H T^2 D per layer more than
    eager autograd's four matmuls. LayerNorm counts nothing in either (as F.layer_norm)."""
    model = _tiny_triton_model(n_head=4, n_kv_head=2, position_embedding="rope")
    b, t = 2, 20
    input_ids = torch.randint(0, 97, (b, t), device=DEVICE)
    triton_flops = _flops(model, input_ids)
    eager_flops = _flops(model.set_kernels(attn_impl="eager", norm_impl="torch"), input_ids)
    cfg = model.config
    recompute = cfg.n_layer * 2 * b * cfg.n_head * t * t * cfg.head_dim
    assert triton_flops[0] == eager_flops[0] > 0
    assert triton_flops[1] == eager_flops[1] + recompute


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch.export.load's own, in torch 2.13
def test_export_carries_the_ops():
    """torch.export of a triton GPT-2, with a dynamic sequence length, holds our ops as nodes through
    run_decompositions (what AOTInductor starts from) and a save/load round trip; the exported
    program computes what the model computes, at lengths other than the traced one."""
    model = _tiny_triton_model(n_head=4, n_kv_head=2, position_embedding="rope").eval()
    seq_len = torch.export.Dim("seq_len", min=2, max=model.config.n_positions)
    program = torch.export.export(
        model, (torch.randint(0, 97, (2, 20), device=DEVICE),), dynamic_shapes={"input_ids": {1: seq_len}}
    )
    program = program.run_decompositions()
    assert set(_our_ops(program.graph_module)) == {
        "gpt2_suite::flash_attention", "gpt2_suite::add_layer_norm", "gpt2_suite::layer_norm"
    }
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    loaded = torch.export.load(saved).module()
    for t in (20, 33):
        input_ids = torch.randint(0, 97, (2, t), device=DEVICE)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids), model(input_ids)), t


def test_a_training_step_calls_every_op_without_the_dispatcher(monkeypatch):
    """In an eager training step every one of our calls takes the plain-eager route (utils.call_op),
    the LayerNorms with their nn.Parameter weights too: the host cost it saves is a whole step's."""
    from gpt2_kernels import utils

    routes = collections.Counter()
    for name, route in list(utils._EAGER.items()):
        def counted(*args, name=name, route=route):
            routes[name] += 1
            return route(*args)
        monkeypatch.setitem(utils._EAGER, name, counted)
    model = _tiny_triton_model()
    ids = torch.randint(0, 97, (2, 20), device=DEVICE)
    model(ids, labels=ids).backward()
    n = model.config.n_layer
    assert routes == {"flash_attention": n, "flash_attention_backward": n, "layer_norm": 1,
                      "add_layer_norm": 2 * n, "layer_norm_backward": 2 * n + 1}


def test_our_attention_serves_an_eval_model_whatever_its_dropout():
    """Dropout acts in training only, so a config with dropout (HF's gpt2 has 0.1) runs our
    attention in eval mode, giving SDPA's logits; training it with our attention is one clear error."""
    from gpt2.errors import InputError
    from gpt2.registry import NO_TRAINING_DROPOUT

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=97, dropout=0.1)
    model = GPT2(config).to(DEVICE).eval()
    ids = torch.randint(0, config.vocab_size, (2, 17), device=DEVICE)
    with torch.no_grad():
        expected = model(ids)
        got = model.set_kernels(attn_impl="triton")(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 kernels, as in the tests above
    with pytest.raises(InputError, match=NO_TRAINING_DROPOUT):
        model.train()(ids)
