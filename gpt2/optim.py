"""The optimizer and its learning-rate schedule: AdamW with weight decay on matrices only, and a
warmup-then-decay multiplier by transformers' get_scheduler names and formulas (without
transformers at run time). Nothing here knows how the run is launched."""

from __future__ import annotations

import math

import torch

from gpt2.errors import InputError

BETAS = (0.9, 0.95)  # GPT-3's AdamW betas, as nanoGPT and llm.c train GPT-2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (Linear and embedding weights), none on biases and
    LayerNorm gains, whose scale is not a capacity to regularise. Tied weights appear once."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied tensor once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# The names of transformers' get_scheduler (and its formulas), without transformers at run time.
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
             "inverse_sqrt", "warmup_stable_decay")


class WarmupDecay:
    """LR multiplier for LambdaLR, by transformers' get_scheduler names and formulas, with two
    differences: warmup starts at 1 / warmup_steps, not 0, so the first step already learns; and
    every decay ends at min_lr_ratio (transformers' polynomial lr_end), not at 0.

    After a linear warmup over warmup_steps (none for "constant"), with progress p from 0 to 1 over
    the remaining steps: linear 1 - p; cosine (1 + cos(pi p)) / 2; cosine_with_restarts the same
    over each of `cycles` cycles; polynomial (1 - p)^power; inverse_sqrt sqrt(warmup / step);
    warmup_stable_decay 1 until its last decay_steps (a fifth of the steps after warmup), then a
    cosine; constant(_with_warmup) 1. Past total_steps it stays at min_lr_ratio.

    A class rather than a closure so the scheduler's state_dict (saved with the checkpoint) holds
    its settings as data."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        if kind not in SCHEDULES:
            raise InputError(f"unknown lr_scheduler_type {kind!r}; choose from {SCHEDULES}")
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.min_lr_ratio = min_lr_ratio
        self.cycles, self.power = 1, 1.0  # transformers' defaults for restarts and polynomial
        self.decay_steps = max(1, (total_steps - warmup_steps) // 5)  # warmup_stable_decay's cosine tail

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first step already gets a nonzero LR
        if self.kind == "constant_with_warmup":
            return 1.0
        if self.kind == "inverse_sqrt":
            return max(self.min_lr_ratio, math.sqrt(max(1, self.warmup_steps) / max(1, step)))
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * self._decay(step, progress)

    def _decay(self, step: int, progress: float) -> float:
        if self.kind == "linear":
            return 1.0 - progress
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "cosine_with_restarts":
            return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0)))
        if self.kind == "polynomial":
            return (1.0 - progress) ** self.power
        stable_end = self.total_steps - self.decay_steps  # warmup_stable_decay
        tail = min(1.0, max(0.0, (step - stable_end) / self.decay_steps))
        return 0.5 * (1.0 + math.cos(math.pi * tail))


def lr_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float = 0.0):
    """A LambdaLR stepping once per optimizer step, from lr after warmup down to min_lr."""
    if min_lr > lr:
        raise InputError(f"min_lr ({min_lr}) is larger than the learning rate ({lr})")
    ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(kind, warmup_steps, total_steps, ratio))


def set_peak_lr(scheduler, lr: float, min_lr: float) -> None:
    """A new peak learning rate for the rest of a resumed schedule: its shape (warmup, decay, the
    step reached) stays, and every learning rate from now on is scaled to the new peak and min_lr.
    scheduler is the LambdaLR of lr_scheduler (Accelerate's wrapper holds it as .scheduler)."""
    scheduler = getattr(scheduler, "scheduler", scheduler)
    decay = scheduler.lr_lambdas[0]
    decay.min_lr_ratio = min_lr / lr
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * decay(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def default_warmup_steps(total_steps: int) -> int:
    """5% of the steps (at least one), when no warmup is given."""
    return max(1, total_steps // 20)


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, min_lr: float, schedule: str,
                    total_steps: int, warmup_steps: int | None = None, device: torch.device | None = None,
                    betas: tuple[float, float] = BETAS):
    """(AdamW, its LambdaLR): weight decay on matrices only, warmup (default: 5% of the steps) then
    the named decay down to min_lr. The fused AdamW where the device has one (not on CPU)."""
    warmup = warmup_steps if warmup_steps is not None else default_warmup_steps(total_steps)
    fused = False if device is not None and device.type == "cpu" else None
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)
    return optimizer, lr_scheduler(optimizer, schedule, warmup, total_steps, lr, min_lr)
