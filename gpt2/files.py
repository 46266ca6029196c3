"""Writing files so that none is ever half written: the one writer every file of ours goes through.

atomic_write writes a temporary file beside the target and renames it over the target, so a crash
(or a full disk) leaves the old file or the new one, never part of one; at worst a stale temporary
remains, which remove_stale_temporaries clears before the directory is written again.
check_output_file says, before any work, whether a path can take that work's result.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from gpt2.errors import InputError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """write(temporary_path), then rename it over path, with a normal file's permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def remove_stale_temporaries(directory: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporaries an interrupted atomic_write left in directory: ".NAME.XXXXXXXX.tmp", and
    the ".NAME.tmp" / ".model.safetensors.XXXXXXXX" / ".config.json.XXXXXXXX" of earlier versions;
    only those of the given file names when names are given (a directory shared with other files).
    Returns what was removed."""
    pattern = re.compile(r"\.(.+?)(\.[A-Za-z0-9_]{6,8})?\.tmp|\.(model\.safetensors|config\.json)\.[A-Za-z0-9_]{6,8}")
    wanted = set(names) if names is not None else None
    stale = []
    for p in Path(directory).glob(".*"):
        match = pattern.fullmatch(p.name)
        if match and p.is_file() and (wanted is None or (match.group(1) or match.group(3)) in wanted):
            stale.append(p)
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Before any work whose result path is to hold: InputError when path is a directory, lies under
    a file, can't be written, or is one of the inputs (a file or a file inside an input directory),
    which writing it would destroy. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a file path")
    for source in inputs:
        source = Path(source)
        files = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
        if any(f.exists() and path.exists() and os.path.samefile(f, path) for f in files):
            raise InputError(f"{path} is one of the inputs ({source}); writing it would destroy it")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise InputError(f"{path} can't be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):  # atomic_write creates its temporary beside the file
        raise InputError(f"{path} can't be written ({existing} is not writable)")
    return path


def check_writable_dir(path: str | os.PathLike) -> Path:
    """A directory this process can create or write into: InputError when path is a file, lies
    under a file, or its nearest existing folder can't be written. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a directory")
    existing = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not existing.is_dir():
        raise InputError(f"{path} can't be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing} is not writable")
    # Permission bits alone don't tell: root passes os.access under /proc and on a read-only file
    # system. Creating (and removing) a folder there does.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as err:
        raise InputError(f"{path} can't be created or written: {existing} refuses a new folder ({err.strerror})") \
            from None
    return path
