"""One kind of input error, and the one place a command-line program reports it.

Everything the user can get wrong (a flag, a file, a dataset name, a checkpoint, a tokenizer)
raises InputError or a subclass, with a message that says what is wrong and what would work.
Each program (scripts/, benchmarks/) runs inside ``exit_on_input_error(prog)``, which prints that
message as one line on stderr and exits with status 2, as argparse does for a bad flag:

    def main(argv=None):
        with exit_on_input_error("pretrain.py"):
            args = parse_args(argv)     # an ArgumentParser from this module: bad flags are InputErrors
            ...

Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys


class InputError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do instead."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the description as written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag raised as InputError (reported like every other input error:
    one line, exit status 2) instead of printing the usage block, defaults shown in --help, and no
    abbreviations: `--lr 1e-3` is an unknown flag, not silently `--lr_scheduler_type 1e-3`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise InputError(f"{message} (see --help)")


def bounded_int(minimum: int, maximum: int | None = None, why: str = ""):
    """An argparse type: an integer in [minimum, maximum], declared at the flag, so that a value out
    of range is a bad flag (one line, exit status 2) wherever it comes from (the command line or a
    --config file), before anything runs. why, if given, says where the bound comes from."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{f' ({why})' if why else ''}, got {value}")
        return value

    integer.__name__ = "int"  # argparse names the type in its messages
    return integer


@contextlib.contextmanager
def exit_on_input_error(prog: str):
    """Turn an InputError raised inside into `prog: error: message` on stderr and exit status 2."""
    try:
        yield
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def first_line(err: BaseException) -> str:
    """An exception from a library we call, shortened to its type and first line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
