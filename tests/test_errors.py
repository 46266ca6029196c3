"""gpt2/errors.py: one input-error type, and every program reports it the same way (one line on
stderr, exit status 2); each module's own error is a subclass, so one except clause catches all."""

import pytest
from conftest import expect_input_error

from gpt2.data import DataError
from gpt2.errors import ArgumentParser, InputError, exit_on_input_error
from gpt2.evaluation import EvaluationInputError
from gpt2.hf import CheckpointNotFoundError
from gpt2.hub import HubError
from gpt2.registry import KernelUnavailableError
from gpt2.tokenizer import TokenizerNotFoundError


@pytest.mark.parametrize("error, also", [
    (DataError, ValueError),
    (EvaluationInputError, ValueError),
    (TokenizerNotFoundError, OSError),
    (CheckpointNotFoundError, FileNotFoundError),
    (HubError, OSError),
    (KernelUnavailableError, RuntimeError),
])
def test_module_errors_are_input_errors(error, also):
    """Each is an InputError for the scripts, and keeps the builtin type a library caller expects."""
    assert issubclass(error, InputError) and issubclass(error, also)


def _main(argv):
    """A program in the house style: parse, then work; input errors leave through one door."""
    with exit_on_input_error("prog.py"):
        parser = ArgumentParser()
        parser.add_argument("--steps", type=int, required=True)
        args = parser.parse_args(argv)
        if args.steps < 1:
            raise DataError(f"--steps must be at least 1, got {args.steps}")
        return args.steps


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ([], "the following arguments are required: --steps"),
    (["--steps", "1", "--nope"], "unrecognized arguments: --nope"),
    (["--steps", "0"], "prog.py: error: --steps must be at least 1, got 0"),
])
def test_bad_flags_and_input_exit_2_with_one_line(argv, fragment):
    expect_input_error(_main, argv, fragment)


def test_other_exceptions_keep_their_traceback():
    with pytest.raises(ZeroDivisionError), exit_on_input_error("prog.py"):
        raise ZeroDivisionError("a bug, not bad input")
    assert _main(["--steps", "3"]) == 3


@pytest.mark.parametrize("module, argv, fragment", [
    ("attention", ["--dtype", "fp8"], "invalid choice: 'fp8'"),
    ("attention", ["--replot"], "--replot needs --output_dir"),
    ("layer_norm", ["--hidden", "x"], "invalid int value"),
    ("targets", ["--nope"], "unrecognized arguments"),
])
def test_benchmarks_report_input_errors_the_same_way(module, argv, fragment, tmp_path):
    import importlib

    bench = importlib.import_module(f"benchmarks.{module}")
    expect_input_error(bench.main, argv, fragment)


@pytest.mark.parametrize("script, argv", [
    ("pretrain.py", ["--lr", "1e-3"]),  # would have been --lr_scheduler_type 1e-3
    ("evaluate_perplexity.py", ["--model_name_or_path", "out", "--validation", "x.txt"]),
    ("generate.py", ["--model_name_or_path", "out", "--temp", "0"]),
])
def test_no_flag_is_read_as_an_abbreviation(script, argv):
    """argparse's prefix matching is off in every script: a shortened or misspelt flag is an error,
    not the first flag it happens to begin."""
    from pathlib import Path

    from conftest import load_script

    module = load_script(Path(__file__).resolve().parents[1] / "scripts" / script)
    with pytest.raises(InputError, match="unrecognized arguments"):
        module.parse_args(argv)
