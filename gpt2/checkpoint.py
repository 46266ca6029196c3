"""Training checkpoints and the output directory, independent of how the run is launched.

A checkpoint directory `output_dir/step_{N}` holds what `accelerator.save_state` writes (model,
optimizer, scheduler, RNG states), then MODEL_CONFIG and the tokenizer, then TRAINING_STATE (the
data position and the settings a resume must match), then COMPLETE_MARKER, written last: a
directory without the marker was interrupted mid-save and is never resumed from. load_model reads
a step_N directory as a model, as it reads a Hugging Face format one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

from gpt2.errors import InputError, first_line
from gpt2.files import atomic_write_text, check_writable_dir
from gpt2.tokenizer import SAVED_TOKENIZER_FILES

CHECKPOINT_PREFIX = "step_"
POSITION = ("step", "epoch", "batches_in_epoch")  # where a checkpoint's run stands, in TRAINING_STATE
# What accelerator.save_state must have written for a resume, under any of its names: one file (one
# process group, or FSDP's full state dict), a directory of shards (FSDP's sharded state dict), or
# DeepSpeed's own directory, which holds the optimizer too.
SAVED_STATE = {"model weights": ("model.safetensors", "model.bin", "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0",
                                 "pytorch_model"),
               "optimizer state": ("optimizer.bin", "optimizer_0", "pytorch_model"),
               "learning-rate schedule": ("scheduler.bin",)}
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
    for what, names in SAVED_STATE.items():  # one file per process group, or a sharded (FSDP) directory
        if not any((path / name).exists() for name in names):
            return f"{path / names[0]} is missing (the {what})"
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
    missing = [key for key in POSITION if key not in state] if isinstance(state, dict) else ["step"]
    if missing:
        raise InputError(f"{file} is corrupt (no {missing[0]!r})")
    for key in POSITION:
        if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
            raise InputError(f"{file} is corrupt ({key!r} is {state[key]!r}, not a count)")
    return state


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (--checkpoints_total_limit), and any
    incomplete step_N of ours older than the oldest kept (a deletion cut short, say); returns them.
    The marker goes first, so a deletion cut short leaves an incomplete checkpoint, never one that
    looks complete with files missing."""
    complete = list_checkpoints(output_dir)
    old = complete[:-keep] if keep > 0 else []
    kept = complete[-keep:] if keep > 0 else complete
    if kept:
        oldest_kept, written = _step(kept[0]), _written(Path(output_dir))
        old += [p for p in Path(output_dir).iterdir() if p.name in written and p not in complete
                and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and _step(p) < oldest_kept]
    for path in old:
        remove_completion_marker(path)
        shutil.rmtree(path, ignore_errors=True)
    return sorted(old, key=_step)


def _step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


# What a run of ours writes at the top of its output directory, besides step_N checkpoints. The run
# records each name in MANIFEST just before it first writes it, so that overwriting an output
# directory deletes only what a run of ours wrote there, never a file of the user's beside it.
RUN_FILES = ("config.json", "model.safetensors", *SAVED_TOKENIZER_FILES, "metrics.jsonl", "all_results.json")
MANIFEST = "gpt2_suite_outputs.json"  # {"written": [names]}: what runs of ours wrote in this directory
LOCK_FILE = ".gpt2_suite.lock"  # held (flock) by the run writing here; holds its pid


class OutputDirInUse(InputError):
    """An output directory that already holds a run of ours: to be resumed or overwritten."""


def _written(path: Path) -> set[str]:
    try:
        return set(json.loads((path / MANIFEST).read_text())["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def record_outputs(output_dir: str | Path, *names: str) -> None:
    """Add names (files or directories directly in output_dir) to its manifest, before writing them."""
    path = Path(output_dir)
    written = _written(path)
    if not set(names) <= written:
        atomic_write_text(path / MANIFEST, json.dumps({"written": sorted(written | set(names))}, indent=2) + "\n")


def _is_ours(entry: Path, written: set[str]) -> bool:
    """Written by a run of ours: named in the manifest (the manifest and lock file included), or a
    step_N checkpoint that carries our completion marker and training state. A symbolic link is
    never ours (a run writes none), whatever it points at: deleting through it is not ours to do."""
    if entry.is_symlink():
        return False
    if entry.name in written or entry.name in (MANIFEST, LOCK_FILE):
        return True
    return _is_step(entry) and is_complete_checkpoint(entry)


def check_own_files(output_dir: str | Path) -> None:
    """Where a run keeps its manifest and lock, a plain file or nothing: a folder or a symbolic link
    there is someone else's, which the run must neither write through nor delete (InputError)."""
    for name, what in ((MANIFEST, "the list of files it wrote"), (LOCK_FILE, "its lock")):
        entry = Path(output_dir) / name
        if entry.is_symlink() or (entry.exists() and not entry.is_file()):
            kind = "a symbolic link" if entry.is_symlink() else "a folder"
            raise InputError(f"{entry} is {kind}, where a run keeps {what} in a file of that name; move it, or "
                             f"pick another output directory")


def _is_step(entry: Path) -> bool:
    return bool(re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", entry.name))


def _shown(entries: list[Path]) -> str:
    names = sorted(p.name for p in entries)
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool,
                     will_write: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Refuse an output directory that can't be written or that holds another run (HF's rule: a
    non-empty directory needs resuming or overwriting; OutputDirInUse). With overwrite, what runs of
    ours wrote there is deleted and returned; nothing else is touched, and files of someone else's
    where this run would write (will_write, a step_N) are refused rather than overwritten. A
    directory holding only our manifest and lock (a run that stopped before writing) is empty."""
    path = check_writable_dir(output_dir)
    check_own_files(path)
    entries = [p for p in path.iterdir() if p.name not in (LOCK_FILE, MANIFEST)] if path.is_dir() else []
    if not entries or resuming:
        return []
    written = _written(path)
    if not (path / MANIFEST).exists() and any(_is_step(p) and is_complete_checkpoint(p) for p in entries):
        written = set(RUN_FILES)  # a run of an earlier version, which kept no manifest: its checkpoints say so
    ours = [p for p in entries if _is_ours(p, written)]
    theirs = [p for p in entries if p not in ours]
    if not overwrite:
        if ours:
            extra = f", beside files no run of ours wrote ({_shown(theirs)})" if theirs else ""
            raise OutputDirInUse(f"{path} already holds a run ({_shown(ours)}){extra}")
        raise InputError(f"{path} holds files that no run of ours wrote ({_shown(theirs)}); pick another output "
                         f"directory (these would be left alone, but a run should have a directory of its own)")
    in_the_way = [p for p in theirs if p.name in will_write or _is_step(p)]
    if in_the_way:
        raise InputError(f"{path} holds {_shown(in_the_way)}, which no run of ours wrote, where this run would write; "
                         f"nothing was deleted: move them, or pick another output directory")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (path / MANIFEST).unlink(missing_ok=True)  # what it named is gone; the new run records its own
    return ours


@contextlib.contextmanager
def locked_output_dir(output_dir: str | Path):
    """An exclusive lock on output_dir (created if need be) while the body runs: an OS file lock,
    which the OS also releases when the process dies, however it dies, so a killed run never leaves
    the directory locked. A second run meanwhile gets InputError naming the first one's pid."""
    import fcntl

    path = check_writable_dir(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    check_own_files(path)
    # O_NOFOLLOW: a link put there after the check still isn't followed (the open fails instead)
    with os.fdopen(os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise InputError(f"{path} is in use by another run (pid {holder}); wait for it to end, or pick "
                             f"another output directory") from None
        except OSError as err:  # a filesystem without locks (some NFS, Lustre, FUSE mounts): run unlocked
            warnings.warn(f"{path}: no lock against a second run here ({err.strerror})", stacklevel=3)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield path  # closing the file at the end releases the lock


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the rows after `step` from a metrics.jsonl (a resumed run logs those steps again);
    returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
    return len(lines) - len(kept)


def _row_step(line: str) -> int | None:
    """A metrics.jsonl row's step; None for a torn or garbled row (the run was killed mid-write)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step", 0) if isinstance(row, dict) else None


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
