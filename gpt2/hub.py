"""Reaching the Hugging Face Hub, or failing fast and clearly when it can't be reached.

huggingface_hub retries a failed request five times with backoff (about 25 s) before it gives
up; a user without a network should hear that within a second or two, with what to do instead.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from gpt2.errors import InputError


class HubError(InputError, OSError):
    """A name that needs the Hub, which can't be reached or doesn't have it."""


# A Hub repository id as huggingface_hub's validate_repo_id accepts one: "gpt2", "openai-community/gpt2".
# Each part starts and ends with a letter, digit or underscore, so ".", "./x" and "../x" are paths.
HUB_ID = re.compile(r"(\w([\w.-]*\w)?/)?\w([\w.-]*\w)?")


def is_hub_id(name: str) -> bool:
    """Whether `name` could name a Hub repository (it may also name a local directory)."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the Hub's endpoint opens within timeout seconds; else why not.
    Offline mode (HF_HUB_OFFLINE=1) counts as unreachable: only the local cache is used. The
    environment is read on every call, so HF_ENDPOINT / HF_HUB_OFFLINE set later still count."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {host}:{port} ({err.strerror or err})"


def require_hub(
    name: str, what: str, instead: str, error: type[InputError] = HubError, local_files: str | None = None
) -> None:
    """Raise `error`, within seconds, when `what` `name` is not a local path and needs a Hub that
    can't be reached; `instead` says what to pass instead. The one place this check is made.
    `local_files` names what a local directory would need to hold: when a directory called `name`
    exists without them (our package folder gpt2/ beside the hub name "gpt2"), the message says so."""
    reason = hub_unreachable_reason()
    if reason is not None:
        note = local_directory_note(name, local_files)
        local = f"is read as a Hub id ({note})" if note else "is not a local path"
        err = error(f"{what} {name!r} {local}, and the Hugging Face Hub can't be reached ({reason}). {instead}")
        err.hub_unreachable = f"{what} {name!r} is on the Hub, which can't be reached ({reason})"
        raise err


def unreachable_on_hub(err: BaseException) -> str | None:
    """What require_hub could not reach, when err is its error (the Hub was needed and is out of
    reach, as opposed to a name it lacks or a bad file); None for any other error."""
    return getattr(err, "hub_unreachable", None)


def local_directory_note(name: str, local_files: str | None) -> str | None:
    """When a directory called `name` exists but holds no `local_files`, a note that says so; else None."""
    if local_files and Path(name).is_dir():
        return f"the local directory {name!r} holds no {local_files}"
    return None


def download_files(repo_id: str, filenames: list[str], what: str, local_files: str | None = None) -> Path:
    """Fetch the first of `filenames` alternatives that exists from a Hub repo: from the local
    cache when it holds one, else from the Hub (see require_hub for `local_files`). Returns the
    snapshot directory."""
    from huggingface_hub import hf_hub_download

    errors = []
    for local_only in (True, False):
        if not local_only:
            require_hub(repo_id, what, "Pass a local directory instead (nor is it in the local cache).",
                        local_files=local_files)
        for filename in filenames:
            try:
                return Path(hf_hub_download(repo_id, filename, local_files_only=local_only)).parent
            except Exception as err:  # noqa: BLE001 - every failure here means "try the next file, then explain"
                errors.append(f"{filename}: {type(err).__name__}")
    tried = "; ".join(errors[-len(filenames):])
    note = local_directory_note(repo_id, local_files)
    raise HubError(f"could not download {what} {repo_id!r} from the Hugging Face Hub ({tried})"
                   + (f"; {note}" if note else ""))
