"""How fast a run goes: tokens per second over a window of steps, model FLOPs utilisation (MFU)
against the device's peak, and peak memory. The model's FLOPs per token live with the model
(GPT2.flops_per_token); the peak is looked up by the GPU's name, never assumed."""

from __future__ import annotations

import contextlib
import re
import time

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets.
# Matched against torch.cuda.get_device_name() in order, so specific names come before general ones.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM4 and PCIe alike
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121e12),
    ("A10", 125e12),  # not the A10G, whose peak NVIDIA doesn't publish: that one reads n/a
    ("RTX 4090", 165.2e12),  # with fp32 accumulation, as PyTorch runs it
    ("V100-SXM2", 125e12),  # fp16 only: V100 has no bf16
    ("V100-PCIE", 112e12),
    ("T4", 65e12),  # fp16 only
    ("MI300X", 1307.4e12),
    ("MI250X", 383e12),
]


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16/fp16 peak of a GPU by its name, or None when unknown (a CPU included)."""
    if not device_name:
        return None
    for name, flops in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![0-9A-Za-z])", device_name):
            return flops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s over the device's peak; None if the
    peak is unknown, never a guess."""
    if not peak:
        return None
    return tokens_per_second_per_device * flops_per_token / peak


def peak_memory(device: torch.device) -> str:
    """The peak so far: allocated GPU memory on CUDA, the process's resident set elsewhere."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


class ThroughputWindow:
    """Training loss and steps per second over the steps since the last log line; time spent in
    evaluation and checkpointing (inside paused()) doesn't count."""

    def __init__(self):
        self.start = time.perf_counter()
        self.nll, self.tokens, self.steps, self.paused_s = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, applied: bool = True) -> None:
        """One step: its mean loss over its tokens; a skipped update counts as a step, its loss does not."""
        self.steps += 1
        if applied:
            self.nll += loss * tokens
            self.tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - start

    def close(self) -> tuple[float | None, float]:
        """(token-weighted mean loss, None if every update was skipped; steps per second) of the
        window, and start the next one."""
        now = time.perf_counter()
        loss = self.nll / self.tokens if self.tokens else None
        steps_per_s = self.steps / max(now - self.start - self.paused_s, 1e-9)
        self.__init__()
        self.start = now
        return loss, steps_per_s


# Bytes a transformer block keeps for backward per token and per unit of width, in 16-bit
# activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models"), 34 s b h without the 5 a s^2 b of the attention scores, which flash attention never keeps.
BLOCK_ACTIVATION_BYTES = 34


def estimate_memory(*, params: int, n_layer: int, n_embd: int, vocab_size: int, micro_batch_tokens: int,
                    activation_bytes: int, recompute: bool, shards: int = 1) -> dict[str, float]:
    """Bytes per device of one training step, by part (an estimate, for planning):

    state        fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter,
                 divided among `shards` processes under FSDP;
    activations  what the blocks keep for backward: 34 x width bytes per token per block at 2-byte
                 activations (twice that in fp32), or with recomputation each block's two inputs
                 (the branch output in the activations' dtype, the residual stream in fp32) plus
                 one block recomputed at a time;
    loss         one chunk of fp32 logits and its gradient (gpt2/loss.py: at most 2**26 elements),
                 and the LM head's fp32 gradient, which the fused loss computes in the forward pass.
    """
    per_block = BLOCK_ACTIVATION_BYTES * n_embd * activation_bytes / 2 * micro_batch_tokens
    if recompute:
        activations = n_layer * n_embd * (activation_bytes + 4) * micro_batch_tokens + per_block
    else:
        activations = n_layer * per_block
    chunk_rows = min(micro_batch_tokens, max(1, 2**26 // vocab_size))
    loss = 4 * (2 * chunk_rows + n_embd) * vocab_size
    return {"state": 16 * params / shards, "activations": activations, "loss": loss}
