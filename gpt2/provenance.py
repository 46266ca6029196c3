"""Where a result came from: the commit of this checkout and the versions of the libraries that made
it. Stamped on every benchmark row and at the head of every run's run_config.yaml."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


@functools.cache  # asked at every checkpoint; a run's commit doesn't change under it
def git_commit() -> str:
    """The checkout's short commit, "-dirty" when tracked files changed since; GIT_COMMIT when set
    (a copied tree without .git, as on a lent GPU machine); "unknown" otherwise."""
    commit = os.environ.get("GIT_COMMIT")
    if commit:
        return commit
    try:
        commit = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def versions(*packages: str) -> dict[str, str]:
    """{package: installed version, or "not installed"}."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
