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
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from gpt2.errors import InputError, first_line

CHECKPOINT_PREFIX = "step_"
TRAINING_STATE = "training_state.json"
COMPLETE_MARKER = "checkpoint_complete"
MODEL_CONFIG = "model_config.json"  # the architecture, so that a checkpoint's model loads on its own

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


def resolve_checkpoint(resume_from: str, output_dir: str | Path, world_size: int = 1) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, and what was passed over on the way. "latest" is the newest
    complete checkpoint in output_dir whose files are readable: a corrupt one is passed over (and
    named) for the one before it. A path must be a complete, readable checkpoint. Raises
    InputError saying what is there instead."""
    if resume_from == "latest":
        passed_over = []
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path, world_size)
            if problem is None:
                return path, passed_over
            passed_over.append(problem)
        found = f" ({'; '.join(passed_over)})" if passed_over else ""
        raise InputError(f"--resume_from_checkpoint latest: no complete, readable checkpoint in {output_dir}{found}")
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
    problem = checkpoint_problem(path, world_size)
    if problem is not None:
        raise InputError(f"--resume_from_checkpoint {path}: {problem}")
    return path, []


def checkpoint_problem(path: Path, world_size: int) -> str | None:
    """Why a complete checkpoint can't be resumed from (a file missing, truncated or corrupt), or
    None. Reads headers, not the tensors: safetensors headers, the zip directory at the end of each
    torch.save file (a truncated one has none), the JSON files, and one RNG file per process."""
    from safetensors import safe_open

    try:
        read_training_state(path)
    except InputError as err:
        return str(err)
    for rank in range(world_size):
        if not (path / f"random_states_{rank}.pkl").is_file():
            return f"{path / f'random_states_{rank}.pkl'} is missing (the RNG state of process {rank})"
    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                return f"{file} is truncated or corrupt ({first_line(err)})"
        elif file.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(file):
            return f"{file} is truncated or corrupt (not a complete torch.save file)"
        elif file.name == "tokenizer.json":
            try:
                json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                return f"{file} is corrupt ({first_line(err)})"
    return None


def save_model_config(path: str | Path, config) -> None:
    """The model's architecture beside save_state's model.safetensors (not named config.json: the
    weights there are in our layout, not in the Hugging Face one that config.json promises)."""
    from gpt2.hf import config_to_json

    atomic_write_text(Path(path) / MODEL_CONFIG, json.dumps(config_to_json(config), indent=2) + "\n")


def load_model(path_or_name: str | os.PathLike):
    """A GPT2 from a step_N training checkpoint, or else (GPT2.from_pretrained) from a Hugging Face
    format directory or Hub name: what --model_name_or_path accepts in every script."""
    from safetensors.torch import load_file

    from gpt2.hf import config_from_json
    from gpt2.model import GPT2

    path = Path(path_or_name)
    if not (path / MODEL_CONFIG).is_file():
        return GPT2.from_pretrained(path_or_name)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{path}: a checkpoint without model.safetensors (sharded, FSDP?); evaluate the final "
                         f"model in the output directory instead")
    try:
        config = config_from_json(json.loads((path / MODEL_CONFIG).read_text()), str(path))
        state = load_file(weights)
    except Exception as err:  # noqa: BLE001 - json and safetensors raise their own types for corrupt files
        raise InputError(f"{path}: {MODEL_CONFIG} or model.safetensors is unreadable or corrupt "
                         f"({first_line(err)})") from None
    model = GPT2(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to wte, saved once
        raise InputError(f"{weights}: tensors don't match {MODEL_CONFIG} (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return model


def write_training_state(path: str | Path, state: dict) -> None:
    """The training position and run settings (written atomically), then the completion marker, last."""
    path = Path(path)
    atomic_write_text(path / TRAINING_STATE, json.dumps(state, indent=2) + "\n")
    (path / COMPLETE_MARKER).write_text("ok\n")


def remove_completion_marker(path: str | Path) -> None:
    (Path(path) / COMPLETE_MARKER).unlink(missing_ok=True)


def read_training_state(path: str | Path) -> dict:
    """The checkpoint's training state; InputError naming the file when it is missing or garbled."""
    file = Path(path) / TRAINING_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{file} is unreadable or corrupt ({first_line(err)})") from None
    missing = [key for key in ("step", "epoch", "batches_in_epoch") if key not in state] if isinstance(state, dict) \
        else ["step"]
    if missing:
        raise InputError(f"{file} is corrupt (no {missing[0]!r})")
    return state


def atomic_write_text(path: Path, text: str) -> None:
    """Write a temporary file beside path, then rename it over path: a crash leaves the old file or
    the new one, never half of one (and a stale temporary that remove_stale_temporaries finds)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries an interrupted atomic write left in directory (".NAME.tmp" here, and
    the ".NAME.XXXXXXXX" files of gpt2.hf's writes); returns what was removed."""
    directory = Path(directory)
    stale = [p for p in directory.glob(".*") if p.is_file() and p.name.count(".") >= 2
             and (p.name.endswith(".tmp") or p.name.startswith((".model.safetensors.", ".config.json.")))]
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (--checkpoints_total_limit); returns them."""
    old = list_checkpoints(output_dir)[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


# --------------------------------------------------------------------------- output directory and resume

RUN_OUTPUTS = ("metrics.jsonl", "all_results.json")  # besides step_N: what a run writes and a new run must not mix


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> list[Path]:
    """Refuse an output directory that can't be written or that holds another run (HF's rule: a
    non-empty directory needs --resume_from_checkpoint or --overwrite_output_dir). With overwrite,
    the earlier run's checkpoints and logs are deleted (nothing else) and returned."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"--output_dir {path} is a file, not a directory; pass another --output_dir")
    existing = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output_dir {path}: {existing} is not writable; pass a writable --output_dir")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries or resuming:
        return []
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise InputError(
            f"--output_dir {path} already holds a run ({shown}); pass --resume_from_checkpoint latest to continue "
            f"it, --overwrite_output_dir to start afresh there, or another --output_dir"
        )
    removed = [p for p in path.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) or p.name in RUN_OUTPUTS]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the rows after `step` from a metrics.jsonl (a resumed run logs those steps again);
    returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


# Settings a resumed run must share with the checkpoint: anything else changes which examples land
# in which batch (or which random numbers are drawn), and the "same batches" promise breaks.
RESUME_INVARIANTS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps", "block_size",
                     "seed", "data")


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
