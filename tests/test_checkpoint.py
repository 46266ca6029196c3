"""gpt2/checkpoint.py: finding, validating and resolving step_N checkpoints without Accelerate (the
save / resume / corruption round trips through the script are in test_pretrain.py)."""

import pytest

from gpt2 import checkpoint


def test_latest_skips_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, False)):
        path = checkpoint.checkpoint_dir(tmp_path, step)
        path.mkdir()
        if complete:
            checkpoint.write_training_state(path, {"step": step})
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_2"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.resolve_checkpoint(str(tmp_path / "step_4"), tmp_path)
    with pytest.raises(ValueError, match="did you mean .*step_2"):
        checkpoint.resolve_checkpoint(str(tmp_path), tmp_path)


def test_output_dir_holding_files_is_in_use_until_resumed_or_overwritten(tmp_path):
    out = tmp_path / "out"
    assert checkpoint.check_output_dir(out, resuming=False, overwrite=False) == []  # not there yet: fine
    out.mkdir()
    (out / "step_3").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.OutputDirInUse, match="already holds a run"):
        checkpoint.check_output_dir(out, resuming=False, overwrite=False)
    assert checkpoint.check_output_dir(out, resuming=True, overwrite=False) == []
    removed = checkpoint.check_output_dir(out, resuming=False, overwrite=True)
    assert sorted(p.name for p in removed) == ["metrics.jsonl", "step_3"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="is a file, not a directory"):
        checkpoint.check_output_dir(out / "notes.txt", resuming=False, overwrite=False)


def test_resume_settings_must_match():
    saved = {"world_size": 1, "seed": 1, "block_size": 32, "learning_rate": 1e-3}
    checkpoint.check_resume_compatible(saved, {**saved, "learning_rate": 5e-4})  # not an invariant
    with pytest.raises(ValueError, match="seed: checkpoint 1, now 2"):
        checkpoint.check_resume_compatible(saved, {**saved, "seed": 2})
