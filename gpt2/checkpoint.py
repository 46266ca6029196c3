"""Training checkpoints and the output directory, independent of how the run is launched.

A checkpoint directory `output_dir/step_{N}` holds what `accelerator.save_state` writes (model,
optimizer, scheduler, RNG states), then MODEL_CONFIG and the tokenizer, then TRAINING_STATE (the
data position and the settings a resume must match), then COMPLETE_MARKER, written last: a
directory without the marker was interrupted mid-save and is never resumed from. load_model reads
a step_N directory as a model, as it reads a Hugging Face format one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from gpt2.errors import InputError, first_line
from gpt2.files import atomic_write_text

CHECKPOINT_PREFIX = "step_"
TRAINING_STATE = "training_state.json"
COMPLETE_MARKER = "checkpoint_complete"
MODEL_CONFIG = "model_config.json"  # the architecture, so that a checkpoint's model loads on its own


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
        raise InputError(f"no complete, readable checkpoint in {output_dir}{found}")
    path = Path(resume_from)
    if not path.is_dir():
        raise InputError("no such directory")
    if not is_complete_checkpoint(path):
        inside = sorted(p.name for p in path.iterdir())[:8]
        nested = list_checkpoints(path)
        hint = f"; did you mean {nested[-1]} (or 'latest')?" if nested else ""
        raise InputError(f"not a complete checkpoint (no {COMPLETE_MARKER}; it holds {inside}){hint}")
    problem = checkpoint_problem(path, world_size)
    if problem is not None:
        raise InputError(problem)
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


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (--checkpoints_total_limit); returns them."""
    old = list_checkpoints(output_dir)[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


RUN_OUTPUTS = ("metrics.jsonl", "all_results.json")  # besides step_N: what a run writes and a new run must not mix


class OutputDirInUse(InputError):
    """An output directory that already holds files: another run's, to be resumed or overwritten."""


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> list[Path]:
    """Refuse an output directory that can't be written or that holds another run (HF's rule: a
    non-empty directory needs resuming or overwriting; OutputDirInUse). With overwrite, the earlier
    run's checkpoints and logs are deleted (nothing else) and returned."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a directory")
    existing = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing} is not writable")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries or resuming:
        return []
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirInUse(f"{path} already holds a run ({shown})")
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
        raise InputError("can't resume exactly with different settings (" + "; ".join(changed) + ")")
