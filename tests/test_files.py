"""gpt2/files.py: the one writer: a write that fails part-way leaves the old file and no temporary."""

import os

import pytest

from gpt2.files import atomic_write, atomic_write_text, remove_stale_temporaries


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file's mode, not mkstemp's 0600


def test_stale_temporaries_are_ours_only(tmp_path):
    ours = [".config.json.a1b2c3d4.tmp", ".training_state.json.tmp", ".model.safetensors.k2j3h4"]
    theirs = [".gitignore", "notes.tmp", ".hidden", ".config.json.swp"]  # the last: vim's, of an open file
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_stale_temporaries(tmp_path, names=["config.json"])] == [ours[0]]
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(ours[1:])
    assert sorted(os.listdir(tmp_path)) == sorted(theirs)
