"""gpt2/provenance.py: the commit and versions stamped on benchmark rows and run_config.yaml."""

import subprocess

from gpt2 import provenance


def test_commit_is_the_checkouts_or_the_one_named(monkeypatch):
    provenance.git_commit.cache_clear()
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"  # a copied tree without .git names its commit
    provenance.git_commit.cache_clear()
    monkeypatch.delenv("GIT_COMMIT")
    head = subprocess.run(["git", "-C", str(provenance.CHECKOUT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert provenance.git_commit().removesuffix("-dirty") == expected
    provenance.git_commit.cache_clear()


def test_versions_name_missing_packages():
    import torch

    found = provenance.versions("torch", "no-such-package-gpt2")
    assert found == {"torch": torch.__version__, "no-such-package-gpt2": "not installed"}
