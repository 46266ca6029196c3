"""recipes/: each file is a valid --config for scripts/pretrain.py, names where it comes from, and
builds its plan (--dry_run) with the data swapped for a local file: the model it names, the tokens
per step and the steps it asks for, and nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_script

from gpt2 import GPT2, GPT2Config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
pretrain = load_script(ROOT / "scripts" / "pretrain.py")
DATA_KEYS = ("dataset_name", "dataset_config_name", "train_file", "tokenizer_name", "output_dir")


@pytest.fixture(autouse=True)
def fresh_accelerate(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_the_recipes_are_there():
    assert {p.name for p in RECIPES} == {"default.yaml", "shakespeare-char.yaml", "gpt2-124m-openwebtext.yaml",
                                         "gpt2-124m-fineweb10b.yaml", "gpt2-xl-fsdp2.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_is_a_valid_config_that_names_its_source(recipe):
    """Every key is a flag and every value passes that flag's checks; the header says where the
    settings come from (a repository and commit, or the no-flag run) and what the run should reach."""
    args = pretrain.parse_args(["--config", str(recipe)])
    assert args.config == str(recipe)
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"at\s+(# )?commit [0-9a-f]{7}|no-flag run", header), recipe.name
    assert re.search(r"loss|HellaSwag", header), recipe.name


def test_the_default_recipe_is_the_no_flag_run():
    with_file = vars(pretrain.parse_args(["--config", str(ROOT / "recipes" / "default.yaml")]))
    without = vars(pretrain.parse_args([]))
    assert {k: v for k, v in with_file.items() if k != "config"} == {k: v for k, v in without.items() if k != "config"}


@pytest.fixture
def local_text(tmp_path):
    """Enough prose for a few batches of 16 x 1024 tokens, one paragraph per document."""
    rng = np.random.default_rng(0)
    words = "the model reads tokens and predicts the next one while its layers attend to earlier words".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 200)))) + "." for _ in range(3000)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_builds_its_plan(recipe, local_text, tmp_path, capsys):
    """--dry_run of the recipe with its data swapped for a local file (and a BPE trained on it): the
    parameters of the model it names, batch x block x accumulation tokens per step (one process
    here), its steps and their tokens; no output directory appears. A streamed recipe probes its
    stream instead of counting it."""
    settings = yaml.safe_load(recipe.read_text())
    local = {k: v for k, v in settings.items() if k not in DATA_KEYS}
    config_file = tmp_path / recipe.name
    config_file.write_text(yaml.safe_dump(local))
    out = tmp_path / "out"
    streamed = ["--validation_file", local_text] if settings.get("streaming") else []  # a stream holds nothing out
    assert pretrain.main(["--config", config_file, "--train_file", local_text, *streamed, "--dry_run", "--cpu",
                          "--output_dir", out]) == 0
    plan = capsys.readouterr().out.split("Plan (--dry_run")[1]
    assert not out.exists()

    args = pretrain.parse_args(["--config", str(recipe)])
    config = GPT2Config.from_name_or_path(args.config_name)
    if args.config_overrides:
        config = config.with_overrides(args.config_overrides)
    with torch.device("meta"):  # the vocabulary is the local BPE's where the recipe doesn't fix it
        without_embeddings = GPT2(config).num_parameters(exclude_embeddings=True)
    block = args.block_size or config.n_positions
    step_tokens = args.per_device_train_batch_size * block * args.gradient_accumulation_steps
    assert f" ({without_embeddings:,} without embeddings)" in plan
    assert f"per step       {step_tokens:,} tokens = " in plan
    assert f"steps          {args.max_train_steps:,} -> {args.max_train_steps * step_tokens:,} tokens" in plan
    if args.streaming:
        assert f"a first batch of ({args.per_device_train_batch_size}, {block + 1}) token ids" in plan \
            or f"a first batch of ({args.per_device_train_batch_size}, {block}) token ids" in plan
    else:
        assert "blocks of" in plan and "steps per epoch" in plan
    assert ("blocks recomputed" in plan) == args.gradient_checkpointing


HUB_RECIPES = [r for r in RECIPES if "dataset_name" in yaml.safe_load(r.read_text())]


@pytest.mark.parametrize("recipe", HUB_RECIPES, ids=lambda p: p.stem)
def test_a_recipe_plans_offline_what_needs_no_data(recipe, tmp_path, capsys, monkeypatch):
    """--dry_run of a recipe whose data (and tokenizer) is on a Hub this machine can't reach: exit 0
    with the plan of what needs neither (the model at the recipe's vocabulary, tokens per step,
    steps, memory), and the data and epochs said to be unknown, with why."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the Hub can't be reached, quickly
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "out"
    assert pretrain.main(["--config", recipe, "--dry_run", "--cpu", "--output_dir", out]) == 0
    plan = capsys.readouterr().out.split("Plan (--dry_run")[1]
    assert not out.exists()

    args = pretrain.parse_args(["--config", str(recipe)])
    config = GPT2Config.from_name_or_path(args.config_name).with_overrides(args.config_overrides or "")
    with torch.device("meta"):
        params = GPT2(config).num_parameters()
    step_tokens = args.per_device_train_batch_size * (args.block_size or config.n_positions) \
        * args.gradient_accumulation_steps
    assert f"parameters     {params:,} (" in plan
    assert f"a vocabulary of {config.vocab_size:,} assumed (the tokenizer was not read)" in plan
    assert f"steps          {args.max_train_steps:,} -> {args.max_train_steps * step_tokens:,} tokens" in plan
    assert f"data           not read: dataset {args.dataset_name!r} is on the Hub, which can't be reached" in plan
    assert "epochs unknown (the data was not read)" in plan and "memory/device  about" in plan


def test_a_dry_run_still_refuses_what_is_not_the_network(tmp_path, monkeypatch):
    """Only an unreachable Hub is planned around: a local file that isn't there is the run's error."""
    from conftest import expect_input_error

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    expect_input_error(pretrain.main, ["--train_file", tmp_path / "missing.txt", "--dry_run", "--output_dir",
                                       tmp_path / "out"], "missing.txt")
