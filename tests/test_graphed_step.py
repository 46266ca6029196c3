"""The training step of --cuda_graphs (gpt2/graphed_step.py) against pretrain.py's eager train_step.

On CPU the step runs uncaptured (capture=False): the same function a CUDA graph captures. It must
update the weights bit for bit as the eager loop does (gradient accumulation, document masking,
a skipped non-finite step, both kernel sets), and read nothing back to the host while it runs,
which is what capture forbids: a dispatch mode fails the test on any op that would sync. The
captured replay itself is checked on a GPU (the requires_cuda tests at the end)."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, GradientAccumulationPlugin
from conftest import expect_input_error, load_script
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2 import GPT2, GPT2Config, optim
from gpt2.documents import WithDocumentIds
from gpt2.graphed_step import GraphedStep, graph_problem, make_capturable

ROOT = Path(__file__).resolve().parent.parent
pretrain = load_script(ROOT / "scripts" / "pretrain.py")

VOCAB, EOT = 61, 0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run(ga: int, kernels: tuple[str, str], seed: int = 3, mixed_precision: str = "no"):
    """What pretrain.train_step reads of a Run: a tiny model, its AdamW (fused, as the captured step
    makes it, so both sides run the same optimizer) and an Accelerator as build_accelerator sets it
    for --cuda_graphs."""
    _reset_accelerate()
    accelerator = Accelerator(cpu=DEVICE == "cpu", mixed_precision=mixed_precision,
                              gradient_accumulation_plugin=GradientAccumulationPlugin(
                                  num_steps=ga, sync_with_dataloader=False),
                              kwargs_handlers=[AutocastKwargs(cache_enabled=False)])
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=VOCAB)
    model = GPT2(config).set_kernels(attn_impl=kernels[0], norm_impl=kernels[1])
    optimizer, scheduler = optim.build_optimizer(model, lr=3e-2, weight_decay=0.1, min_lr=1e-3,
                                                 schedule="cosine", total_steps=6, warmup_steps=2)
    make_capturable(optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    args = SimpleNamespace(gradient_accumulation_steps=ga, max_grad_norm=0.5)
    return SimpleNamespace(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                           args=args, graphed=None)


def _steps(n: int, ga: int, documents: bool, seed: int = 0) -> list[list[dict]]:
    """n steps of ga micro-batches (3 rows of 16 tokens), end-of-text tokens scattered in them."""
    generator = torch.Generator().manual_seed(seed)
    collate = WithDocumentIds(EOT, restart_positions=True) if documents else None
    steps = []
    for _ in range(n):
        micro = []
        for _ in range(ga):
            ids = torch.randint(1, VOCAB, (3, 16), generator=generator)
            ids[torch.rand(3, 16, generator=generator) < 0.15] = EOT
            batch = collate([{"input_ids": row} for row in ids]) if collate else {"input_ids": ids}
            micro.append({k: v.to(DEVICE) for k, v in batch.items()})
        steps.append(micro)
    return steps


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value back to the host (a device-to-host sync on a GPU,
    an error inside CUDA graph capture): .item(), bool(), int(), data-dependent shapes."""

    SYNCING = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "unique",
               "_unique2", "repeat_interleave")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            raise AssertionError(f"{func} reads device data on the host inside the step")
        return func(*args, **(kwargs or {}))


def _train(run, steps, graphed: bool, poison_step: int | None = None, no_sync: bool = False):
    """(per-step (loss, tokens, grad norm, applied), final weights) through pretrain.train_step."""
    if graphed:
        run.graphed = GraphedStep(run.model, run.optimizer.optimizer, run.args.max_grad_norm, capture=False)
        if no_sync:
            run.graphed._step = _watched(run.graphed._step)
    poisoned = {"on": False}
    ln_f = run.accelerator.unwrap_model(run.model).transformer.ln_f
    # ln_f returns (normalised, residual); a NaN in the first makes the step's loss NaN
    ln_f.register_forward_hook(lambda m, i, out: (out[0] * float("nan"), *out[1:]) if poisoned["on"] else None)
    history = []
    for i, micro in enumerate(steps):
        poisoned["on"] = i == poison_step
        result = pretrain.train_step(run, micro)
        history.append((float(result.loss), result.tokens, float(result.grad_norm), result.finite))
        run.scheduler.step()
    weights = {k: v.detach().clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}
    return history, weights


def _watched(step):
    def run_without_syncs():
        with NoHostSync():
            return step()
    return run_without_syncs


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _assert_same_training(eager, graphed):
    (eager_history, eager_weights), (graph_history, graph_weights) = eager, graphed
    assert len(graph_history) == len(eager_history)
    for (loss, tokens, norm, applied), (want_loss, want_tokens, want_norm, want_applied) in zip(
            graph_history, eager_history):
        assert (tokens, applied) == (want_tokens, want_applied)
        assert _same(loss, want_loss) and _same(norm, want_norm), ((loss, norm), (want_loss, want_norm))
    assert graph_weights.keys() == eager_weights.keys()
    for name, value in eager_weights.items():
        assert torch.equal(graph_weights[name], value), name


@pytest.mark.parametrize("ga,documents,kernels", [
    (1, False, ("sdpa", "torch")),
    (3, True, ("sdpa", "torch")),
    (2, True, ("triton", "triton")),
])
def test_the_step_is_the_eager_loops_bit_for_bit(ga, documents, kernels):
    steps = _steps(4, ga, documents)
    eager = _train(_run(ga, kernels), steps, graphed=False)
    graphed = _train(_run(ga, kernels), steps, graphed=True, no_sync=True)
    _assert_same_training(eager, graphed)
    assert all(applied for *_, applied in graphed[0])
    initial = _run(ga, kernels).model.state_dict()  # and the updates were applied
    assert all(not torch.equal(initial[name], value) for name, value in graphed[1].items())


def test_a_non_finite_step_is_skipped_on_the_device_as_eager_skips_it():
    steps = _steps(4, 2, documents=False)
    eager = _train(_run(2, ("sdpa", "torch")), steps, graphed=False, poison_step=1)
    graphed = _train(_run(2, ("sdpa", "torch")), steps, graphed=True, poison_step=1, no_sync=True)
    assert [applied for *_, applied in graphed[0]] == [True, False, True, True]
    _assert_same_training(eager, graphed)


def test_the_skipped_step_leaves_adam_state_as_eager_does():
    steps = _steps(3, 1, documents=False)
    runs = {}
    for graphed in (False, True):
        run = _run(1, ("sdpa", "torch"))
        _train(run, steps, graphed=graphed, poison_step=2)
        runs[graphed] = run.optimizer.optimizer.state
    for s_eager, s_graph in zip(runs[False].values(), runs[True].values()):
        assert float(s_eager["step"]) == float(s_graph["step"]) == 2.0
        assert torch.equal(s_eager["exp_avg"], s_graph["exp_avg"])
        assert torch.equal(s_eager["exp_avg_sq"], s_graph["exp_avg_sq"])


def test_the_sync_detector_catches_the_eager_steps_syncs():
    with pytest.raises(AssertionError, match="reads device data"), NoHostSync():
        bool(torch.ones(()) > 0)
    run = _run(1, ("sdpa", "torch"))  # the eager step reads its token count and finiteness back
    with pytest.raises(AssertionError, match="reads device data"), NoHostSync():
        pretrain.train_step(run, _steps(1, 1, documents=False)[0])


def test_out_of_order_document_ids_skip_the_update_and_are_reported():
    run = _run(1, ("sdpa", "torch"))
    micro = _steps(1, 1, documents=True)[0]
    micro[0]["document_ids"][0] = micro[0]["document_ids"][0].flip(0)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.graphed = GraphedStep(run.model, run.optimizer.optimizer, run.args.max_grad_norm, capture=False)
    with pytest.raises(ValueError, match="non-decreasing"):
        pretrain.train_step(run, micro)
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_batches_of_another_shape_are_refused():
    run = _run(1, ("sdpa", "torch"))
    step = GraphedStep(run.model, run.optimizer.optimizer, 1.0, capture=False)
    step(_steps(1, 1, documents=False)[0])
    with pytest.raises(ValueError, match="shapes of its first"):
        step([{"input_ids": torch.zeros(2, 16, dtype=torch.long, device=DEVICE)}])


def test_make_capturable_moves_a_loaded_state_to_the_device_kind_capture_needs():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)  # foreach, its step counts on the CPU
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    make_capturable(optimizer)
    group = optimizer.param_groups[0]
    assert group["fused"] and group["capturable"] and not group["foreach"]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float32 and float(group["lr"]) == \
        pytest.approx(0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    lr = group["lr"]
    optimizer.step()
    scheduler.step()
    assert group["lr"] is lr and float(lr) == pytest.approx(0.05)  # filled in place, the address a graph reads


@pytest.mark.parametrize("device,kw,fragment", [
    ("cpu", {}, "needs a CUDA GPU, and this run is on cpu"),
    ("cuda", {"processes": 2}, "runs one process"),
    ("cuda", {"mixed_precision": "fp16"}, "--mixed_precision bf16"),
    ("cuda", {"compile": True}, "--compile both"),
    ("cuda", {"gradient_checkpointing": True}, "--gradient_checkpointing"),
])
def test_what_capture_cant_do_is_named(device, kw, fragment):
    settings = dict(mixed_precision="bf16", processes=1, compile=False, gradient_checkpointing=False) | kw
    assert fragment in graph_problem(torch.device(device), **settings)
    assert graph_problem(torch.device("cuda"), mixed_precision="bf16", processes=1, compile=False,
                         gradient_checkpointing=False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_pretrain_refuses_cuda_graphs_on_cpu_in_one_line(tmp_path):
    for extra in ([], ["--dry_run"]):
        expect_input_error(pretrain.main, ["--cuda_graphs", "--output_dir", tmp_path / "out", *extra],
                           "--cuda_graphs needs a CUDA GPU", within=10)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".gpt2_suite.lock"]  # nothing of a run


# --------------------------------------------------------------------------- on a GPU: the replay


@pytest.mark.requires_cuda
@pytest.mark.parametrize("kernels", [("sdpa", "torch"), ("triton", "triton")])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_replayed_graph_trains_as_eager(kernels, mixed_precision):
    """Captured and replayed: the same kernels in the same order as the eager loop (the autotuner's
    choices are the process's, shared by both runs), so the losses must agree within the compute
    dtype's rounding at every step, which is the criterion for a loss curve."""
    steps = _steps(6, 2, documents=True)
    eager_history, eager_weights = _train(_run(2, kernels, mixed_precision=mixed_precision), steps, graphed=False)
    run = _run(2, kernels, mixed_precision=mixed_precision)
    run.graphed = GraphedStep(run.model, run.optimizer.optimizer, run.args.max_grad_norm)
    history = []
    for micro in steps:
        result = pretrain.train_step(run, micro)
        history.append((float(result.loss), result.tokens, float(result.grad_norm), result.finite))
        run.scheduler.step()
    assert run.graphed.graph is not None
    weights = run.accelerator.unwrap_model(run.model).state_dict()
    drift = max(float((weights[name] - value).abs().max()) for name, value in eager_weights.items())
    eps = torch.finfo(torch.bfloat16 if mixed_precision == "bf16" else torch.float32).eps
    for (loss, tokens, _, applied), (want_loss, want_tokens, _, want_applied) in zip(history, eager_history):
        assert (tokens, applied) == (want_tokens, want_applied)
        assert loss == pytest.approx(want_loss, rel=4 * eps), (history, eager_history, drift)
