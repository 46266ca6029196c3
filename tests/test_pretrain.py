"""scripts/pretrain.py end to end on tiny models: outputs, exact resume, two CPU processes, NaN
handling, and a clear one-line error for each kind of bad input."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import expect_input_error, load_script

datasets = pytest.importorskip("datasets")

from gpt2 import optim as gpt2_optim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain.py"
TINY = [
    "--config_overrides", "n_layer=2,n_head=2,n_embd=32",
    "--block_size", "32",
    "--per_device_train_batch_size", "4",
    "--vocab_size", "300",
    "--logging_steps", "1",
    "--learning_rate", "3e-3",
    "--num_warmup_steps", "2",
    "--sample_tokens", "5",
]


pretrain = load_script(SCRIPT)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A datasets cache under tmp_path and a fresh Accelerate state for each in-process run."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _reset_accelerate()
    yield
    _reset_accelerate()


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def train_file(tmp_path):
    """~60k characters of synthetic prose, one paragraph per document."""
    rng = np.random.default_rng(0)
    words = "the model reads tokens and predicts the next one while its layers attend to earlier words".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 80)))).capitalize() + "." for _ in range(400)]
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv):
    return pretrain.main([str(a) for a in argv])


def metrics(output_dir, key):
    """{step: value} for one key of metrics.jsonl."""
    rows = [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.slow
def test_outputs_and_exact_resume(tmp_path, train_file, capsys, monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--train_file", train_file, *TINY, "--eval_steps", "3", "--checkpointing_steps", "3"]
    assert run([*common, "--output_dir", straight, "--max_train_steps", 6]) == 0
    out = capsys.readouterr().out
    assert "tokens per optimizer step" in out and "kernels    attention sdpa" in out
    assert "Sample:" in out and f"evaluate_perplexity.py --model_name_or_path {straight}" in out

    # what a finished run leaves behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", "all_results.json", "metrics.jsonl"):
        assert (straight / name).is_file(), name
    for step in (3, 6):
        assert (straight / f"step_{step}" / "checkpoint_complete").is_file()
    results = json.loads((straight / "all_results.json").read_text())
    assert results["step"] == 6 and results["perplexity"] == pytest.approx(np.exp(results["eval_loss"]))
    record = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()][1]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory"} <= set(record)
    assert record["mfu"] is None  # CPU: no peak to divide by, so no number
    val = metrics(straight, "val_perplexity")
    assert set(val) == {0, 3, 6} and val[6] < val[0]

    from gpt2 import GPT2

    model = GPT2.from_pretrained(straight)
    assert model.config.n_layer == 2 and model.config.vocab_size <= 300
    from gpt2.tokenizer import eos_token_id, load_tokenizer

    config_json = json.loads((straight / "config.json").read_text())  # transformers' generate stops there
    assert config_json["eos_token_id"] == config_json["bos_token_id"] == eos_token_id(load_tokenizer(straight))
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(straight))
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)

    # killed right after the step-3 checkpoint, then resumed from the latest checkpoint: the same
    # batches, learning rates and losses as the straight run
    restore = _kill_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run([*common, "--output_dir", split, "--max_train_steps", 6])
    restore()
    _reset_accelerate()
    assert run([*common, "--output_dir", split, "--max_train_steps", 6, "--resume_from_checkpoint", "latest"]) == 0
    assert "Resumed from" in capsys.readouterr().out
    a, b = metrics(straight, "train_loss"), metrics(split, "train_loss")
    assert list(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bit-identical on CPU
    assert metrics(straight, "lr") == metrics(split, "lr")
    assert metrics(straight, "val_loss")[6] == metrics(split, "val_loss")[6]

    # resuming with another batch or block size is refused, saying what differs
    with pytest.raises(SystemExit) as exit_info:
        run([*common, "--output_dir", split, "--max_train_steps", 9, "--resume_from_checkpoint", "latest",
             "--per_device_train_batch_size", 2])
    assert exit_info.value.code == 2
    assert "per_device_train_batch_size: checkpoint 4, now 2" in capsys.readouterr().err


@pytest.mark.slow
def test_loss_falls_on_real_text(tmp_path, shared_data):
    text = Path(shared_data, "tinyshakespeare", "input.txt").read_text()[:100_000]
    (tmp_path / "shakespeare.txt").write_text(text)
    argv = ["--train_file", tmp_path / "shakespeare.txt", *TINY, "--max_train_steps", 40, "--eval_steps", 40,
            "--max_eval_samples", 64, "--output_dir", tmp_path / "out"]
    argv[argv.index("--vocab_size") + 1] = 512
    assert run(argv) == 0
    val = metrics(tmp_path / "out", "val_loss")
    assert val[40] < val[0] - 0.5, val  # from ~ln(512) = 6.2 nats: perplexity down by more than 40%


@pytest.mark.slow
def test_streaming_trains_and_resumes_exactly(tmp_path, train_file, monkeypatch):
    valid = tmp_path / "valid.txt"
    valid.write_text(Path(train_file).read_text()[:5000])
    common = ["--train_file", train_file, "--validation_file", valid, *TINY, "--streaming", "--shuffle_buffer_size", 50,
              "--eval_steps", 2, "--max_eval_samples", 8, "--max_train_steps", 4]
    a, b = _straight_and_resumed(common, tmp_path, monkeypatch, kill_at=2)
    assert list(a) == [1, 2, 3, 4] and a == b
    assert metrics(tmp_path / "straight", "val_loss")[4] < metrics(tmp_path / "straight", "val_loss")[0]


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, train_file, monkeypatch, capsys):
    from gpt2 import GPT2

    forward, calls = GPT2.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 3:  # the third training step goes bad
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT2, "forward", poisoned)
    common = ["--train_file", train_file, *TINY, "--eval_steps", "2", "--max_train_steps", 5]
    assert run([*common, "--output_dir", tmp_path / "stop"]) == 1
    out = capsys.readouterr().out
    assert "non-finite loss at step 3" in out and "step_2" in out and "--on_nonfinite skip" in out
    assert (tmp_path / "stop" / "step_2" / "checkpoint_complete").is_file()
    assert not (tmp_path / "stop" / "step_3").exists()

    calls["n"] = 0  # steps 3-5 go bad again; "skip" leaves them out and finishes the run
    assert run([*common, "--output_dir", tmp_path / "skip", "--on_nonfinite", "skip"]) == 0
    assert "skipping this update" in capsys.readouterr().out
    assert (tmp_path / "skip" / "model.safetensors").is_file()


def _bad_input_cases(tmp_path, train_file):
    rows = [json.dumps({"body": f"hello there, number {i}", "id": i}) for i in range(10)]
    (tmp_path / "two_columns.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "not_a_checkpoint").mkdir()
    return {
        "unreachable": (["--dataset_name", "some-org/some-dataset"], "can't be reached"),
        "column": (["--train_file", tmp_path / "two_columns.jsonl", "--text_column", "content"],
                   "'content' not found"),
        "empty": (["--train_file", tmp_path / "empty.txt"], "is empty"),
        "block": (["--train_file", train_file, "--block_size", 512, "--vocab_size", 300],
                  "larger than the model's context"),
        "preset": (["--config_name", "gpt2-huge"], "neither a preset"),
        "override": (["--config_overrides", "n_layers=2"], "bad override"),
        "triton": (["--kernels", "triton"], "--kernels triton can't run here"),
        "resume": (["--train_file", train_file, "--resume_from_checkpoint", tmp_path / "not_a_checkpoint"],
                   "not a complete checkpoint"),
        "flag": (["--eval_steps", 0], "argument --eval_steps: must be at least 1, got 0"),
        "grad_norm_zero": (["--max_grad_norm", 0], "--max_grad_norm must be positive"),
        "grad_norm_negative": (["--max_grad_norm", -1], "--max_grad_norm must be positive"),
        "checkpointing_zero": (["--checkpointing_steps", 0], "--checkpointing_steps: must be a number of steps"),
        "epochs_negative": (["--num_train_epochs", -1], "--num_train_epochs must be positive"),
        "weight_decay": (["--weight_decay", -0.1], "--weight_decay must be >= 0"),
        "warmup": (["--num_warmup_steps", -1], "argument --num_warmup_steps: must be at least 0, got -1"),
        "vocab": (["--vocab_size", 100], "--vocab_size: must be at least 257 (256 bytes + <|endoftext|>)"),
        "learning_rate": (["--learning_rate", -1], "--learning_rate must be positive"),
        "output_file": (["--output_dir", train_file], "is a file, not a directory"),
        "output_proc": (["--output_dir", "/proc/gpt2_suite_out"], "/proc refuses a new folder"),
        "tracker": (["--with_tracking", "--report_to", "wandb"], "pip install wandb"),
        "choice": (["--lr_scheduler_type", "cosine_with_restarts_typo"], "invalid choice"),
        "override_value": (["--config_overrides", "n_layer=abc"], "bad override 'n_layer=abc'"),
        "learning_rate_inf": (["--learning_rate", "inf"], "--learning_rate must be positive and finite"),
        "min_lr_above": (["--learning_rate", "1e-3", "--min_lr", "1e-2"], "--min_lr (0.01) is above --learning_rate"),
        "resume_and_overwrite": (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "give one of them"),
        "seed_negative": (["--seed", -1], "argument --seed: must be in [0, 4294967295]"),
        "seed_too_large": (["--seed", 2**32], "argument --seed: must be in [0, 4294967295]"),
        "seed_huge": (["--seed", "99999999999999999999"], "argument --seed: must be in [0, 4294967295]"),
        "block_size_zero": (["--block_size", 0], "argument --block_size: must be at least 2"),
        "warmup_beyond": (["--max_train_steps", 10, "--num_warmup_steps", 20], "end before its warmup"),
        "warmup_beyond_default": (["--num_warmup_steps", 1000], "more than the run's 400 steps"),
    }


@pytest.mark.parametrize(
    "case", ["unreachable", "column", "empty", "block", "preset", "override", "triton", "resume", "flag", "choice",
             "override_value", "grad_norm_zero", "grad_norm_negative", "checkpointing_zero", "epochs_negative",
             "weight_decay", "warmup", "vocab", "learning_rate", "output_file", "output_proc", "tracker",
             "learning_rate_inf", "min_lr_above", "resume_and_overwrite", "warmup_beyond", "warmup_beyond_default",
             "seed_negative", "seed_too_large", "seed_huge", "block_size_zero"]
)
def test_bad_input_is_one_clear_line(case, tmp_path, train_file, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the hub can't be reached, quickly
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, message = _bad_input_cases(tmp_path, train_file)[case]
    if "--output_dir" not in argv:
        argv = [*argv, "--output_dir", tmp_path / "out"]
    expect_input_error(pretrain.main, argv, message, within=20)


def test_training_with_dropout_on_our_attention_is_refused_before_the_data(tmp_path):
    """--kernels triton for a model with dropout (our attention kernel has none): one line, before
    the data is read (a dataset that doesn't exist is never looked for)."""
    argv = ["--kernels", "triton", "--config_overrides", "n_layer=2,n_head=2,n_embd=32,dropout=0.1",
            "--train_file", tmp_path / "never_read.txt", "--output_dir", tmp_path / "out"]
    expect_input_error(pretrain.main, argv, "--kernels triton: our triton attention kernel has no attention dropout",
                       "--kernels auto", within=20)


@pytest.mark.slow
def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset_name", "openwebtext", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--train_file" in proc.stderr and "builtin:pydocs" in proc.stderr
    assert time.perf_counter() - start < 60  # mostly interpreter start-up and imports


@pytest.mark.slow
def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path, train_file):
    """Two CPU processes (gloo) through accelerate launch: ranks read disjoint blocks, so together they
    see exactly the one-process run's batches, and end with identical weights; the two recompute
    their blocks in backward (--gradient_checkpointing), which changes no gradient. (`accelerate launch
    --cpu --num_processes 2` would start one process, as accelerate's CPU path wants mpirun; the
    processes start as for GPUs and the script's --cpu picks gloo.)"""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--train_file", train_file, *TINY, "--max_train_steps", "4", "--eval_steps", "4",
              "--gradient_accumulation_steps", "2"]
    common[common.index("--per_device_train_batch_size") + 1] = "2"
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()),
         str(SCRIPT), *common, "--cpu", "--gradient_checkpointing", "--output_dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 x cpu" in two.stdout
    one_argv = [*common, "--output_dir", tmp_path / "one"]
    one_argv[one_argv.index("--per_device_train_batch_size") + 1] = "4"
    assert run(one_argv) == 0
    results = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert results["ranks_hold_identical_weights"] is True
    a, b = metrics(tmp_path / "one", "train_loss"), metrics(tmp_path / "two", "train_loss")
    assert list(a) == list(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in a], rtol=1e-5)
    np.testing.assert_allclose(metrics(tmp_path / "two", "val_loss")[4], metrics(tmp_path / "one", "val_loss")[4],
                               rtol=1e-5)


@pytest.mark.slow
def test_a_frozen_process_stops_the_others_after_ddp_timeout(tmp_path, train_file):
    """Two CPU processes; once they train, process 1 is frozen (SIGSTOP): process 0 waits --ddp_timeout
    seconds at the next collective, then ends with one line naming itself and the timeout."""
    import signal

    import psutil

    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(SCRIPT), "--train_file", str(train_file), *map(str, TINY),
         "--max_train_steps", "100000", "--eval_steps", "100000", "--cpu", "--ddp_timeout", "10",
         "--output_dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers = []
    try:
        for line in launcher.stdout:
            if line.startswith("step 3:"):
                break
        workers = psutil.Process(launcher.pid).children(recursive=True)
        frozen = [w for w in workers if w.environ().get("LOCAL_RANK") == "1"]
        assert len(frozen) == 1
        frozen[0].send_signal(signal.SIGSTOP)
        _, stderr = launcher.communicate(timeout=240)
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        launcher.kill()
    assert "pretrain.py: error: process 0 waited 10 s (--ddp_timeout)" in stderr, stderr[-3000:]


# Loaded by every Python process of the run through PYTHONPATH (test code, not the product's): process
# 1's save of step_4 fails at once with a full disk, while process 0 is still writing its part.
_BREAK_ONE_RANKS_SAVE = """
import os, time
if os.environ.get("GPT2_SUITE_TEST_BREAK_SAVE"):
    import errno
    from accelerate import Accelerator
    save_state = Accelerator.save_state

    def breaking_save_state(self, output_dir=None, **kwargs):
        if str(output_dir).endswith("step_4"):
            if self.process_index == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            time.sleep(3)  # process 0 writes on, long after process 1 failed
        return save_state(self, output_dir, **kwargs)

    Accelerator.save_state = breaking_save_state
"""


@pytest.mark.slow
def test_a_rank_that_fails_to_save_never_deletes_what_another_writes(tmp_path, train_file):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(_BREAK_ONE_RANKS_SAVE)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "GPT2_SUITE_TEST_BREAK_SAVE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hooks"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(SCRIPT), "--train_file", str(train_file), *map(str, TINY),
         "--max_train_steps", "4", "--eval_steps", "2", "--cpu", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode != 0
    for rank_message in ("no space left on the device", "another process failed to write its part"):
        assert f"pretrain.py: error: saving {out / 'step_4'} failed: {rank_message}" in two.stderr, two.stderr[-3000:]
    assert (out / "step_2" / "checkpoint_complete").is_file() and not (out / "step_4").exists()


def _kill_after_checkpoint(monkeypatch, at_step: int):
    """Make the next run die (KeyboardInterrupt) right after its step-`at_step` checkpoint is saved."""
    save_checkpoint = pretrain.save_checkpoint

    def save_then_die(accelerator, args, step, *rest):
        path = save_checkpoint(accelerator, args, step, *rest)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(pretrain, "save_checkpoint", save_checkpoint)


def _straight_and_resumed(argv, tmp_path, monkeypatch, kill_at: int):
    """train_loss by step of an uninterrupted run (tmp_path/straight) and of one killed right after
    its step-`kill_at` checkpoint and resumed from the latest checkpoint (tmp_path/split)."""
    assert run([*argv, "--output_dir", tmp_path / "straight"]) == 0
    restore = _kill_after_checkpoint(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        run([*argv, "--output_dir", tmp_path / "split"])
    restore()
    _reset_accelerate()
    assert run([*argv, "--output_dir", tmp_path / "split", "--resume_from_checkpoint", "latest"]) == 0
    return metrics(tmp_path / "straight", "train_loss"), metrics(tmp_path / "split", "train_loss")


@pytest.mark.slow
def test_exact_resume_with_dropout(tmp_path, train_file, monkeypatch):
    """Dropout draws from the global RNG: a resumed run must draw the same numbers as an
    uninterrupted one, so its losses are the same to the bit."""
    common = ["--train_file", train_file, *TINY, "--eval_steps", 2, "--max_train_steps", 4]
    common[common.index("--config_overrides") + 1] += ",dropout=0.1"
    a, b = _straight_and_resumed(common, tmp_path, monkeypatch, kill_at=2)
    assert list(a) == list(b) == [1, 2, 3, 4]
    assert a == b


def _four_steps(train_file, *extra):
    """A 4-step tiny run, evaluated and checkpointed every 2 steps."""
    return ["--train_file", train_file, *TINY, "--eval_steps", 2, "--max_train_steps", 4, *extra]


def _unrecorded(output_dir: Path) -> set[str]:
    """What is in a run's output folder that its manifest doesn't name: what an overwrite would leave."""
    from gpt2.checkpoint import LOCK_FILE, MANIFEST

    written = json.loads((output_dir / MANIFEST).read_text())["written"]
    return {p.name for p in output_dir.iterdir()} - {*written, MANIFEST, LOCK_FILE}


def test_output_dir_of_another_run_is_refused_unless_overwritten(tmp_path, train_file, capsys):
    out = tmp_path / "out"
    assert run([*_four_steps(train_file), "--output_dir", out]) == 0
    assert _unrecorded(out) == set()  # every file the run wrote is the run's to delete (the tokenizer's five too)
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out],
                       "already holds a run", "--resume_from_checkpoint latest", "--overwrite_output_dir")
    shutil.copytree(out / "step_4", out / "step_99")  # a stale checkpoint of that earlier run: it must go too
    (out / "notes.txt").write_text("mine")  # the user's, beside the run: never deleted
    (out / "step_2023").mkdir()  # the user's too, though named like a checkpoint (no marker, no state)
    (out / "step_2023" / "keep.csv").write_text("a,b\n")
    _reset_accelerate()
    shorter = [*_four_steps(train_file, "--max_train_steps", 2), "--output_dir", out, "--overwrite_output_dir"]
    expect_input_error(pretrain.main, shorter, "step_2023", "no run of ours wrote", "nothing was deleted")
    assert (out / "step_99").is_dir() and (out / "config.json").is_file()
    shutil.move(out / "step_2023", tmp_path / "step_2023")
    _reset_accelerate()
    assert run(shorter) == 0
    assert "deleted the earlier run's" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2"]
    assert sorted(metrics(out, "train_loss")) == [1, 2]  # no rows of the first run
    assert (out / "notes.txt").read_text() == "mine"
    assert _unrecorded(out) == {"notes.txt"}


@pytest.mark.parametrize("name", [".gpt2_suite.lock", "gpt2_suite_outputs.json"])
@pytest.mark.parametrize("kind", ["folder", "symbolic link"])
def test_a_folder_or_link_where_the_run_keeps_its_own_files_is_refused(tmp_path, train_file, name, kind):
    """The lock and the manifest are plain files of the run's: a folder or a link in their place
    is one line, and nothing is written through the link."""
    out, notes = tmp_path / "out", tmp_path / "notes.txt"
    out.mkdir()
    notes.write_text("mine")
    (out / name).mkdir() if kind == "folder" else (out / name).symlink_to(notes)
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out], f"{out / name} is a {kind}",
                       "move it", within=20)
    assert notes.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [name]


def test_overwrite_never_deletes_through_a_link_named_like_a_checkpoint(tmp_path, train_file):
    """--overwrite_output_dir where a step_N is a symbolic link (to a complete checkpoint elsewhere):
    a link is never the run's, so it is refused in one line and nothing is deleted, here or there."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert run([*_four_steps(train_file, "--max_train_steps", 2), "--output_dir", out]) == 0
    shutil.move(out / "step_2", elsewhere)
    (out / "step_2").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in out.iterdir())
    _reset_accelerate()
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out, "--overwrite_output_dir"],
                       "step_2", "no run of ours wrote", "nothing was deleted")
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "step_2").is_symlink() and sorted(p.name for p in elsewhere.iterdir())


def test_a_run_that_stops_before_writing_leaves_the_folder_usable(tmp_path, train_file):
    """A typo fails before anything is written, and the next run in the same folder starts; nothing is
    deleted by an overwrite whose flags are wrong."""
    out = tmp_path / "out"
    expect_input_error(pretrain.main, [*_four_steps(tmp_path / "nope.txt"), "--output_dir", out], "nope.txt")
    _reset_accelerate()
    assert run([*_four_steps(train_file, "--max_train_steps", 2), "--output_dir", out]) == 0
    before = sorted(p.name for p in out.iterdir())
    _reset_accelerate()
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out, "--overwrite_output_dir",
                                       "--config_name", "gpt2-tinyy"], "neither a preset")
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_folder_of_other_files_is_not_called_a_run(tmp_path, train_file):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    message = expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out],
                                 "holds files that no run of ours wrote (cat.jpg)")
    assert "holds a run" not in message


def test_two_runs_never_share_an_output_dir(tmp_path, train_file):
    """While a run holds the output directory (an OS lock, here taken by a process that then dies
    by SIGKILL), a second run is one line naming the first one's pid; once the holder is gone,
    however it went, the directory is free again."""
    import signal

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gpt2.checkpoint import locked_output_dir\n"
         "with locked_output_dir(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out],
                           "--output_dir", f"in use by another run (pid {holder.pid})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _reset_accelerate()
    assert run([*_four_steps(train_file, "--max_train_steps", 2), "--output_dir", out]) == 0


def test_read_only_output_dir_is_refused(tmp_path, train_file, monkeypatch):
    """A directory the user can't write to (os.access says so: mode bits, a read-only mount; root,
    as in CI, is refused by neither, so the check is faked there)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", locked / "out"], "not writable")


@pytest.mark.slow
def test_resume_refuses_other_seed_or_data_and_applies_a_new_learning_rate(tmp_path, train_file, capsys,
                                                                           monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run([*_four_steps(train_file), "--output_dir", straight]) == 0
    restore = _kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run([*_four_steps(train_file), "--output_dir", split])
    restore()
    other = tmp_path / "other.txt"
    other.write_text(Path(train_file).read_text().upper())
    resume = ["--output_dir", split, "--resume_from_checkpoint", "latest"]
    for changed, fragment in ((["--seed", 7], "seed: checkpoint 42, now 7"), (["--train_file", other], "data:")):
        _reset_accelerate()
        argv = _four_steps(train_file, *resume, *changed)
        if changed[0] == "--train_file":
            argv[argv.index("--train_file") + 1] = other
        expect_input_error(pretrain.main, argv, fragment)
    _reset_accelerate()
    assert run(_four_steps(train_file, *resume, "--learning_rate", 1.5e-3)) == 0
    assert "now peaks at --learning_rate 0.0015" in capsys.readouterr().out
    # The schedule keeps its shape and reaches the new peak: lr - min_lr scales by (1.5e-3 - m) / (3e-3 - m).
    m, a, b = 1e-4, metrics(straight, "lr"), metrics(split, "lr")
    assert a[2] == b[2]
    for step in (3, 4):
        assert (b[step] - m) == pytest.approx((a[step] - m) * (1.5e-3 - m) / (3e-3 - m), rel=1e-9)


@pytest.mark.slow
def test_the_end_of_run_sample_fits_the_context(tmp_path, train_file, capsys):
    """--sample_tokens beyond a small context: the run still ends 0, its sample cut to fit, and says so."""
    argv = ["--train_file", train_file, *TINY, "--config_overrides", "n_layer=2,n_head=2,n_embd=32,n_positions=32",
            "--max_train_steps", 2, "--eval_steps", 2, "--sample_tokens", 60, "--output_dir", tmp_path / "out"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "not --sample_tokens 60: the context is 32" in out and "Sample:" in out


def _column_files(tmp_path) -> dict:
    """A text column that holds no text, in each format: ints (jsonl, csv, parquet), lists, a mix."""
    import pandas as pd

    files = {}
    for name, values in (("int", list(range(60))), ("list", [["a", "b"]] * 60),
                         ("mixed", [i if i % 2 else f"word {i}" for i in range(60)])):
        files[f"{name}.jsonl"] = tmp_path / f"{name}.jsonl"
        files[f"{name}.jsonl"].write_text("".join(json.dumps({"text": v}) + "\n" for v in values))
    pd.DataFrame({"text": list(range(60))}).to_csv(tmp_path / "int.csv", index=False)
    pd.DataFrame({"text": list(range(60))}).to_parquet(tmp_path / "int.parquet")
    files["int.csv"], files["int.parquet"] = tmp_path / "int.csv", tmp_path / "int.parquet"
    return files


@pytest.mark.parametrize("name, found", [("int.jsonl", "int64 values"), ("list.jsonl", "List values"),
                                         ("mixed.jsonl", "Json values"), ("int.csv", "int64 values"),
                                         ("int.parquet", "int64 values")])
def test_a_text_column_without_text_is_one_line(tmp_path, name, found):
    """Not an empty training run that exits 0: one line naming the column and what it holds, before
    a tokenizer is trained on nothing; the evaluator says the same of the same file."""
    data = _column_files(tmp_path)[name]
    message = f"text column 'text' holds {found}, not text"
    if found == "Json values" and not hasattr(datasets, "Json"):
        message = "could not"  # datasets before 5 refuses a column of mixed types as it reads it
    expect_input_error(pretrain.main, ["--train_file", data, *TINY, "--output_dir", tmp_path / "out"], message)
    checkpoint = tmp_path / "model"
    from gpt2 import GPT2, GPT2Config
    from gpt2.tokenizer import save_tokenizer, train_tokenizer

    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=300)).save_pretrained(checkpoint)
    save_tokenizer(train_tokenizer(["some words to learn from"] * 20, vocab_size=300), checkpoint)
    evaluate = load_script(ROOT / "scripts" / "evaluate_perplexity.py")
    expect_input_error(evaluate.main, ["--model_name_or_path", checkpoint, "--validation_file", data], message)


def test_an_int_column_named_by_text_column_is_refused(tmp_path, train_file):
    rows = [json.dumps({"body": f"some words of row {i} " * 5, "id": i}) for i in range(200)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    expect_input_error(pretrain.main, ["--train_file", tmp_path / "rows.jsonl", "--text_column", "id", *TINY,
                                       "--output_dir", tmp_path / "out"], "text column 'id' holds int64 values")


def test_rows_without_text_are_dropped_and_counted(tmp_path, train_file, capsys):
    texts = Path(train_file).read_text().split("\n")
    rows = [{"text": None if i % 10 == 0 else text} for i, text in enumerate(texts)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(["--train_file", tmp_path / "rows.jsonl", *TINY, "--max_train_steps", 2, "--eval_steps", 2,
                "--output_dir", tmp_path / "out"]) == 0
    banner = capsys.readouterr().out
    nulls = sum(r["text"] is None for r in rows)
    train, validation = (re.search(rf"{split} .*?(\d+) rows without text \(null\) dropped", banner)
                         for split in ("train", "validation"))
    assert train and validation and int(train.group(1)) + int(validation.group(1)) == nulls


def test_an_implausible_data_position_is_refused(tmp_path, train_file):
    out = tmp_path / "out"
    assert run([*_four_steps(train_file), "--output_dir", out]) == 0
    state_file = out / "step_4" / "training_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "batches_in_epoch": 99999}))
    _reset_accelerate()
    expect_input_error(pretrain.main, _four_steps(train_file, "--output_dir", out, "--resume_from_checkpoint",
                                                  out / "step_4", "--max_train_steps", 6),
                       str(state_file), "99999 batches into an epoch of")


def test_corrupt_checkpoints_fall_back_or_name_the_file(tmp_path, train_file, capsys):
    out = tmp_path / "out"
    assert run([*_four_steps(train_file), "--output_dir", out]) == 0
    rows_before = metrics(out, "train_loss")
    weights = out / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated mid-write
    expect_input_error(pretrain.main, _four_steps(train_file, "--output_dir", out, "--resume_from_checkpoint",
                                                  out / "step_4"), str(weights), "truncated or corrupt")
    (out / ".model.safetensors.k2j3h4").write_bytes(b"half")  # a stale temporary of an interrupted write
    _reset_accelerate()
    capsys.readouterr()
    assert run(_four_steps(train_file, "--output_dir", out, "--resume_from_checkpoint", "latest")) == 0
    printed = capsys.readouterr().out
    assert "passing over" in printed and str(weights) in printed and "Resumed from" in printed and "step_2" in printed
    assert metrics(out, "train_loss") == rows_before  # steps 3-4 again, from step_2: the same losses, once each
    assert not (out / ".model.safetensors.k2j3h4").exists()

    for name, damage in (("training_state.json", b"{not json"), ("tokenizer.json", b"")):
        file = out / "step_4" / name
        intact = file.read_bytes()
        file.write_bytes(damage)
        expect_input_error(pretrain.main, _four_steps(train_file, "--output_dir", out, "--resume_from_checkpoint",
                                                      out / "step_4"), str(file))
        file.write_bytes(intact)
    (out / "step_4" / "random_states_0.pkl").unlink()
    expect_input_error(pretrain.main, _four_steps(train_file, "--output_dir", out, "--resume_from_checkpoint",
                                                  out / "step_4"), "random_states_0.pkl is missing")


@pytest.mark.slow
def test_checkpoints_evaluate_sample_and_keep_a_limit(tmp_path, train_file):
    out = tmp_path / "out"
    assert run([*_four_steps(train_file), "--output_dir", out, "--checkpoints_total_limit", 1]) == 0
    assert sorted(p.name for p in out.glob("step_*")) == ["step_4"]
    evaluate = load_script(ROOT / "scripts" / "evaluate_perplexity.py")
    final = evaluate.main(["--model_name_or_path", str(out), "--validation_file", train_file])
    step_4 = evaluate.main(["--model_name_or_path", str(out / "step_4"), "--validation_file", train_file])
    assert step_4["nll_sum"] == final["nll_sum"] and step_4["tokens"] == final["tokens"]
    generate = load_script(ROOT / "scripts" / "generate.py")
    samples = generate.main(["--model_name_or_path", str(out / "step_4"), "--prompt", "the", "--max_new_tokens", "3"])
    assert len(samples[0]["token_ids"]) <= 3


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, train_file, monkeypatch):
    import errno

    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def fill_the_disk(self, output_dir=None, **kwargs):
        if output_dir.endswith("step_4"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fill_the_disk)
    out = tmp_path / "out"
    # No clock: the error comes after four steps of training, whose time on busy cores says nothing
    # about how promptly a save failure is reported.
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out], "no space left",
                       str(out / "step_2"), within=None)
    assert (out / "step_2" / "checkpoint_complete").is_file() and not (out / "step_4").exists()


@pytest.mark.parametrize("where", ["save_state", "our files", "the manifest"])
def test_any_failure_while_saving_keeps_the_previous_checkpoint(tmp_path, train_file, monkeypatch, where):
    """Not only a full disk: torch's writer ("enforce fail"), safetensors' errors, a failure in the
    files written after save_state: one line, the partial step removed, the previous one intact."""
    from accelerate import Accelerator

    save_state, save_tokenizer = Accelerator.save_state, pretrain.save_tokenizer

    def breaks_at_step_4(original):
        def write(*args, **kwargs):
            target = str(kwargs.get("output_dir") or args[1])
            if target.endswith("step_4"):
                Path(target).mkdir(parents=True, exist_ok=True)
                (Path(target) / "optimizer.bin").write_bytes(b"PK partial")
                raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
            return original(*args, **kwargs)
        return write

    if where == "save_state":
        monkeypatch.setattr(Accelerator, "save_state", breaks_at_step_4(save_state))
    elif where == "our files":
        monkeypatch.setattr(pretrain, "save_tokenizer", breaks_at_step_4(save_tokenizer))
    else:  # recording step_4 as ours, before anything of it is written
        record = pretrain.ckpt.record_outputs
        monkeypatch.setattr(pretrain.ckpt, "record_outputs", lambda out, *names: (
            breaks_at_step_4(lambda *a: None)(None, Path(out) / names[0]) if names == ("step_4",)
            else record(out, *names)))
    out = tmp_path / "out"
    expect_input_error(pretrain.main, [*_four_steps(train_file), "--output_dir", out], "saving",
                       "RuntimeError: [enforce fail", str(out / "step_2"), within=None)
    assert (out / "step_2" / "checkpoint_complete").is_file() and not (out / "step_4").exists()


def test_epochs_checkpoints_and_the_step_limit(tmp_path, train_file, capsys):
    small = tmp_path / "small.txt"
    small.write_text(Path(train_file).read_text()[:6000])
    common = ["--train_file", small, *TINY, "--eval_steps", 1000, "--checkpointing_steps", "epoch"]
    assert run([*common, "--num_train_epochs", 2, "--output_dir", tmp_path / "epochs"]) == 0
    steps = json.loads((tmp_path / "epochs" / "all_results.json").read_text())["step"]
    assert steps % 2 == 0 and sorted(p.name for p in (tmp_path / "epochs").glob("step_*")) == [
        f"step_{steps // 2}", f"step_{steps}"]
    _reset_accelerate()
    assert run([*common, "--num_train_epochs", 5, "--max_train_steps", 3, "--output_dir", tmp_path / "limit"]) == 0
    assert json.loads((tmp_path / "limit" / "all_results.json").read_text())["step"] == 3  # HF: max steps win
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    assert "the schedule decays to this (default: 0.0001)" in " ".join(capsys.readouterr().out.split())


def test_every_update_skipped_logs_no_loss_and_finishes(tmp_path, train_file, monkeypatch, capsys):
    from gpt2 import GPT2

    forward = GPT2.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out * float("nan") if self.training else out

    monkeypatch.setattr(GPT2, "forward", poisoned)
    assert run([*_four_steps(train_file), "--output_dir", tmp_path / "out", "--on_nonfinite", "skip"]) == 0
    assert set(metrics(tmp_path / "out", "train_loss").values()) == {None}
    assert "loss n/a (every update skipped)" in capsys.readouterr().out


@pytest.mark.slow
def test_shipped_accelerate_config_launches_as_shipped(tmp_path, train_file):
    """`accelerate launch --config_file accelerate_config.yaml scripts/pretrain.py` with the installed
    accelerate, on this CPU, with no flag added to the launcher."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
         str(SCRIPT), "--train_file", train_file, *map(str, TINY), "--max_train_steps", "2", "--eval_steps", "2",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "mixed precision bf16" in proc.stdout and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_training_and_evaluation_read_a_text_file_alike(tmp_path, train_file):
    """Trained on a .txt file and validated on the same file, the model's validation loss is the
    loss evaluate_perplexity.py gives that file with windows of the block size: both read the text
    as it is (blank lines included), so there is no gap between the two numbers."""
    out = tmp_path / "out"
    assert run(["--train_file", train_file, "--validation_file", train_file, *TINY, "--max_train_steps", 30,
                "--eval_steps", 30, "--output_dir", out]) == 0
    val_loss = metrics(out, "val_loss")[30]
    evaluate = load_script(ROOT / "scripts" / "evaluate_perplexity.py")
    report = evaluate.main(["--model_name_or_path", str(out), "--validation_file", train_file,
                            "--max_length", "32", "--stride", "32", "--batch_size", "64"])
    # The same blocks, plus the evaluator's last partial window: equal to well within 1%.
    assert report["nll_per_token"] == pytest.approx(val_loss, rel=5e-3)


@pytest.mark.slow
def test_fsdp_asked_for_on_cpu_stops_instead_of_running_ddp(tmp_path, train_file):
    """Accelerate runs FSDP on GPUs only; on a CPU host `--use_fsdp` would silently become plain data
    parallel. The script says so and stops, every rank, without hanging."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(SCRIPT), "--train_file", train_file, *map(str, TINY),
         "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode != 0
    assert "pretrain.py: error: FSDP was asked for (--use_fsdp)" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained
    assert time.perf_counter() - start < 100


# Test code, not the product's: loaded by every process of a launch through PYTHONPATH. Accelerate
# selects FSDP on GPUs only; this turns the CPU (gloo) run that `accelerate launch --use_fsdp ...`
# starts into the FSDP run it would be on GPUs, with the plugin Accelerate builds from the FSDP_*
# variables that launch sets. Everything after that (prepare's fully_shard, the sharded saves and
# loads, the gathered final model) is Accelerate's and the script's own code.
_FSDP_ON_CPU = """
import os
if os.environ.get("GPT2_SUITE_TEST_FSDP_ON_CPU"):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    init = Accelerator.__init__

    def init_as_fsdp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP

    Accelerator.__init__ = init_as_fsdp
"""


def _launch_fsdp(tmp_path, argv, fsdp_version=2):
    """scripts/pretrain.py on two CPU processes, made FSDP by _FSDP_ON_CPU: launched with the shipped
    accelerate_fsdp2.yaml in fp32, or with `--use_fsdp --fsdp_version 1`."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(_FSDP_ON_CPU)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "GPT2_SUITE_TEST_FSDP_ON_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch",
         *(["--config_file", str(ROOT / "accelerate_fsdp2.yaml")] if fsdp_version == 2 else
           # FSDP1's plugin refuses sync_module_states on CPU before the script could say anything
           ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sync_module_states", "false",
            "--fsdp_cpu_ram_efficient_loading", "false"]),
         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(SCRIPT), *map(str, argv), "--cpu"],
        capture_output=True, text=True, env=env, timeout=600)


def adam_step_bound(beta1: float, beta2: float, step: int) -> float:
    """The largest |update| / lr that AdamW's step `step` (1-based) can make to an element without
    weight decay, over every possible gradient history. With m and v the moving averages of g and
    g^2, Cauchy-Schwarz on sum(beta1^j g) = sum((beta1^2/beta2)^(j/2) beta2^(j/2) g) gives
    |m| / sqrt(v) <= (1 - beta1) / sqrt(1 - beta2) * sqrt(sum_j<t (beta1^2/beta2)^j); the bias
    corrections multiply it by sqrt(1 - beta2^t) / (1 - beta1^t); eps only shrinks it. Step 1 is
    exactly 1: a first step moves every element by lr, whatever the size of its gradient."""
    ratio = sum((beta1 * beta1 / beta2) ** j for j in range(step))
    return (1 - beta1) / (1 - beta2) ** 0.5 * ratio ** 0.5 * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)


def rounding_driven(name: str, param: torch.Tensor, config) -> torch.Tensor:
    """The elements of a parameter whose gradient is zero in exact arithmetic, so that what they
    receive is rounding noise: the key part of each c_attn.bias. q . (k + b) = q . k + q . b adds
    one constant to all of a query's scores, which softmax ignores (not so with RoPE, which rotates b
    differently at each position)."""
    noise = torch.zeros_like(param, dtype=torch.bool)
    if name.endswith("attn.c_attn.bias") and config.position_embedding == "learned":
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        noise[q_dim:q_dim + kv_dim] = True
    return noise


def assert_trained_alike(model, reference, grad_norms, reference_grad_norms, *, lr: float, steps: int):
    """Two runs of the same training (one process against sharded or data-parallel ones): every
    weight equal to fp32 rounding, and every gradient norm (Adam is nearly blind to a gradient's
    scale, so a sum reduced where a mean belongs shows most plainly there), except the weights
    whose gradient is pure rounding noise. Adam divides that noise by its own size, so each such
    element takes a step of up to lr in a direction set by the last bits of the sums, which another
    CPU or another reduction order sets otherwise: those are bounded by what two runs of Adam can do
    to a zero-gradient element, 2 lr sum_t adam_step_bound(t), and no tighter."""
    slack = 2 * lr * sum(adam_step_bound(*gpt2_optim.BETAS, t) for t in range(1, steps + 1))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        noise = rounding_driven(name, p, model.config)
        torch.testing.assert_close(p[~noise], q[~noise], rtol=1e-4, atol=1e-6, msg=f"{name} is not alike")
        assert ((p - q)[noise].abs() <= slack).all(), name
    np.testing.assert_allclose(grad_norms, reference_grad_norms, rtol=1e-5)


def test_adam_step_bound_is_reached_and_never_exceeded():
    """The bound against AdamW itself: the gradient history of Cauchy-Schwarz's equality case
    reaches it at its last step, and random histories of any scale stay under it at every step."""
    beta1, beta2 = gpt2_optim.BETAS

    def updates(history):
        param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([param], lr=1.0, betas=(beta1, beta2), eps=0.0, weight_decay=0.0)
        sizes = []
        for g in history:
            before = param.item()
            param.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
            sizes.append(abs(param.item() - before))
        return sizes

    for steps in (1, 2, 5, 40):
        equality = [(beta1 / beta2) ** (steps - i) for i in range(1, steps + 1)]
        assert updates(equality)[-1] == pytest.approx(adam_step_bound(beta1, beta2, steps), rel=1e-9)
        for scale in (1e-30, 1.0, 1e20):
            for t, size in enumerate(updates((torch.randn(steps, dtype=torch.float64) * scale).tolist()), 1):
                assert size <= adam_step_bound(beta1, beta2, t) * (1 + 1e-12)


def test_the_key_bias_gradient_is_rounding_noise():
    """What assert_trained_alike exempts, in float64: the key part of c_attn.bias gets a gradient
    at rounding level, the query and value parts (and every other parameter) a real one; with
    RoPE the key bias learns too, and nothing is exempt."""
    from gpt2 import GPT2, GPT2Config

    for position_embedding in ("learned", "rope"):
        config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50,
                            position_embedding=position_embedding, attn_impl="eager")
        model = GPT2(config).double()
        for module in model.modules():  # nonzero biases, so every path of the gradient is exercised
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)
        ids = torch.randint(0, config.vocab_size, (3, 17))
        model(ids, labels=ids).backward()
        for name, p in model.named_parameters():
            noise = rounding_driven(name, p, config)
            scale = p.grad.abs().max()
            assert p.grad[~noise].abs().max() > 1e-6 * scale
            if position_embedding == "learned" and name.endswith("c_attn.bias"):
                assert noise.sum() == config.n_embd
                assert p.grad[noise].abs().max() < 1e-13 * scale, name
            else:
                assert not noise.any()


def test_assert_trained_alike_catches_a_wrongly_reduced_gradient():
    """The FSDP test's comparison, on in-process training of two "ranks" that each hold half the
    batch: the mean of their gradients (what a correct all-reduce gives, in another rounding order)
    passes; one rank's gradient alone (no reduction) fails on the weights; so does the sum in
    place of the mean, and its gradient norms are twice the reference's."""
    from gpt2 import GPT2, GPT2Config

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=300, attn_impl="eager")
    batches = [torch.randint(0, config.vocab_size, (4, 32)) for _ in range(4)]
    lr = 3e-3

    def train(reduce):
        torch.manual_seed(0)
        model = GPT2(config)
        opt, _ = gpt2_optim.build_optimizer(model, lr=lr, weight_decay=0.1, min_lr=lr, schedule="constant",
                                            total_steps=len(batches), device=torch.device("cpu"))
        norms = []
        for ids in batches:
            ranks = []
            for half in ids.chunk(2):
                model.zero_grad()
                model(half, labels=half).backward()
                ranks.append([p.grad.clone() for p in model.parameters()])
            for p, *grads in zip(model.parameters(), *ranks):
                p.grad = reduce(grads)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
            opt.step()
        return model, norms

    reference, reference_norms = train(lambda grads: (grads[0] + grads[1]) / 2)
    alike, norms = train(lambda grads: grads[1] / 2 + grads[0] / 2)
    assert_trained_alike(alike, reference, norms, reference_norms, lr=lr, steps=len(batches))
    unreduced, norms = train(lambda grads: grads[0])
    with pytest.raises(AssertionError, match="is not alike"):
        assert_trained_alike(unreduced, reference, norms, reference_norms, lr=lr, steps=len(batches))
    summed, norms = train(lambda grads: grads[0] + grads[1])
    with pytest.raises(AssertionError):
        assert_trained_alike(summed, reference, norms, reference_norms, lr=lr, steps=len(batches))
    np.testing.assert_allclose(norms[0], 2 * reference_norms[0], rtol=1e-5)


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_saves_resumes_and_samples(tmp_path, train_file):
    """The real script under FSDP2 (two gloo processes, fp32): the losses equal one process's on the
    same global batch; resuming from a sharded step_N continues bit for bit, with activation
    checkpointing on (it changes no gradient); the final model.safetensors, gathered from the
    shards, loads in GPT2 and in transformers and holds the one-process run's weights; the end-of-run
    sample runs on that gathered copy. Then once with our Triton kernels (the
    interpreter)."""
    common = ["--train_file", train_file, *TINY, "--max_train_steps", "4", "--eval_steps", "2",
              "--gradient_accumulation_steps", "2"]
    common[common.index("--per_device_train_batch_size") + 1] = "2"
    fsdp = _launch_fsdp(tmp_path, [*common, "--output_dir", tmp_path / "fsdp"])
    assert fsdp.returncode == 0, fsdp.stdout[-3000:] + fsdp.stderr[-3000:]
    assert "2 x cpu (FSDP, mixed precision no)" in fsdp.stdout
    assert "Sample:" in fsdp.stdout and "returned a view tensor" not in fsdp.stderr
    assert (tmp_path / "fsdp" / "step_2" / "pytorch_model_fsdp_0").is_dir()  # sharded: a DCP folder
    assert json.loads((tmp_path / "fsdp" / "all_results.json").read_text())["ranks_hold_identical_weights"] is None

    one_argv = [*common, "--output_dir", tmp_path / "one"]
    one_argv[one_argv.index("--per_device_train_batch_size") + 1] = "4"
    assert run(one_argv) == 0
    a, b = metrics(tmp_path / "one", "train_loss"), metrics(tmp_path / "fsdp", "train_loss")
    assert list(a) == list(b) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-5)
    np.testing.assert_allclose(list(metrics(tmp_path / "fsdp", "val_loss").values()),
                               list(metrics(tmp_path / "one", "val_loss").values()), rtol=1e-5)

    resumed = _launch_fsdp(tmp_path, [*common, "--output_dir", tmp_path / "resumed", "--gradient_checkpointing",
                                      "--resume_from_checkpoint", tmp_path / "fsdp" / "step_2"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "every block recomputed in backward" in resumed.stdout
    for key in ("train_loss", "val_loss"):
        straight, again = metrics(tmp_path / "fsdp", key), metrics(tmp_path / "resumed", key)
        assert [again[s] for s in (3, 4) if s in again] == [straight[s] for s in (3, 4) if s in straight], key
    assert list(metrics(tmp_path / "resumed", "train_loss")) == [3, 4]

    from gpt2 import GPT2

    model = GPT2.from_pretrained(tmp_path / "fsdp")
    same = GPT2.from_pretrained(tmp_path / "one")  # the one-process run's final weights
    assert_trained_alike(model, same, list(metrics(tmp_path / "fsdp", "grad_norm").values()),
                         list(metrics(tmp_path / "one", "grad_norm").values()), lr=3e-3, steps=4)

    triton = _launch_fsdp(tmp_path, [*common, "--output_dir", tmp_path / "triton", "--kernels", "triton",
                                     "--max_train_steps", "2"])
    assert triton.returncode == 0, triton.stdout[-3000:] + triton.stderr[-3000:]
    assert "kernels    attention triton, LayerNorm triton" in triton.stdout and "Sample:" in triton.stdout
    np.testing.assert_allclose(list(metrics(tmp_path / "triton", "train_loss").values()),
                               [b[1], b[2]], rtol=1e-4)

    # last, so that a machine without transformers (a dev dependency) still runs everything above
    hf = pytest.importorskip("transformers").GPT2LMHeadModel.from_pretrained(str(tmp_path / "fsdp"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fsdp1_is_refused_with_one_line(tmp_path, train_file):
    """`accelerate launch --use_fsdp` without --fsdp_version 2 means FSDP1, which the script does not
    run: one line naming the flag, on every rank, before any data is read."""
    proc = _launch_fsdp(tmp_path, ["--train_file", train_file, *TINY, "--max_train_steps", "2",
                                   "--output_dir", tmp_path / "out"], fsdp_version=1)
    assert proc.returncode != 0
    assert proc.stderr.count("pretrain.py: error: FSDP1 is not supported: add --fsdp_version 2") == 2, \
        proc.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_worker_exits_when_its_launcher_dies(tmp_path):
    """A worker of a killed launcher stops instead of training on as an orphan."""
    import signal

    child_pid = tmp_path / "child.pid"
    # The pid is written once the watch has started (it notes its parent then): killed earlier, the
    # launcher would already be gone when the worker looks for it.
    worker = (f"import os, sys, time; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import cli; "
              f"cli.exit_with_launcher('worker', poll_s=0.1); "
              f"open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    launcher = (f"import os, subprocess, sys, time; "
                f"subprocess.Popen([sys.executable, '-c', {worker!r}], env={{**os.environ, 'LOCAL_RANK': '0'}}); "
                f"time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.time() + 30
    while not (child_pid.exists() and child_pid.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(child_pid.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):  # up to 10 s
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the orphaned worker was still running 10 s after its launcher died")


def test_flops_per_token_and_mfu_against_flop_counter(tmp_path, train_file, monkeypatch):
    """The model's flops_per_token (6N + 12 L H hs T, the PaLM estimate pretrain's MFU uses) against
    torch's FlopCounterMode over a real training step of the eager model, which counts every matmul
    (attention's T x T scores in full, as SDPA's formula does): equal once the estimate's two
    simplifications are taken out, each counted exactly: 6 FLOPs per token for every parameter
    outside a matmul (biases, LayerNorm gains), and the LM head's missing last target per row."""
    from torch.utils.flop_counter import FlopCounterMode

    from gpt2 import GPT2, GPT2Config

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100, attn_impl="eager")
    model = GPT2(config)
    B, T = 2, 16
    ids = torch.randint(0, config.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).backward()
    counted = counter.get_total_flops()
    outside_matmuls = sum(p.numel() for p in model.parameters() if p.ndim < 2)
    head = config.vocab_size * config.n_embd
    estimate = model.flops_per_token(T) * B * T
    assert estimate - counted == 6 * outside_matmuls * B * T + 6 * head * B  # exactly these two, nothing else
    assert 0 < (estimate - counted) / counted < 0.04  # 3.7% for this toy; ~0.1% + 1/T of the head for GPT-2

    # pretrain's MFU is tokens/s per device x flops_per_token / the device's peak.
    monkeypatch.setattr(pretrain, "peak_flops", lambda name: 1e12)
    assert run(["--train_file", train_file, *TINY, "--max_train_steps", 2, "--eval_steps", 2,
                "--output_dir", tmp_path / "out"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "mfu" in r]
    tiny = GPT2.from_pretrained(tmp_path / "out")
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * tiny.flops_per_token(32) / 1e12, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["sdpa", "triton"])
def test_compile_trains_like_eager(tmp_path, train_file, kernels):
    """--compile (Accelerate's torch.compile, inductor, here on CPU): the same losses as the
    uncompiled run, to fp32 rounding (inductor fuses and reorders fp32 arithmetic). With triton,
    our kernels are custom ops that inductor calls as they are (here: in Triton's interpreter)."""
    common = ["--train_file", train_file, *TINY, "--max_train_steps", 3, "--eval_steps", 3, "--kernels", kernels]
    assert run([*common, "--output_dir", tmp_path / "eager"]) == 0
    _reset_accelerate()
    assert run([*common, "--output_dir", tmp_path / "compiled", "--compile"]) == 0
    eager, compiled = metrics(tmp_path / "eager", "train_loss"), metrics(tmp_path / "compiled", "train_loss")
    assert list(eager) == list(compiled) == [1, 2, 3]
    np.testing.assert_allclose([compiled[s] for s in eager], [eager[s] for s in eager], rtol=1e-5)
    val = {name: metrics(tmp_path / name, "val_loss")[3] for name in ("eager", "compiled")}
    np.testing.assert_allclose(val["compiled"], val["eager"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_document_masking_trains_alike_across_kernels(tmp_path, kernels):
    """--document_masking on packed JSON documents: the same losses with the dense mask (sdpa) as
    with `kernels` (eager: the readable mask; triton: our kernel, which skips other documents'
    blocks), fp32; and different losses from an unmasked run, so the mask does something."""
    rng = np.random.default_rng(1)
    words = "the model reads tokens and predicts the next one".split()
    rows = [json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(2, 12))))}) for _ in range(600)]
    (tmp_path / "docs.jsonl").write_text("\n".join(rows) + "\n")
    common = ["--train_file", tmp_path / "docs.jsonl", *TINY, "--max_train_steps", 3, "--eval_steps", 3]
    runs = {}
    for name, extra in (("sdpa", ["--kernels", "sdpa"]), (kernels, ["--kernels", kernels]), ("unmasked", [])):
        masking = [] if name == "unmasked" else ["--document_masking", "--restart_positions"]
        _reset_accelerate()
        assert run([*common, *extra, *masking, "--output_dir", tmp_path / name]) == 0
        runs[name] = metrics(tmp_path / name, "train_loss")
    np.testing.assert_allclose([runs[kernels][s] for s in (1, 2, 3)], [runs["sdpa"][s] for s in (1, 2, 3)], rtol=2e-5)
    assert abs(runs["unmasked"][3] - runs["sdpa"][3]) > 1e-3


def _readme_commands(script: str) -> list[list[str]]:
    """The README's `python scripts/<script> ...` commands, continuation lines joined, comments cut."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(f"python scripts/{script} "):
                commands.append(shlex.split(line, comments=True)[2:])
    return commands


@pytest.mark.slow
def test_readme_commands_work_after_the_no_flag_run(tmp_path, monkeypatch):
    """What the README tells someone with only the clone to run on `out` after pretraining works as
    written, offline: the built-in corpus, no file outside the checkout. (Evaluation is cut to the
    first texts with --max_samples, to keep the test short; commands that need a network or files
    the user brings are left out, and counted.)"""
    assert "../shared" not in (ROOT / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert run([*TINY, "--max_train_steps", 2, "--eval_steps", 2, "--output_dir", "out"]) == 0
    evaluate, generate = (load_script(ROOT / "scripts" / name) for name in ("evaluate_perplexity.py", "generate.py"))
    ran = {"evaluate_perplexity.py": 0, "generate.py": 0}
    for script, main, extra in (("evaluate_perplexity.py", evaluate.main, ["--max_samples", "2"]),
                                ("generate.py", generate.main, [])):
        for argv in _readme_commands(script):
            if argv[argv.index("--model_name_or_path") + 1] != "out" or "--validation_file" in argv:
                continue  # another model, or text the user brings
            if "--dataset_name" in argv and argv[argv.index("--dataset_name") + 1] != "builtin:pydocs":
                continue  # a hub dataset: needs a network
            _reset_accelerate()
            assert main([*argv, *extra]), argv
            ran[script] += 1
    assert ran == {"evaluate_perplexity.py": 2, "generate.py": 2}, ran


def test_a_run_is_a_file_it_saves_and_can_run_again(tmp_path, train_file):
    """Every run writes its resolved settings (run_config.yaml, with versions and commit, in the
    output dir and in each step_N); --config on that file runs it again with the same losses, and
    a flag on the command line wins over the file."""
    import yaml

    first = tmp_path / "first"
    assert run([*_four_steps(train_file), "--output_dir", first]) == 0
    saved = first / "run_config.yaml"
    settings = yaml.safe_load(saved.read_text())
    assert settings["max_train_steps"] == 4 and settings["train_file"] == str(train_file)
    assert "torch " in saved.read_text().splitlines()[1] and "commit" in saved.read_text().splitlines()[1]
    assert (first / "step_4" / "run_config.yaml").read_text() == saved.read_text()
    _reset_accelerate()
    assert run(["--config", saved, "--output_dir", tmp_path / "again"]) == 0
    assert metrics(tmp_path / "again", "train_loss") == metrics(first, "train_loss")
    _reset_accelerate()
    assert run(["--config", saved, "--output_dir", tmp_path / "shorter", "--max_train_steps", 2]) == 0
    assert list(metrics(tmp_path / "shorter", "train_loss")) == [1, 2]


@pytest.mark.parametrize("content, fragment", [
    ("learning_rate: [1, 2]\n", "learning_rate takes one value"),
    ("learning_rat: 0.1\n", "'learning_rat' is not a flag of this program"),
    ("eval_steps: abc\n", "eval_steps: invalid value 'abc'"),
    ("lr_scheduler_type: cosine_typo\n", "lr_scheduler_type: 'cosine_typo' is not one of"),
    ("streaming: 3\n", "streaming must be true or false"),
    ("eval_steps: 0\n", "eval_steps: invalid value '0' (must be at least 1, got 0)"),
    ("seed: -1\n", "seed: invalid value '-1' (must be in [0, 4294967295]"),
    ("- a\n- b\n", "expected a mapping of flag names to values"),
    ("a: [b\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line_naming_the_key_and_file(tmp_path, content, fragment):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    message = expect_input_error(pretrain.main, ["--config", config, "--output_dir", tmp_path / "out"], fragment)
    assert str(config) in message


def test_fsdp2_reduces_gradients_in_fp32_under_bf16():
    """Accelerate's bf16 policy for FSDP2 reduce-scatters gradients in bf16; the script keeps the
    bf16 gathers and compute and moves the reduction to fp32. An fp32 policy is left alone."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    for given, reduced in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy={
            "param_dtype": given, "reduce_dtype": given})
        pretrain.fsdp2_settings(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
        assert plugin.mixed_precision_policy.param_dtype == given
        assert plugin.mixed_precision_policy.reduce_dtype == reduced
