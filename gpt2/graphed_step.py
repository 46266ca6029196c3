"""The training step as one CUDA graph: captured once, then replayed every step.

In eager mode the host launches every kernel of a step, thousands for GPT-2 124M, and on a fast
GPU it, not the GPU, sets the pace. Replaying a CUDA graph launches the whole step at once: the
host copies the next batch into the graph's input buffers and launches one graph. What the step
captured here is: the forward and backward of every micro-batch of gradient accumulation, the
token count, the gradient-norm clipping and the fused AdamW update, the same arithmetic in the same
order as scripts/pretrain.py's eager train_step, so the runs agree.

Capture forbids the host from waiting on the GPU inside the step, and fixes every address:
- nothing is read back inside: the token count, loss and gradient norm stay on the device, and a
  non-finite loss or gradient norm skips the update inside fused AdamW (its found_inf flag, which
  GradScaler sets for fp16), in place of eager's Python branch; the kernels' own checks that would
  read device data (the document order) are folded into that flag and reported after the replay;
- the inputs are buffers the graph reads; the gradients are allocated by the captured backward
  (None before capture) and stay the graph's; the learning rate is a device tensor the scheduler
  fills in place;
- every kernel is compiled and autotuned before capture, by a few eager steps (on a side stream,
  as capture requires) on the first batch; then the weights, optimizer state and CUDA RNG are put
  back as they were, so the warm-up steps leave no trace and the run is the eager run's.

What a replay returns is copied out of the graph's buffers (the next replay overwrites them).
Outside the graph the loop reads the loss and whether the update was applied once per step; that
sync waits for work already queued and costs the host about as much as the replay launch.

Depends on torch and gpt2's loss convention only. Needs one process on one CUDA device: bf16
autocast or fp32 (not fp16's loss scaler, which decides on the host), no recomputation of
activations (checkpointing saves the RNG state on the host), no DDP or FSDP yet.
``GraphedStep(..., capture=False)`` runs the same step eagerly, on any device: the CPU tests use it
to prove the step equals the eager loop's and reads nothing back.
"""

from __future__ import annotations

import torch

from gpt2.loss import IGNORE_INDEX

WARMUP_STEPS = 3  # eager steps before capture: the autotuner's runs, lazy allocations, cuBLAS handles


def graph_problem(device: torch.device, *, mixed_precision: str, processes: int, compile: bool,
                  gradient_checkpointing: bool) -> str | None:
    """Why the step can't be captured on this run, as the rest of "--cuda_graphs ..." (None: it can)."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, and this run is on {device.type}: drop --cuda_graphs"
    if processes > 1:
        return (f"runs one process, and this run has {processes}: capturing DDP's all-reduce is not "
                "supported yet, so drop --cuda_graphs or run on one GPU")
    if mixed_precision == "fp16":
        return "can't capture fp16's loss scaler (it decides on the host each step): use --mixed_precision bf16"
    if compile:
        return "and --compile both remove the host from the step: give one of them"
    if gradient_checkpointing:
        return ("can't capture recomputed blocks (checkpointing saves the RNG state on the host): drop "
                "--gradient_checkpointing or --cuda_graphs")
    return None


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """The torch AdamW made fit for capture: fused (its found_inf flag skips an update on the device),
    capturable, the learning rate a tensor on the parameters' device (the scheduler fills it in place),
    the step counts there too. Whatever a loaded state_dict set, as load_state_dict replaces groups."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group.update(fused=True, foreach=False, capturable=True)
        if not isinstance(group["lr"], torch.Tensor) or group["lr"].device != device:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


class GraphedStep:
    """One optimizer step over a step's micro-batches (dicts of input_ids and the model's document
    arguments), captured as a CUDA graph at the first call and replayed at every call after.

    model(input_ids, labels=input_ids, reduction="sum", **documents) must return the summed next-token
    loss; optimizer is a torch AdamW (not Accelerate's wrapper). Each call returns device tensors,
    copies: (mean loss over the step's tokens, token count, gradient norm before clipping, 1 where
    the update was skipped: a non-finite loss or norm, or document ids out of order; True where they
    were out of order)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 capture: bool = True):
        self.model, self.optimizer, self.max_grad_norm, self.capture = model, optimizer, max_grad_norm, capture
        self.params = list(model.parameters())  # in the model's order, as eager clips them
        self.inputs: list[dict] | None = None  # the buffers the graph reads, set at the first call
        self.graph = None
        self.outputs = None

    def __call__(self, micro_batches: list[dict]) -> tuple[torch.Tensor, ...]:
        if self.inputs is None:
            self._set_up(micro_batches)
        self._load(micro_batches)
        if self.capture and self.graph is None:  # the first call: warm up on these batches, capture
            self.graph, self.outputs = self._captured()
        if self.graph is None:  # capture=False: the same step, run eagerly
            outputs = tuple(t.clone() for t in self._step())
            self.optimizer.zero_grad(set_to_none=True)  # as each replay's first backward overwrites them
            return outputs
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)

    def _set_up(self, micro_batches: list[dict]) -> None:
        device = self.params[0].device
        make_capturable(self.optimizer)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.optimizer.found_inf = self.found_inf  # read by the fused step; 1 skips the update
        self.inputs = [{name: torch.empty_like(value, device=device) for name, value in batch.items()}
                       for batch in micro_batches]
        self.shapes = [{name: value.shape for name, value in batch.items()} for batch in self.inputs]

    def _load(self, micro_batches: list[dict]) -> None:
        """Copy the batches into the input buffers (shapes fixed at the first call)."""
        if [{name: value.shape for name, value in batch.items()} for batch in micro_batches] != self.shapes:
            raise ValueError(f"the captured step takes micro-batches of the shapes of its first: {self.shapes}")
        for buffers, batch in zip(self.inputs, micro_batches):
            for name, value in batch.items():
                buffers[name].copy_(value, non_blocking=True)

    def _step(self) -> tuple[torch.Tensor, ...]:
        """The step itself, reading nothing back to the host: the same arithmetic, in the same order,
        as the eager train_step's."""
        from gpt2_kernels.utils import without_host_checks

        ga = len(self.inputs)
        step_tokens = sum((b["input_ids"][:, 1:] != IGNORE_INDEX).sum() for b in self.inputs)
        step_nll = torch.zeros((), device=step_tokens.device)
        out_of_order = torch.zeros((), dtype=torch.bool, device=step_tokens.device)
        with without_host_checks():  # the document order is checked here, on the device
            for batch in self.inputs:
                input_ids, documents = batch["input_ids"], {k: v for k, v in batch.items() if k != "input_ids"}
                if "document_ids" in documents:
                    ids = documents["document_ids"]
                    out_of_order |= (ids[:, 1:] < ids[:, :-1]).any()
                nll_sum = self.model(input_ids, labels=input_ids, reduction="sum", **documents)
                # As eager: accelerator.backward divides by ga what train_step multiplied by it.
                (nll_sum * ga / step_tokens / ga).backward()
                step_nll += nll_sum.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        loss = step_nll / step_tokens
        self.found_inf.copy_(~(torch.isfinite(loss) & torch.isfinite(grad_norm)) | out_of_order)
        self.optimizer.step()
        return loss, step_tokens, grad_norm, self.found_inf, out_of_order

    def _captured(self):
        """(graph, its outputs): warm up on a side stream, capture, then undo the warm-up."""
        saved = _Snapshot(self.params, self.optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
                self.optimizer.zero_grad(set_to_none=True)  # so the captured backward allocates them
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # On the warm-up's stream, where the backward's AccumulateGrad nodes were made. thread_local:
        # a DataLoader's pin-memory thread may call CUDA while this thread captures.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            outputs = self._step()
        saved.restore()
        return graph, outputs


class _Snapshot:
    """The weights, optimizer state and CUDA RNG as they are now, to put back after the warm-up.
    State the optimizer doesn't have yet (its first step) is put back as that first step finds it:
    zeros (the moments and the step count), which is how AdamW starts."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [(p, p.detach().clone()) for p in params]
        self.state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                      for p in params if p in optimizer.state}
        self.rng = torch.cuda.get_rng_state() if params[0].is_cuda else None

    @torch.no_grad()
    def restore(self) -> None:
        for param, value in self.params:
            param.copy_(value)
            saved = self.state.get(id(param), {})
            for name, tensor in self.optimizer.state.get(param, {}).items():
                if name in saved:
                    tensor.copy_(saved[name])
                elif torch.is_tensor(tensor):
                    tensor.zero_()
        if self.rng is not None:
            torch.cuda.set_rng_state(self.rng)

