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


def test_overwrite_deletes_only_what_a_run_of_ours_wrote(tmp_path):
    """Ours: what the manifest names (recorded before writing) and step_N checkpoints with our
    marker and state. Someone else's files stay; one where a run would write stops the overwrite
    before anything is deleted."""
    out = tmp_path / "out"
    assert checkpoint.check_output_dir(out, resuming=False, overwrite=False) == []  # not there yet: fine
    out.mkdir()
    checkpoint.record_outputs(out, "metrics.jsonl", "config.json")
    (out / "metrics.jsonl").write_text("{}\n")
    complete = checkpoint.checkpoint_dir(out, 3)
    complete.mkdir()
    checkpoint.write_training_state(complete, {"step": 3, "epoch": 0, "batches_in_epoch": 3})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.OutputDirInUse, match="already holds a run .*beside files no run of ours wrote"):
        checkpoint.check_output_dir(out, resuming=False, overwrite=False)
    assert checkpoint.check_output_dir(out, resuming=True, overwrite=False) == []
    (out / "step_7").mkdir()  # named like a checkpoint, but not one of ours
    with pytest.raises(ValueError, match="step_7, which no run of ours wrote.*nothing was deleted"):
        checkpoint.check_output_dir(out, resuming=False, overwrite=True)
    assert (out / "metrics.jsonl").exists() and complete.exists()
    (out / "step_7").rmdir()
    removed = checkpoint.check_output_dir(out, resuming=False, overwrite=True)
    assert sorted(p.name for p in removed) == ["metrics.jsonl", "step_3"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # and the manifest, whose names are gone
    with pytest.raises(ValueError, match="is a file, not a directory"):
        checkpoint.check_output_dir(out / "notes.txt", resuming=False, overwrite=False)


def test_resume_settings_must_match():
    saved = {"world_size": 1, "seed": 1, "block_size": 32, "learning_rate": 1e-3}
    checkpoint.check_resume_compatible(saved, {**saved, "learning_rate": 5e-4})  # not an invariant
    with pytest.raises(ValueError, match="seed: checkpoint 1, now 2"):
        checkpoint.check_resume_compatible(saved, {**saved, "seed": 2})


def _fake_checkpoint(out, step, world_size=1):
    """A step_N with what a resume reads: the files save_state writes (valid torch.save / safetensors
    containers), the training state and the marker."""
    import torch
    from safetensors.torch import save_file

    path = checkpoint.checkpoint_dir(out, step)
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    for name in ("optimizer.bin", "scheduler.bin", *(f"random_states_{r}.pkl" for r in range(world_size))):
        torch.save({}, path / name)
    checkpoint.record_outputs(out, path.name)
    checkpoint.write_training_state(path, {"step": step, "epoch": 0, "batches_in_epoch": step})
    return path


@pytest.mark.parametrize("missing", ["optimizer.bin", "scheduler.bin", "model.safetensors"])
def test_latest_passes_over_a_checkpoint_missing_saved_state(tmp_path, missing):
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    (newest / missing).unlink()
    path, passed_over = checkpoint.resolve_checkpoint("latest", tmp_path)
    assert path == tmp_path / "step_2" and len(passed_over) == 1 and f"{missing} is missing" in passed_over[0]
    with pytest.raises(ValueError, match=f"{missing} is missing"):
        checkpoint.resolve_checkpoint(str(newest), tmp_path)


@pytest.mark.parametrize("state, fragment", [({"step": "ten", "epoch": 0, "batches_in_epoch": 1}, "'step' is 'ten'"),
                                             ({"step": 3, "epoch": -1, "batches_in_epoch": 1}, "'epoch' is -1"),
                                             ({"step": 3, "epoch": 0}, "no 'batches_in_epoch'"),
                                             ([1, 2], "no 'step'")])
def test_a_training_state_of_the_wrong_shape_is_corrupt(tmp_path, state, fragment):
    import json

    (tmp_path / checkpoint.TRAINING_STATE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"is corrupt \\({fragment}"):
        checkpoint.read_training_state(tmp_path)


def test_a_torn_metrics_row_is_dropped_and_the_rest_kept(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')  # killed mid-write
    assert checkpoint.truncate_metrics(metrics, 2) == 1
    assert metrics.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'


def test_pruning_finishes_a_deletion_cut_short(tmp_path):
    """An old checkpoint whose deletion was interrupted (marker gone, files left) is ours by the
    manifest and older than every kept one: the next rotation removes it; a foreign step_N stays."""
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    checkpoint.remove_completion_marker(tmp_path / "step_2")  # the rotation was killed here
    (tmp_path / "step_1").mkdir()  # not ours: no marker, not in the manifest
    removed = checkpoint.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in removed] == ["step_2", "step_4"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1", "step_6"]


def test_what_the_manifest_names_is_ours_only_once_written(tmp_path):
    """A folder whose only files are our manifest and lock (a run that stopped before writing) is
    empty; a run of an earlier version, without a manifest, is recognised by its checkpoints; a
    folder of the user's where the run would write (its tracker folder, say) stops an overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.record_outputs(out, "step_2")
    (out / checkpoint.LOCK_FILE).write_text("123\n")
    assert checkpoint.check_output_dir(out, resuming=False, overwrite=False) == []
    _fake_checkpoint(out, 4)
    (out / checkpoint.MANIFEST).unlink()  # written by an earlier version
    (out / "config.json").write_text("{}")
    removed = checkpoint.check_output_dir(out, resuming=False, overwrite=True)
    assert sorted(p.name for p in removed) == ["config.json", "step_4"]
    (out / "runs-of-mine").mkdir()
    (out / "runs-of-mine" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="runs-of-mine, which no run of ours wrote.*nothing was deleted"):
        checkpoint.check_output_dir(out, resuming=False, overwrite=True, will_write=("runs-of-mine",))
    assert (out / "runs-of-mine" / "thesis.tex").read_text() == "mine"
