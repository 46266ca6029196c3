"""Training helpers that don't depend on how the run is launched: the optimizer's parameter groups,
the learning-rate schedule, model FLOPs utilisation, and finding / validating checkpoints.

A checkpoint directory `output_dir/step_{N}` holds what `accelerator.save_state` writes (model,
optimizer, scheduler, RNG states), then TRAINING_STATE (the data position and the settings a resume
must match), then COMPLETE_MARKER, written last: a directory without the marker was interrupted
mid-save and is never resumed from.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from gpt2.errors import InputError

CHECKPOINT_PREFIX = "step_"
TRAINING_STATE = "training_state.json"
COMPLETE_MARKER = "checkpoint_complete"

# --------------------------------------------------------------------------- optimizer


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


# --------------------------------------------------------------------------- learning-rate schedule

SCHEDULES = ("cosine", "linear", "constant")


class WarmupDecay:
    """LR multiplier for LambdaLR: linear warmup from 0 over warmup_steps, then cosine / linear decay
    (or constant) from 1 down to min_lr_ratio at total_steps, flat after that.

    A class rather than a closure so the scheduler's state_dict (saved with the checkpoint) holds
    its settings as data."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        if kind not in SCHEDULES:
            raise InputError(f"unknown lr_scheduler_type {kind!r}; choose from {SCHEDULES}")
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first step already gets a nonzero LR
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay


def lr_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float = 0.0):
    """A LambdaLR stepping once per optimizer step, from lr after warmup down to min_lr."""
    if min_lr > lr:
        raise InputError(f"min_lr ({min_lr}) is larger than the learning rate ({lr})")
    ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(kind, warmup_steps, total_steps, ratio))


# --------------------------------------------------------------------------- model FLOPs utilisation

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


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / TRAINING_STATE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step_{N} checkpoints under output_dir, oldest first; interrupted saves are skipped."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir() and is_complete_checkpoint(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """The checkpoint directory to resume from: a path, or "latest" (newest complete one in
    output_dir). Raises InputError saying what is there instead."""
    if resume_from == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise InputError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return path
    path = Path(resume_from)
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {path}: no such directory")
    if not is_complete_checkpoint(path):
        inside = sorted(p.name for p in path.iterdir())[:8]
        nested = list_checkpoints(path)
        hint = f"; did you mean {nested[-1]} (or 'latest')?" if nested else ""
        raise InputError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {COMPLETE_MARKER}; "
            f"it holds {inside}){hint}"
        )
    return path


def write_training_state(path: str | Path, state: dict) -> None:
    """The training position and run settings, then the completion marker, last."""
    path = Path(path)
    (path / TRAINING_STATE).write_text(json.dumps(state, indent=2) + "\n")
    (path / COMPLETE_MARKER).write_text("ok\n")


def remove_completion_marker(path: str | Path) -> None:
    (Path(path) / COMPLETE_MARKER).unlink(missing_ok=True)


def read_training_state(path: str | Path) -> dict:
    return json.loads((Path(path) / TRAINING_STATE).read_text())


# Settings a resumed run must share with the checkpoint: anything else changes which examples land
# in which batch, and the "same batches" promise breaks.
RESUME_INVARIANTS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps", "block_size")


def check_resume_compatible(saved: dict, current: dict) -> None:
    """Raise InputError listing every setting that differs from the checkpoint's."""
    changed = [
        f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in RESUME_INVARIANTS
        if key in saved and saved.get(key) != current.get(key)
    ]
    if changed:
        raise InputError(
            "can't resume exactly with different settings (" + "; ".join(changed) + "). Run with the "
            "checkpoint's settings, or start a new run from its weights with --model_name_or_path."
        )
