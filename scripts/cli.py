"""What the scripts share: the flags every script has, dtype names, the CPU decision, and loading a
checkpoint for inference. Each script imports it first (`import cli`; a script's own folder is
on sys.path when it runs), and it makes the checkout importable, so the scripts run from a
checkout without `pip install -e .`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: gpt2/ and gpt2_kernels/

import torch  # noqa: E402

from gpt2.errors import ArgumentParser, InputError, exit_on_input_error, first_line  # noqa: E402,F401 (re-exported)
from gpt2.registry import KERNEL_CHOICES, resolve_kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = ("auto", *KERNEL_CHOICES)
KERNELS_HELP = ("auto = our Triton kernels on a GPU family where a committed benchmark shows them faster "
                "(gpt2.registry.TRITON_TRAINING_SPEEDUP; attention by SDPA when training with dropout), "
                "PyTorch SDPA elsewhere")


def parse_args(parser, argv=None, check=None):
    """parser's flags, from the command line and from `--config FILE.yaml` (a mapping of flag names,
    without the dashes, to values; a list for a flag that takes several): a flag given on the
    command line wins over the file. Each key is checked as its flag is, with its own type and
    choices, and a bad one is one line naming the key and the file; check(args), the script's own
    checks, names the file too when the value it refuses came from there."""
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="read flags from this YAML file (keys are flag names); the command line wins")
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    from_file = _argv_from_config(parser, path, argv) if path else {}
    args = parser.parse_args([arg for args_of_key in from_file.values() for arg in args_of_key] + argv)
    try:
        if check is not None:
            check(args)
    except InputError as err:
        key = next((k for k in from_file if str(err).startswith(f"--{k} ")), None)
        if key:
            err.args = (f"{err} (set by {key!r} in {path})",)
        raise
    return args


def _argv_from_config(parser, path: str, argv: list[str]) -> dict[str, list[str]]:
    """{key: the flag and value(s) it stands for} from the YAML file, leaving out flags the command
    line gives; InputError naming the file and the key for anything the flag would refuse."""
    import argparse

    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"--config {path}: can't read it ({err.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"--config {path}: not valid YAML ({first_line(err)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a mapping of flag names to values, got a {type(values).__name__}")
    flags = {action.option_strings[0][2:]: action for action in parser._actions
             if action.option_strings and action.option_strings[0].startswith("--")}
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    result = {}
    for key, value in values.items():
        action = flags.get(str(key))
        if action is None or key in ("config", "help"):
            raise InputError(f"{path}: {key!r} is not a flag of this program (see --help)")
        if value is None or set(action.option_strings) & given:  # null: the default; the command line wins
            continue
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise InputError(f"{path}: {key} must be true or false, got {value!r}")
            result[key] = [option] if value else []
            continue
        several = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
        items = value if several and isinstance(value, list) else [value]
        if any(isinstance(item, (dict, list)) for item in items):
            raise InputError(f"{path}: {key} takes {'values' if several else 'one value'}, got {value!r}")
        texts = [str(item) for item in items]
        for text in texts:
            try:
                converted = action.type(text) if action.type else text
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise InputError(f"{path}: {key}: invalid value {text!r} ({err})") from None
            if action.choices is not None and converted not in action.choices:
                raise InputError(f"{path}: {key}: {text!r} is not one of {list(action.choices)}")
        if isinstance(action, argparse._AppendAction):
            result[key] = [arg for text in texts for arg in (option, text)]
        else:
            result[key] = [option, *texts]
    return result


def add_checkpoint_flags(parser, *, required: bool, model_help: str, tokenizer_help: str) -> None:
    parser.add_argument("--model_name_or_path", required=required, default=None, help=model_help)
    parser.add_argument("--tokenizer_name", default=None, help=tokenizer_help)


def add_device_flags(parser, *, dtype: bool = True) -> None:
    """--kernels, --dtype (for inference; training takes Accelerate's --mixed_precision) and --cpu."""
    parser.add_argument("--kernels", choices=KERNELS, default="auto", help=KERNELS_HELP)
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights and activations")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")


def use_cpu(requested: bool) -> bool:
    """Accelerator(cpu=...): --cpu, or several processes on a host without CUDA (torchrun,
    `accelerate launch --multi_gpu --num_processes 2 ... --cpu`), where Accelerate sets up gloo
    only when told cpu=True; otherwise each process would run alone."""
    return requested or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def exit_with_launcher(prog: str, poll_s: float = 1.0) -> None:
    """A worker started by a launcher (accelerate launch, torchrun: LOCAL_RANK is set) exits when the
    launcher dies, instead of training on as an orphan nobody can see: a daemon thread watches
    the parent process and ends this one when it is gone."""
    if "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"{prog}: the launcher (pid {parent}) is gone; this worker stops", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


@contextlib.contextmanager
def about(flag: str):
    """Report the library's InputErrors raised inside as this flag's: `--flag value: what is wrong`
    (the library names the problem, the script the flag)."""
    try:
        yield
    except InputError as err:
        err.args = (f"{flag}: {err}",)
        raise


@contextlib.contextmanager
def stop_on_collective_timeout(prog: str, rank: int, timeout_s: int):
    """A collective that timed out (another process stopped, hung or died) ends this process with
    one line naming it and the timeout, exit status 1, instead of a page of backend traceback."""
    try:
        yield
    except RuntimeError as err:  # gloo and NCCL report it as RuntimeError or its DistBackendError
        text = str(err).lower()
        if "timed out" not in text and "timeout" not in text:
            raise
        print(f"{prog}: error: process {rank} waited {timeout_s} s (--ddp_timeout) for the other processes at a "
              f"collective and gave up: one of them stopped, hung or died ({first_line(err)[:200]})",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@contextlib.contextmanager
def ending(accelerator):
    """Run the body, then end the run on every path out: trackers closed and the process group
    destroyed (a process group left alive can hang its process at exit)."""
    try:
        yield accelerator
    finally:
        accelerator.end_training()


def load_model_and_tokenizer(args, device: torch.device):
    """--model_name_or_path (ours, HF GPT-2, or a step_N checkpoint of scripts/pretrain.py) and its
    tokenizer (--tokenizer_name, default the model's), with --kernels, on device in --dtype, ready
    for inference."""
    from gpt2.checkpoint import load_model
    from gpt2.tokenizer import load_tokenizer

    model = load_model(args.model_name_or_path)
    model.set_kernels(*resolve_kernels(args.kernels, torch.device(device).type))
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{model.config.vocab_size}: they don't belong together (see --tokenizer_name)"
        )
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval(), tokenizer


def tokenizer_notes(args, model, tokenizer) -> list[str]:
    """What a user should know before trusting the numbers or samples: a tokenizer smaller than the
    model's vocabulary (its extra ids are never sampled), and a --tokenizer_name other than the one
    saved with the checkpoint."""
    from gpt2.tokenizer import load_tokenizer

    notes, size = [], tokenizer.get_vocab_size()
    if size < model.config.vocab_size:
        notes.append(f"note: the tokenizer has {size:,} tokens and the model's vocabulary {model.config.vocab_size:,}; "
                     f"ids from {size:,} on are never sampled")
    saved = Path(args.model_name_or_path) / "tokenizer.json"
    if args.tokenizer_name and saved.is_file():
        own = load_tokenizer(saved)
        if own.get_vocab(with_added_tokens=True) != tokenizer.get_vocab(with_added_tokens=True):
            notes.append(f"note: --tokenizer_name {args.tokenizer_name} ({size:,} tokens) is not the tokenizer "
                         f"saved with the checkpoint ({own.get_vocab_size():,} tokens, {saved})")
    return notes
