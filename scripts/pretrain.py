"""Pretrain GPT-2 with Hugging Face Accelerate on Hugging Face datasets.

With no flags: the gpt2-tiny preset on the built-in offline corpus (builtin:pydocs), a BPE
tokenizer trained on it, on whatever device is there (a few minutes on a 2-core CPU).

    python scripts/pretrain.py                                        # one process, no flags
    accelerate launch scripts/pretrain.py                             # the same through Accelerate
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 scripts/pretrain.py \\
        --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \\
        --tokenizer_name gpt2 --config_name gpt2 --block_size 1024     # 8 GPUs, bf16
    accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py --cpu   # two CPU processes (gloo)
    python scripts/pretrain.py --train_file train.txt --validation_file val.txt
    python scripts/pretrain.py --output_dir out --resume_from_checkpoint latest

Flag names follow transformers' examples/pytorch/language-modeling/run_clm_no_trainer.py.
Checkpoints go to OUTPUT_DIR/step_N (accelerator.save_state + the data position + a completion
marker); the final model, config and tokenizer go to OUTPUT_DIR in Hugging Face format.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import cli  # first: makes the checkout importable
import torch
from accelerate import Accelerator
from accelerate.utils import (
    AutocastKwargs,
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gpt2 import GPT2, PRESETS, GPT2Config, optim
from gpt2 import checkpoint as ckpt
from gpt2 import data as gdata
from gpt2.documents import WithDocumentIds, document_kwargs
from gpt2.errors import InputError, bounded_int, exit_on_input_error, first_line
from gpt2.evaluation import sequence_nll
from gpt2.files import atomic_write_text, remove_stale_temporaries
from gpt2.graphed_step import GraphedStep, graph_problem
from gpt2.hub import unreachable_on_hub
from gpt2.loss import IGNORE_INDEX
from gpt2.provenance import git_commit, versions
from gpt2.registry import KernelUnavailableError, auto_kernels, resolve_kernels
from gpt2.throughput import ThroughputWindow, device_name, estimate_memory, mfu, peak_flops, peak_memory
from gpt2.tokenizer import (
    SAVED_TOKENIZER_FILES,
    eos_token_id,
    load_tokenizer,
    require_eos_token_id,
    save_tokenizer,
    train_tokenizer,
)

TOKENIZER_TRAINING_CHARS = 200_000_000  # train the BPE on at most this much text (a sample of big corpora)
DEFAULT_TRAIN_STEPS = 400  # the no-flag run: about 6 minutes on 2 CPU cores
TRACKER_PROJECT = "gpt2-pretrain"  # Accelerate's trackers log under OUTPUT_DIR/TRACKER_PROJECT
RUN_CONFIG = "run_config.yaml"  # the run's resolved settings, in OUTPUT_DIR and every step_N: --config reads it


class _TiedWeightsNotice(logging.Filter):
    """save_state warns on every checkpoint that the LM head shares the embedding's tensor and was
    saved once; that is by design here (load_state re-ties it), so that one line is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def main(argv=None) -> int:
    """Set up, train, save: 0 when done, 1 when a non-finite step stopped the run, 2 on bad input."""
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())
    cli.exit_with_launcher("pretrain.py")
    with exit_on_input_error("pretrain.py"):
        args = parse_args(argv)
        with cli.ending(build_accelerator(args)) as accelerator, contextlib.ExitStack() as held:
            if accelerator.is_main_process and not args.dry_run:  # one run at a time in an output directory
                with cli.about(f"--output_dir {args.output_dir}"):
                    held.enter_context(ckpt.locked_output_dir(args.output_dir))
            with cli.stop_on_collective_timeout("pretrain.py", accelerator.process_index, args.ddp_timeout):
                run = setup_run(args, accelerator)
                return 0 if run is None else fit(run)


# --------------------------------------------------------------------------- flags


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_data_flags(parser.add_argument_group("data"))
    _add_model_flags(parser.add_argument_group("model and tokenizer"))
    _add_training_flags(parser.add_argument_group("training"))
    _add_output_flags(parser.add_argument_group("evaluation, logging and checkpoints"))
    args = cli.parse_args(parser, argv, check=validate_args)
    if args.max_train_steps is None and not args.num_train_epochs:
        args.max_train_steps = DEFAULT_TRAIN_STEPS
    _check_warmup(args)  # once the steps are known; again in setup_run when epochs set them
    if args.checkpointing_steps is None:
        args.checkpointing_steps = args.eval_steps
    return args



def validate_args(args) -> None:
    """Values argparse accepts but training can't use: InputError naming the flag, before any data loads."""
    positive = {"learning_rate": "", "max_grad_norm": " (0 clips every update to nothing)",
                "num_train_epochs": ""}
    for name, why in positive.items():
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InputError(f"--{name} must be positive and finite{why}, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise InputError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ("min_lr", "weight_decay"):
        if not (getattr(args, name) >= 0 and math.isfinite(getattr(args, name))):
            raise InputError(f"--{name} must be >= 0 and finite, got {getattr(args, name)}")
    if args.min_lr > args.learning_rate:
        raise InputError(f"--min_lr ({args.min_lr:g}) is above --learning_rate ({args.learning_rate:g}); the "
                         f"schedule decays from the learning rate down to min_lr")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise InputError("--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir "
                         "deletes it: give one of them")
    if args.streaming and (args.num_train_epochs or args.checkpointing_steps == "epoch"):
        raise InputError("--streaming runs by --max_train_steps; a stream has no known epoch length")
    if args.restart_positions and not args.document_masking:
        raise InputError("--restart_positions needs --document_masking (positions restart at each document)")
    if args.with_tracking:
        args.report_to = check_trackers(args.report_to)


def run_config(args) -> str:
    """The run's resolved settings as a --config file (keys are flag names), headed by the versions
    and commit it ran with: `--config OUTPUT_DIR/run_config.yaml` runs it again. Resuming and
    overwriting are left out: they are about one output directory, not about the run."""
    import yaml

    settings = {key: value for key, value in vars(args).items() if key != "config"}
    settings.update(resume_from_checkpoint=None, overwrite_output_dir=False)
    if isinstance(settings["report_to"], list):  # check_trackers made it a list; the flag takes "a,b"
        settings["report_to"] = ",".join(settings["report_to"])
    stack = versions("torch", "triton", "accelerate", "datasets", "tokenizers")
    return (f"# scripts/pretrain.py's resolved settings; run again with: python scripts/pretrain.py --config "
            f"{Path(args.output_dir) / RUN_CONFIG}\n# {', '.join(f'{k} {v}' for k, v in stack.items())}; commit "
            f"{git_commit()}\n"
            + yaml.safe_dump(settings, sort_keys=False))


def _check_warmup(args) -> None:
    if args.num_warmup_steps is not None and args.max_train_steps and args.num_warmup_steps > args.max_train_steps:
        raise InputError(f"--num_warmup_steps ({args.num_warmup_steps}) is more than the run's "
                         f"{args.max_train_steps} steps: it would end before its warmup")


def check_trackers(report_to: str) -> list[str]:
    """--report_to as Accelerate's list of trackers, each installed: a missing one is an InputError
    naming its package (Accelerate itself would only warn and track nothing)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["all"]:
        if not available:
            raise InputError(f"--with_tracking --report_to all: no tracker is installed; pip install one of "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (tensorboard is the usual)")
        return names
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise InputError(f"--report_to {name!r} is not a tracker Accelerate knows; one of "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or all")
        if name not in available:
            raise InputError(f"--report_to {name}: the package is not installed (pip install {name.replace('_', '-')})")
    return names


def _add_data_flags(d) -> None:
    d.add_argument("--dataset_name", default=None,
                   help=f"hub dataset, local dataset directory, or {gdata.BUILTIN_CORPUS} (the default "
                        f"when no --train_file is given: Python's bundled docs, offline)")
    d.add_argument("--dataset_config_name", default=None)
    d.add_argument("--train_file", default=None, help="txt, json, jsonl, csv or parquet")
    d.add_argument("--validation_file", default=None)
    d.add_argument("--validation_split_percentage", type=bounded_int(1, 99), default=5,
                   help="carved off the training split when the data has no validation split")
    d.add_argument("--text_column", default=None, help="default: 'text', or the only column")
    d.add_argument("--streaming", action="store_true",
                   help="read the dataset as a stream (bigger than the disk); needs --max_train_steps")
    d.add_argument("--shuffle_buffer_size", type=bounded_int(1), default=10_000, help="documents, with --streaming")
    d.add_argument("--preprocessing_num_workers", type=bounded_int(1), default=None)
    d.add_argument("--max_eval_samples", type=bounded_int(1), default=None, help="cap the validation blocks")
    d.add_argument("--document_masking", action="store_true",
                   help="attention stays within each document of a packed row (end-of-text ends one); fast "
                        "with --kernels triton, a dense T x T mask (slow) with sdpa/eager")
    d.add_argument("--restart_positions", action="store_true",
                   help="with --document_masking: positions start at 0 in every document")


def _add_model_flags(m) -> None:
    m.add_argument("--config_name", default="gpt2-tiny", help=f"a preset ({', '.join(PRESETS)}) or a config.json")
    m.add_argument("--config_overrides", default=None, help='e.g. "n_layer=2,n_embd=64,dropout=0.1"')
    cli.add_checkpoint_flags(
        m, required=False, model_help="start from these weights (ours or HF GPT-2)",
        tokenizer_help="tokenizer.json file or directory, or a hub name (gpt2); default: train a byte-level BPE "
                       "on the training text",
    )
    m.add_argument("--vocab_size", type=bounded_int(257, why="256 bytes + <|endoftext|>"), default=8192,
                   help="for a tokenizer trained here")
    m.add_argument("--block_size", type=bounded_int(2, why="one input and one target"), default=None,
                   help="tokens per sequence; default n_positions")
    cli.add_device_flags(m, dtype=False)  # precision: accelerate launch --mixed_precision
    m.add_argument("--compile", action="store_true", help="torch.compile through Accelerate (inductor)")
    m.add_argument("--cuda_graphs", action="store_true",
                   help="capture each training step (forward, backward, clipping, AdamW) as one CUDA graph and "
                        "replay it: the host launches one graph a step, not every kernel. One CUDA GPU, bf16 or fp32")


def _add_training_flags(t) -> None:
    t.add_argument("--per_device_train_batch_size", type=bounded_int(1), default=4)
    t.add_argument("--per_device_eval_batch_size", type=bounded_int(1), default=8)
    t.add_argument("--gradient_accumulation_steps", type=bounded_int(1), default=1)
    t.add_argument("--learning_rate", type=float, default=2e-3)
    t.add_argument("--min_lr", type=float, default=1e-4, help="the schedule decays to this")
    t.add_argument("--weight_decay", type=float, default=0.1)
    t.add_argument("--adam_beta1", type=float, default=optim.BETAS[0])
    t.add_argument("--adam_beta2", type=float, default=optim.BETAS[1])
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--max_train_steps", type=bounded_int(1), default=None,
                   help=f"optimizer steps; wins over --num_train_epochs (without either: {DEFAULT_TRAIN_STEPS})")
    t.add_argument("--num_train_epochs", type=float, default=None, help="passes over the training split")
    t.add_argument("--num_warmup_steps", type=bounded_int(0), default=None, help="default: 5%% of the steps")
    t.add_argument("--lr_scheduler_type", choices=optim.SCHEDULES, default="cosine")
    t.add_argument("--seed", type=bounded_int(0, 2**32 - 1, why="numpy's seeds, which Accelerate's set_seed sets"),
                   default=42)
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each block in the backward pass instead of keeping its activations: "
                        "less memory, about a third more compute, the same gradients")
    t.add_argument("--on_nonfinite", choices=("stop", "skip"), default="stop",
                   help="a non-finite loss or grad norm stops the run (keeping the last good "
                        "checkpoint), or skips that update")


def _steps_or_epoch(text: str) -> int | str:
    """--checkpointing_steps: a number of steps (at least 1), or 'epoch'."""
    if text == "epoch" or (text.isdigit() and int(text) >= 1):
        return text if text == "epoch" else int(text)
    raise argparse.ArgumentTypeError(f"must be a number of steps (at least 1) or 'epoch', got {text!r}")


def _add_output_flags(o) -> None:
    o.add_argument("--output_dir", default="out")
    o.add_argument("--dry_run", action="store_true",
                   help="resolve the settings, load (or, with --streaming, probe) the data, build the model, "
                        "print the plan and the memory it needs, and stop: nothing trained or written")
    o.add_argument("--eval_steps", type=bounded_int(1), default=100,
                   help="also before the first and after the last step")
    o.add_argument("--logging_steps", type=bounded_int(1), default=10)
    o.add_argument("--checkpointing_steps", type=_steps_or_epoch, default=None,
                   help="every N steps, or 'epoch'; default: --eval_steps")
    o.add_argument("--checkpoints_total_limit", type=bounded_int(1), default=None,
                   help="keep only the newest N checkpoints (default: all)")
    o.add_argument("--resume_from_checkpoint", default=None,
                   help="a step_N directory, or 'latest' (the newest readable one in --output_dir)")
    o.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh in an --output_dir that holds an earlier run (its checkpoints and logs "
                        "are deleted)")
    o.add_argument("--ddp_timeout", type=bounded_int(1), default=1800,
                   help="seconds a process waits for the others at a collective before the run stops (HF's name)")
    o.add_argument("--with_tracking", action="store_true")
    o.add_argument("--report_to", default="all", help="tensorboard, wandb, ... or all (every installed one)")
    o.add_argument("--sample_prompt", default="The", help="prompt for the sample printed at the end")
    o.add_argument("--sample_tokens", type=bounded_int(0), default=60)


# --------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything one training run holds: what setup_run built, and where the loop stands."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP / FSDP wrapped where distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    eval_loader: DataLoader
    tokenizer: object  # a tokenizers.Tokenizer
    block_size: int
    settings: dict  # what a resume must match; saved in every checkpoint with the data position
    metrics: MetricsLog
    tokens_per_step: int  # batch x block x accumulation x processes
    flops_per_token: float
    peak_flops: float | None  # the device's dense bf16 peak, for MFU; None when unknown
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # batches consumed in the current epoch
    steps_per_epoch: int | None = None  # optimizer steps in one pass over the data; None for a stream
    last_checkpoint: Path | None = None
    val: tuple[float, float] | None = None  # the latest (val loss, val perplexity)
    graphed: GraphedStep | None = None  # --cuda_graphs: the step, captured at its first call


def build_accelerator(args) -> Accelerator:
    # Several processes without a GPU (`accelerate launch --multi_gpu --num_processes 2 ... --cpu`, or
    # torchrun on a CPU host) need cpu=True for Accelerate to set up gloo instead of running them apart.
    accelerator = Accelerator(
        cpu=cli.use_cpu(args.cpu),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps,
            sync_with_dataloader=False,  # we take a whole step's micro-batches at once, see train_step
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
        log_with=args.report_to if args.with_tracking else None,  # a list, checked in validate_args
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dynamo_backend="inductor" if args.compile else None,
        # How long a process waits for the others at a collective before it gives up (HF Trainer's
        # --ddp_timeout): a stopped or hung process must not leave the rest waiting in silence.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
                         # autocast's cache of cast weights must not outlive a captured region
                         *([AutocastKwargs(cache_enabled=False)] if args.cuda_graphs else [])],
    )
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")  # accelerate launch --use_fsdp
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        accelerator.end_training()
        raise InputError(f"FSDP was asked for (--use_fsdp), but Accelerate runs FSDP on GPUs only and would run "
                         f"{accelerator.distributed_type.value} here; drop --use_fsdp (plain data parallel on CPU: "
                         f"accelerate launch --multi_gpu --num_processes 2 ... --cpu)")
    if accelerator.distributed_type == DistributedType.FSDP:
        fsdp2_settings(accelerator)
    return accelerator


def fsdp2_settings(accelerator: Accelerator) -> None:
    """FSDP2 only, with gradients reduced in fp32. `accelerate launch --use_fsdp` means FSDP1 unless
    told --fsdp_version 2; FSDP1 is not what this script is tested with, so it stops with one line
    rather than run it. Under bf16 (or fp16) mixed precision Accelerate's policy also reduce-scatters
    the gradients in that dtype: summing a few hundred ranks' gradients with 8 bits of mantissa loses
    what each adds. The parameters are still gathered and computed in bf16; only the reduction, one
    pass over the gradients per step, moves to fp32 (twice the bytes of that collective)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        accelerator.end_training()
        raise InputError(f"FSDP{plugin.fsdp_version} is not supported: add --fsdp_version 2 to accelerate launch "
                         "(or fsdp_version: 2 under fsdp_config; accelerate_fsdp2.yaml has the settings)")
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.reduce_dtype in (torch.bfloat16, torch.float16):
        plugin.mixed_precision_policy = replace(policy, reduce_dtype=torch.float32)
    # fully_shard warns that a Block returns a view (its MLP output: a Linear's, viewed back to 3-D),
    # since an in-place op on it would skip FSDP's pre-backward hook. The next LayerNorm only reads it
    # (x + residual, out of place), and the FSDP test's losses equal one process's.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


def choose_kernels(args, accelerator: Accelerator, config: GPT2Config) -> tuple[str, str]:
    """(attn_impl, norm_impl) for training this config on this run's device, by --kernels."""
    try:
        return resolve_kernels(args.kernels, accelerator.device.type, train_dropout=config.dropout)
    except KernelUnavailableError as err:
        raise InputError(f"--kernels {args.kernels} can't run here: {err}") from None


def _block_size_message(block_size: int, n_positions: int) -> str:
    return (f"--block_size {block_size} is larger than the model's context (n_positions={n_positions}); use "
            f"--block_size {n_positions} or less, or --config_overrides n_positions={block_size}")


def setup_run(args, accelerator: Accelerator) -> Run:
    """Flags, data, tokenizer, model, optimizer, prepared by Accelerate and resumed when asked. Cheap
    checks come first, so a typo fails in a second, before any data is read."""
    output_dir = Path(args.output_dir)
    resume_dir = None
    if args.resume_from_checkpoint:
        with cli.about(f"--resume_from_checkpoint {args.resume_from_checkpoint}"):
            resume_dir, passed_over = ckpt.resolve_checkpoint(args.resume_from_checkpoint, output_dir,
                                                              accelerator.num_processes)
        for problem in passed_over:
            accelerator.print(f"passing over a checkpoint that can't be resumed from: {problem}")
    set_seed(args.seed)  # before the model is built: its initial weights follow from the seed
    config = build_config(args)
    choose_kernels(args, accelerator, config or GPT2Config())  # a refusal before any data is read
    if args.cuda_graphs:
        problem = graph_problem(accelerator.device, mixed_precision=accelerator.mixed_precision,
                                processes=accelerator.num_processes, compile=args.compile,
                                gradient_checkpointing=args.gradient_checkpointing)
        if problem:
            raise InputError(f"--cuda_graphs {problem}")
    if config is not None and args.block_size and args.block_size > config.n_positions:
        raise InputError(_block_size_message(args.block_size, config.n_positions))
    # After the checks that need no data, so a typo deletes nothing. A run resumed from a checkpoint
    # elsewhere still needs an output directory of its own. A dry run touches none of it.
    if not args.dry_run:
        prepare_output_dir(args, accelerator, resuming=resume_dir is not None and resume_dir.parent.resolve()
                           == output_dir.resolve())

    if args.dry_run:
        return dry_run(args, accelerator, config, resume_dir)
    raw = load_raw_data(args, accelerator)
    tokenizer = build_tokenizer(args, raw, accelerator, resume_dir)
    require_eos_token_id(tokenizer)
    model = build_model(args, accelerator, config, tokenizer.get_vocab_size())
    block_size = _block_size(args, model.config)
    train_loader, eval_loader, stats = build_dataloaders(args, raw, tokenizer, block_size, accelerator)
    ga, world = args.gradient_accumulation_steps, accelerator.num_processes
    steps_per_epoch = _steps_from_epochs(args, accelerator, train_loader)
    if accelerator.is_main_process:  # every setting now resolved
        ckpt.record_outputs(output_dir, RUN_CONFIG)
        atomic_write_text(output_dir / RUN_CONFIG, run_config(args))
    optimizer, scheduler = optim.build_optimizer(
        model, lr=args.learning_rate, weight_decay=args.weight_decay, min_lr=args.min_lr,
        schedule=args.lr_scheduler_type, total_steps=args.max_train_steps, warmup_steps=args.num_warmup_steps,
        device=accelerator.device, betas=(args.adam_beta1, args.adam_beta2))
    if args.streaming:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )

    unwrapped = accelerator.unwrap_model(model)
    if unwrapped.lm_head.weight is not unwrapped.transformer.wte.weight:  # they would train apart, silently
        raise RuntimeError("accelerator.prepare untied the LM head from the token embedding")
    run = Run(
        args, accelerator, model, optimizer, scheduler, train_loader, eval_loader, tokenizer, block_size,
        settings={"world_size": world, "per_device_train_batch_size": args.per_device_train_batch_size,
                  "gradient_accumulation_steps": ga, "block_size": block_size, "seed": args.seed,
                  "data": gdata.data_identity(args.dataset_name, args.dataset_config_name, args.train_file,
                                              args.validation_file, raw["train"]), "streaming": args.streaming,
                  "max_train_steps": args.max_train_steps, "learning_rate": args.learning_rate,
                  "min_lr": args.min_lr},
        metrics=MetricsLog(accelerator, output_dir / "metrics.jsonl", args.with_tracking),
        tokens_per_step=args.per_device_train_batch_size * block_size * ga * world,
        flops_per_token=unwrapped.flops_per_token(block_size),
        peak_flops=peak_flops(device_name(accelerator.device)),
        steps_per_epoch=steps_per_epoch,
    )
    if resume_dir is not None:
        resume(run, resume_dir)
    if args.cuda_graphs:  # after resume, which loads the optimizer state it makes capturable
        run.graphed = GraphedStep(model, optimizer.optimizer, args.max_grad_norm)
    if args.with_tracking:
        if accelerator.is_main_process:
            ckpt.record_outputs(args.output_dir, TRACKER_PROJECT)
        accelerator.init_trackers(TRACKER_PROJECT, {k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})
    accelerator.print(banner(run, unwrapped, stats))
    return run


def _steps_from_epochs(args, accelerator: Accelerator, train_loader) -> int | None:
    """Optimizer steps per epoch (None for a stream, or data not read: train_loader None); with
    --num_train_epochs alone they set --max_train_steps (--max_train_steps wins: HF's rule)."""
    if train_loader is None or args.streaming:
        return None
    steps_per_epoch = len(train_loader) // accelerator.num_processes // args.gradient_accumulation_steps
    if args.max_train_steps is None:
        args.max_train_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
        _check_warmup(args)
    return steps_per_epoch


def dry_run(args, accelerator: Accelerator, config: GPT2Config | None, resume_dir: Path | None) -> None:
    """--dry_run: the setup's checks and the plan, training and writing nothing. Data or a tokenizer
    on a Hub this machine can't reach doesn't stop it: what needs them (the data's size, epochs; the
    tokenizer's size, where the model takes it) is said to be unknown, the rest is planned."""
    raw, unreached = _unless_unreachable(lambda: load_raw_data(args, accelerator))
    tokenizer = None
    if raw is not None or args.tokenizer_name or args.model_name_or_path or resume_dir is not None:
        tokenizer, unreached_tokenizer = _unless_unreachable(
            lambda: build_tokenizer(args, raw, accelerator, resume_dir))
        unreached = unreached or unreached_tokenizer
    if tokenizer is not None:
        require_eos_token_id(tokenizer)
        vocab_size = tokenizer.get_vocab_size()
    else:  # the size the tokenizer would have: trained here, --vocab_size; else the model's own
        trains_one = not (args.tokenizer_name or args.model_name_or_path)
        vocab_size = args.vocab_size if trains_one or config is None else config.vocab_size
    with torch.device("meta") if config is not None else contextlib.nullcontext():  # shapes, not memory
        model = build_model(args, accelerator, config, vocab_size)
    block_size = _block_size(args, model.config)
    train_loader, stats = None, None
    if raw is not None and tokenizer is not None:
        train_loader, _, stats = build_dataloaders(args, raw, tokenizer, block_size, accelerator)
    steps_per_epoch = _steps_from_epochs(args, accelerator, train_loader)
    accelerator.print(plan(args, accelerator, model, block_size, stats, train_loader, steps_per_epoch,
                           unreached=unreached, vocab_known=tokenizer is not None))


def _unless_unreachable(load):
    """(load(), None), or (None, what couldn't be reached) when it needs the Hub and the Hub is out of reach."""
    try:
        return load(), None
    except InputError as err:
        if unreachable_on_hub(err) is None:
            raise
        return None, unreachable_on_hub(err)


def plan(args, accelerator: Accelerator, model: GPT2, block_size: int, stats, train_loader,
         steps_per_epoch: int | None, unreached: str | None = None, vocab_known: bool = True) -> str:
    """--dry_run's report: the run's size, length, checkpoint and memory per device (an estimate:
    gpt2/throughput.py, estimate_memory), from the resolved settings, the data and the built model.
    unreached: why the data (or the tokenizer) could not be read, so what needs it is unknown."""
    config, world, ga = model.config, accelerator.num_processes, args.gradient_accumulation_steps
    params = model.num_parameters()
    micro = args.per_device_train_batch_size * block_size
    step_tokens = micro * ga * world
    if train_loader is None:
        data = f"not read: {unreached}"
        epochs = "unknown (the data was not read)"
    elif args.streaming:  # a stream has no length: probe it instead, one batch through tokenizing and packing
        first = next(iter(train_loader))["input_ids"]
        data = f"streamed; probed: a first batch of {tuple(first.shape)} token ids, so the text column reads"
        epochs = "unknown (a stream has no length)"
    else:
        blocks = stats["train"].blocks
        data = f"{blocks:,} blocks of {block_size} = {blocks * block_size:,} training tokens"
        epochs = f"{args.max_train_steps / steps_per_epoch:.3g} ({steps_per_epoch:,} steps per epoch)"
    sharded = accelerator.distributed_type == DistributedType.FSDP
    activation_bytes = 4 if accelerator.mixed_precision == "no" else 2
    memory = estimate_memory(params=params, n_layer=config.n_layer, n_embd=config.n_embd,
                             vocab_size=config.vocab_size, micro_batch_tokens=micro,
                             activation_bytes=activation_bytes, recompute=args.gradient_checkpointing,
                             shards=world if sharded else 1)
    gib = 2**30
    steps = (f"{args.max_train_steps:,} -> {args.max_train_steps * step_tokens:,} tokens" if args.max_train_steps
             else f"unknown (--num_train_epochs {args.num_train_epochs:g} of data that was not read)")
    lines = [
        "Plan (--dry_run: nothing was trained or written)",
        f"  parameters     {params:,} ({model.num_parameters(exclude_embeddings=True):,} without embeddings)"
        + ("" if vocab_known else f"; a vocabulary of {config.vocab_size:,} assumed (the tokenizer was not read)"),
        f"  per step       {step_tokens:,} tokens = {args.per_device_train_batch_size} x {block_size} x {ga} "
        f"accumulation x {world} processes",
        f"  steps          {steps}; epochs {epochs}",
        f"  data           {data}",
        f"  checkpoint     model.safetensors {4 * params / gib:.2f} GiB (fp32); each step_N about "
        f"{12 * params / gib:.2f} GiB (the weights and AdamW's two moments)",
        f"  memory/device  about {sum(memory.values()) / gib:.2f} GiB: weights, gradients and AdamW "
        f"{memory['state'] / gib:.2f}{' (sharded over ' + str(world) + ')' if sharded else ''}, activations "
        f"{memory['activations'] / gib:.2f} ({'blocks recomputed' if args.gradient_checkpointing else 'kept'}, "
        f"{activation_bytes}-byte, {micro:,} tokens per micro-batch), loss {memory['loss'] / gib:.2f}",
        "  run it         the same command without --dry_run"
        + (" where the Hub can be reached (or the data is in the local cache)" if unreached else ""),
    ]
    return "\n".join(lines)


def banner(run: Run, model: GPT2, stats) -> str:
    """The run at a glance: model, kernels, tokenizer, data, devices, batch and plan."""
    args, accelerator, config = run.args, run.accelerator, model.config
    device = device_name(accelerator.device)
    lines = [
        "=" * 78,
        f"GPT-2 pretraining: {args.model_name_or_path or args.config_name}"
        + (f" + {args.config_overrides}" if args.config_overrides else ""),
        f"  model      {model.num_parameters():,} parameters ({model.num_parameters(exclude_embeddings=True):,} "
        f"without embeddings): {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
        f"context {config.n_positions}",
        f"  kernels    attention {config.attn_impl}, LayerNorm {config.norm_impl} (--kernels {args.kernels}"
        + (f": {auto_kernels(accelerator.device.type, config.dropout)[1]})" if args.kernels == "auto" else ")")
        + ("; every block recomputed in backward (--gradient_checkpointing)" if args.gradient_checkpointing else "")
        + ("; the step captured as one CUDA graph at step 1, replayed after (--cuda_graphs)" if args.cuda_graphs
           else ""),
    ]
    if args.document_masking:
        lines.append("  documents  masked: a token attends only to its own document (end-of-text ends one)"
                     + ("; positions restart per document" if args.restart_positions else "")
                     + ("" if config.attn_impl == "triton" else f"; {config.attn_impl} takes a dense T x T mask: slow"))
    lines += [
        f"  tokenizer  {run.tokenizer.get_vocab_size():,} tokens, end-of-text id {eos_token_id(run.tokenizer)}",
        f"  data       {args.dataset_name or args.train_file or gdata.BUILTIN_CORPUS}"
        + (" (streaming)" if args.streaming else ""),
    ]
    for split, s in (stats or {}).items():
        lines.append(f"    {split:<10} {s.documents:,} documents, {s.tokens:,} tokens -> {s.blocks:,} blocks of "
                     f"{run.block_size}; final partial block dropped: {s.dropped_tokens:,} tokens"
                     + (f"; {s.rows_without_text:,} rows without text (null) dropped" if s.rows_without_text else ""))
    lines += [
        f"  devices    {accelerator.num_processes} x {device} ({accelerator.distributed_type.value}, "
        f"mixed precision {accelerator.mixed_precision}); MFU peak "
        + (f"{run.peak_flops / 1e12:,.0f} TFLOP/s dense bf16" if run.peak_flops else "n/a (unknown device)"),
        f"  batch      {args.per_device_train_batch_size} x {run.block_size} tokens x "
        f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes = "
        f"{run.tokens_per_step:,} tokens per optimizer step",
        f"  plan       {args.max_train_steps:,} steps = {args.max_train_steps * run.tokens_per_step:,} tokens; lr "
        f"{args.learning_rate:g} ({args.lr_scheduler_type} to {args.min_lr:g}); output {args.output_dir}",
        "=" * 78,
    ]
    return "\n".join(lines)


def prepare_output_dir(args, accelerator: Accelerator, resuming: bool) -> None:
    """--output_dir, writable and holding no other run (or, with --overwrite_output_dir, cleared of it)."""
    if accelerator.is_main_process:
        try:
            with cli.about(f"--output_dir {args.output_dir}"):
                removed = ckpt.check_output_dir(args.output_dir, resuming, args.overwrite_output_dir,
                                            will_write=(*ckpt.RUN_FILES, TRACKER_PROJECT))
        except ckpt.OutputDirInUse as err:
            raise InputError(f"{err}; pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir "
                             f"to start afresh there, or another --output_dir") from None
        if removed:
            print(f"--overwrite_output_dir: deleted the earlier run's {', '.join(sorted(p.name for p in removed))}")
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def load_raw_data(args, accelerator: Accelerator):
    """The raw text splits; one process reads / builds the datasets cache first, the others reuse it."""
    with accelerator.main_process_first():
        raw = gdata.load_raw_datasets(
            args.dataset_name, args.dataset_config_name, train_file=args.train_file,
            validation_file=args.validation_file, validation_split_percentage=args.validation_split_percentage,
            streaming=args.streaming,
        )
    if not args.streaming:
        for split in ("train", "validation"):
            column = gdata.resolve_text_column(raw[split].column_names, args.text_column)
            if len(raw[split]) == 0:
                raise gdata.DataError(f"the {split} split is empty")
            gdata.check_text_column(raw[split], column)  # before a tokenizer trains on it
    return raw


def build_tokenizer(args, raw, accelerator: Accelerator, resume_dir: Path | None):
    """The tokenizer: the checkpoint's when resuming, a named one, the starting model's, or a BPE
    trained here on the training text (by the main process; the others read its file)."""
    if resume_dir is not None and (resume_dir / "tokenizer.json").is_file():
        return load_tokenizer(resume_dir)
    if args.tokenizer_name or args.model_name_or_path:
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    trained = Path(args.output_dir) / "tokenizer.json"
    if args.dry_run:  # writes nothing: each process trains its own (BPE training is deterministic)
        column = gdata.resolve_text_column(raw["train"].column_names, args.text_column)
        return train_tokenizer(gdata.text_sample(raw["train"], column, TOKENIZER_TRAINING_CHARS), args.vocab_size)
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            column = gdata.resolve_text_column(raw["train"].column_names, args.text_column)
            tokenizer = train_tokenizer(gdata.text_sample(raw["train"], column, TOKENIZER_TRAINING_CHARS),
                                        args.vocab_size)
            ckpt.record_outputs(args.output_dir, *SAVED_TOKENIZER_FILES)
            save_tokenizer(tokenizer, args.output_dir)
        else:
            tokenizer = load_tokenizer(trained)
    return tokenizer


def build_config(args) -> GPT2Config | None:
    """The new model's config from --config_name and --config_overrides (None with
    --model_name_or_path); checked before any data is read, so a typo fails in a second."""
    if args.model_name_or_path:
        if args.config_overrides:
            raise InputError("--config_overrides applies to new models; drop it with --model_name_or_path")
        return None
    with cli.about("--config_name"):
        config = GPT2Config.from_name_or_path(args.config_name)
    return config.with_overrides(args.config_overrides) if args.config_overrides else config


def build_model(args, accelerator: Accelerator, config: GPT2Config | None, vocab_size: int) -> GPT2:
    """The model on CPU, from --model_name_or_path or the config, with the kernels picked by --kernels."""
    if config is None:
        model = ckpt.load_model(args.model_name_or_path)
    else:
        if "vocab_size" not in (args.config_overrides or ""):
            config.vocab_size = vocab_size  # the tokenizer's size, trained or loaded
        config.validate()
        model = GPT2(config)
    if model.config.vocab_size < vocab_size:
        raise InputError(
            f"the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's ({vocab_size})"
        )
    attn, norm = choose_kernels(args, accelerator, model.config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.set_kernels(attn_impl=attn, norm_impl=norm)


def _block_size(args, config: GPT2Config) -> int:
    block_size = args.block_size or config.n_positions
    if block_size > config.n_positions:
        raise InputError(_block_size_message(block_size, config.n_positions))
    if block_size < 2:
        raise InputError("--block_size must be at least 2 (one input and one target)")
    return block_size


def build_dataloaders(args, raw, tokenizer, block_size, accelerator):
    """(train loader, eval loader, packing stats or None). Map-style loaders go through prepare;
    streams are split between ranks by split_dataset_by_node already and are not prepared (prepare
    would shard them a second time)."""
    # --document_masking: every batch also carries its rows' document ids, from the end-of-text token.
    collate = WithDocumentIds(eos_token_id(tokenizer), args.restart_positions) if args.document_masking else None
    batches = dict(batch_size=args.per_device_train_batch_size, eval_batch_size=args.per_device_eval_batch_size,
                   seed=args.seed, collate=collate, max_eval_samples=args.max_eval_samples)
    if args.streaming:
        return (*gdata.stream_dataloaders(raw, tokenizer, block_size, rank=accelerator.process_index,
                                          world_size=accelerator.num_processes, buffer_size=args.shuffle_buffer_size,
                                          text_column=args.text_column, **batches), None)
    with accelerator.main_process_first():
        packed, stats = gdata.tokenize_and_pack(
            raw, tokenizer, block_size, text_column=args.text_column, num_proc=args.preprocessing_num_workers
        )
    step_blocks = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return (*gdata.packed_dataloaders(packed, min_train_blocks=step_blocks, **batches), stats)


def resume(run: Run, resume_dir: Path) -> None:
    """Weights, optimizer, scheduler and RNG from save_state; the data position from our file."""
    args, saved = run.args, ckpt.read_training_state(resume_dir)
    try:
        ckpt.check_resume_compatible(saved, run.settings)
    except InputError as err:
        raise InputError(f"{err}. Run with the checkpoint's settings, or start a new run from its weights with "
                         f"--model_name_or_path.") from None
    epoch_batches = run.steps_per_epoch * args.gradient_accumulation_steps if run.steps_per_epoch else None
    if epoch_batches is not None and saved["batches_in_epoch"] > epoch_batches:
        raise InputError(f"{resume_dir / ckpt.TRAINING_STATE} is corrupt: {saved['batches_in_epoch']} batches into "
                         f"an epoch of {epoch_batches}")
    run.accelerator.load_state(str(resume_dir))
    run.step, run.epoch, run.batches_done = saved["step"], saved["epoch"], saved["batches_in_epoch"]
    say = run.accelerator.print
    say(f"Resumed from {resume_dir}: step {run.step}, epoch {run.epoch}, {run.batches_done} batches into it")
    if (saved.get("learning_rate"), saved.get("min_lr")) not in ((args.learning_rate, args.min_lr), (None, None)):
        optim.set_peak_lr(run.scheduler, args.learning_rate, args.min_lr)
        say(f"learning rate: the checkpoint's schedule peaked at {saved.get('learning_rate')}; the rest of it now "
            f"peaks at --learning_rate {args.learning_rate:g} and decays to --min_lr {args.min_lr:g}")
    planned = saved.get("max_train_steps", args.max_train_steps)
    if planned != args.max_train_steps:
        say(f"note: the learning-rate schedule comes from the checkpoint, planned for {planned} steps "
            f"(after them it stays at --min_lr)")
    if run.accelerator.is_main_process:
        dropped = ckpt.truncate_metrics(run.metrics.path, run.step)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} rows logged after step {run.step} by the interrupted run")


# --------------------------------------------------------------------------- the loop


def _batches(args, loader, accelerator, epoch: int, batches_done: int):
    """Yields (the next optimizer step's ga micro-batches, epoch, batches consumed in that epoch).

    Map-style data: each epoch is a fresh permutation (seeded by seed + epoch through Accelerate's
    seedable sampler); a resumed epoch skips the batches already consumed with skip_first_batches,
    so the run continues with exactly the batches it would have seen. A trailing part of an epoch
    too short for a whole optimizer step is left out. Streams repeat forever; a resume reads past the
    consumed batches."""
    ga = args.gradient_accumulation_steps
    if args.streaming:
        iterator = iter(loader)
        for _ in range(batches_done):
            next(iterator)
        while True:
            micro = list(itertools.islice(iterator, ga))
            batches_done += ga
            yield micro, 0, batches_done
    while True:
        current = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        current.set_epoch(epoch)
        iterator = iter(current)
        while True:
            micro = list(itertools.islice(iterator, ga))
            if len(micro) < ga:
                break
            batches_done += ga
            yield micro, epoch, batches_done
        epoch, batches_done = epoch + 1, 0


def _due(run: Run, every: int) -> bool:
    """Every `every` steps (0: never), and at the last step."""
    return (every > 0 and run.step % every == 0) or run.step == run.args.max_train_steps


def fit(run: Run) -> int:
    """Evaluate, then train to --max_train_steps, logging, evaluating and checkpointing on schedule;
    then save the model. 0 when done, 1 when a non-finite step stopped the run."""
    args = run.args
    if run.step == 0:
        validate(run, print)
    run.model.train()
    window = ThroughputWindow()
    start_time, steps_run = window.start, 0
    run.last_checkpoint = ckpt.latest_checkpoint(args.output_dir)
    progress = tqdm(total=args.max_train_steps, initial=run.step, desc="training", dynamic_ncols=True,
                    disable=not run.accelerator.is_local_main_process)
    batches = _batches(args, run.train_loader, run.accelerator, run.epoch, run.batches_done)
    while run.step < args.max_train_steps:
        micro, run.epoch, run.batches_done = next(batches)
        result = train_step(run, micro)
        run.step += 1
        steps_run += 1
        if not result.finite and stop_on_nonfinite(run, result):
            return 1
        window.add(float(result.loss), result.tokens, applied=result.finite)
        run.scheduler.step()
        progress.update(1)
        if _due(run, args.logging_steps):
            log_training(run, window.close(), result, progress)
        with window.paused():
            evaluate_and_checkpoint(run, progress)
    progress.close()
    if steps_run == 0:  # resumed at the end: nothing trained, report the checkpoint as it is
        run.val = evaluate(run.model, run.eval_loader, run.accelerator, prepared=not args.streaming)
    return finish(run, time.perf_counter() - start_time)


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's mean next-token loss over its tokens on every rank
    tokens: int  # targets in the step, every rank together
    grad_norm: torch.Tensor  # before clipping
    finite: bool  # False: the update was not applied


def train_step(run: Run, micro_batches: list[dict]) -> StepResult:
    """One optimizer step over its gradient-accumulation micro-batches, taken together so the loss can
    be divided by the step's token count across micro-batches and ranks before backward (a
    token-weighted loss). A non-finite loss or gradient norm skips the update."""
    if run.graphed is not None:  # the same step as below, replayed as one CUDA graph
        loss, tokens, grad_norm, skipped, out_of_order = run.graphed(micro_batches)
        skipped = bool(skipped)  # the one read of the step: it waits for the replay
        if skipped and bool(out_of_order):  # as the eager kernels' own check
            raise ValueError("flash_attention: document_ids must be non-decreasing along the sequence in every row")
        return StepResult(loss, int(tokens), grad_norm, finite=not skipped)
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    world, ga = accelerator.num_processes, run.args.gradient_accumulation_steps
    n_tokens = sum((b["input_ids"][:, 1:] != IGNORE_INDEX).sum() for b in micro_batches).to(accelerator.device)
    step_tokens = accelerator.reduce(n_tokens.clone(), "sum")
    step_nll = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        input_ids = batch["input_ids"].to(accelerator.device)
        with accelerator.accumulate(model):
            nll_sum = model(input_ids, labels=input_ids, reduction="sum", **document_kwargs(batch, accelerator.device))
            # DDP averages gradients over ranks and accelerator.backward divides by ga; undo both
            # so the gradient is that of (sum of NLL over the step's tokens) / (its token count).
            accelerator.backward(nll_sum * (world * ga) / step_tokens)
            step_nll += nll_sum.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
                step_loss = accelerator.reduce(step_nll, "sum") / step_tokens
                if accelerator.scaler is not None:
                    # fp16: overflowing gradients are routine; the loss scaler skips that update
                    # and lowers its scale inside optimizer.step(), so only the loss can be fatal.
                    optimizer.step()
                    finite = bool(torch.isfinite(step_loss))
                else:
                    finite = bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm))
                    if finite:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, int(step_tokens), grad_norm, finite)


def stop_on_nonfinite(run: Run, result: StepResult) -> bool:
    """The --on_nonfinite policy for a step whose update was skipped: True to stop the run (the last
    good checkpoint stays the newest), False to go on without that update."""
    what = "loss" if not torch.isfinite(result.loss) else "grad norm"
    message = (f"non-finite {what} at step {run.step} (loss {result.loss.item()}, grad norm "
               f"{float(result.grad_norm)})")
    if run.args.on_nonfinite == "skip":
        run.accelerator.print(f"\n{message}: skipping this update (--on_nonfinite skip)")
        return False
    where = f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint else "no checkpoint yet"
    run.accelerator.print(f"\n{message}: stopping; {where}. Resume with --resume_from_checkpoint latest "
                          f"(perhaps with a lower --learning_rate), or pass --on_nonfinite skip.")
    run.metrics.log({"nonfinite": True, "train_loss": float(result.loss)}, run.step)
    return True


def log_training(run: Run, window: tuple[float, float], result: StepResult, progress) -> None:
    train_loss, steps_per_s = window
    tokens_per_s = run.tokens_per_step * steps_per_s
    utilisation = mfu(tokens_per_s / run.accelerator.num_processes, run.flops_per_token, run.peak_flops)
    record = {
        "train_loss": train_loss,
        "lr": float(run.scheduler.get_last_lr()[0]),  # a tensor with --cuda_graphs
        "grad_norm": float(result.grad_norm),
        "tokens_per_s": tokens_per_s,
        "mfu": utilisation,
        "peak_memory": peak_memory(run.accelerator.device),
        "epoch": run.epoch,
    }
    mfu_text = f"{100 * utilisation:.1f}%" if utilisation is not None else "n/a"
    loss_text = f"{train_loss:.4f}" if train_loss is not None else "n/a (every update skipped)"
    progress.set_postfix(loss=loss_text[:6], refresh=False)
    if run.accelerator.is_local_main_process:
        progress.write(
            f"step {run.step}: loss {loss_text} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} "
            f"| {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | peak mem {record['peak_memory']}"
        )
    run.metrics.log(record, run.step)


def evaluate_and_checkpoint(run: Run, progress) -> None:
    if _due(run, run.args.eval_steps):
        validate(run, progress.write)
    if run.args.checkpointing_steps == "epoch":  # after the epoch's last whole step
        due = run.batches_done >= run.steps_per_epoch * run.args.gradient_accumulation_steps or _due(run, 0)
    else:
        due = _due(run, run.args.checkpointing_steps)
    if due:
        position = {"epoch": run.epoch, "batches_in_epoch": run.batches_done, **run.settings}
        model_config = run.accelerator.unwrap_model(run.model).config
        run.last_checkpoint = save_checkpoint(run.accelerator, run.args, run.step, position, run.tokenizer,
                                              model_config)


def validate(run: Run, write) -> None:
    """Validation loss and perplexity now: written (by the local main process) and logged."""
    loss, ppl = run.val = evaluate(run.model, run.eval_loader, run.accelerator, prepared=not run.args.streaming)
    if run.accelerator.is_local_main_process:
        write(f"step {run.step}: val loss {loss:.4f}, val perplexity {ppl:.2f}")
    run.metrics.log({"val_loss": loss, "val_perplexity": ppl}, run.step)


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, prepared: bool) -> tuple[float, float]:
    """(mean next-token loss, perplexity) over the validation blocks, weighted by token: per-sequence
    NLL sums and counts go through gather_for_metrics (which drops the samples Accelerate repeats to
    even out the last batch), then one division. An unprepared (streamed) loader is summed locally
    and reduced once, since ranks may hold different numbers of batches."""
    model.eval()
    nll, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    nll, count = nll.to(accelerator.device), count.to(accelerator.device)
    for batch in dataloader:
        seq_nll, seq_count = sequence_nll(model, batch, accelerator.device)
        if prepared:
            seq_nll, seq_count = accelerator.gather_for_metrics((seq_nll, seq_count))
        nll += seq_nll.sum()
        count += seq_count.sum()
    if not prepared:
        nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    model.train()
    loss = (nll / count.clamp(min=1)).item()
    return loss, math.exp(min(loss, 700.0))


def save_checkpoint(accelerator, args, step: int, position: dict, tokenizer, model_config) -> Path:
    """accelerator.save_state into output_dir/step_N, then the model config, tokenizer and training
    position, then the completion marker, last; so an interrupted save is never mistaken for a
    checkpoint. Then the oldest checkpoints beyond --checkpoints_total_limit go. Any failure while
    writing (a full disk, a quota, a storage error) ends the run with one line on every rank: once
    every rank has stopped writing, the partial step_N is removed and the previous checkpoint is
    left intact."""
    path = ckpt.checkpoint_dir(args.output_dir, step)
    main = accelerator.is_main_process
    # Every rank joins each check (a collective, so also a barrier) and all take the same branch: no
    # rank removes step_N, or writes what completes it, while another is still writing its part.
    error = _attempt(lambda: _start_checkpoint(args.output_dir, path)) if main else None
    failed = _failed_anywhere(accelerator, error)
    if not failed:
        error = _attempt(lambda: accelerator.save_state(str(path)))
        failed = _failed_anywhere(accelerator, error)
    if not failed:
        if main:
            error = _attempt(lambda: (ckpt.save_model_config(path, model_config), save_tokenizer(tokenizer, path),
                                      atomic_write_text(path / RUN_CONFIG, run_config(args)),
                                      ckpt.write_training_state(path, {"step": step, **position})))
        failed = _failed_anywhere(accelerator, error)
    if failed:
        if main:
            shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise InputError(_save_failure(path, error, ckpt.latest_checkpoint(args.output_dir))) from None
    if accelerator.is_main_process and args.checkpoints_total_limit:
        ckpt.prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
    return path


def _start_checkpoint(output_dir: str, path: Path) -> None:
    """Before step_N is written: it is recorded as ours (from its first byte, even if this save
    breaks), marked incomplete if it is being overwritten, and stale temporaries of our interrupted
    writes are cleared."""
    ckpt.record_outputs(output_dir, path.name)
    ckpt.remove_completion_marker(path)
    remove_stale_temporaries(output_dir, names=(*ckpt.RUN_FILES, ckpt.MANIFEST))
    if path.is_dir():
        remove_stale_temporaries(path)


def _attempt(write) -> Exception | None:
    """Run write(); what it raised, if anything (an interrupt still interrupts)."""
    try:
        write()
    except Exception as err:  # noqa: BLE001 - safetensors, torch and the OS each raise their own types
        return err
    return None


def _failed_anywhere(accelerator, error: Exception | None) -> bool:
    flag = torch.tensor([0 if error is None else 1], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item())


def _save_failure(path: Path, error: Exception | None, previous: Path | None) -> str:
    if error is None:
        what = "another process failed to write its part"
    elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"no space left on the device ({error.strerror})"
    else:
        what = first_line(error)
    return (f"saving {path} failed: {what}; the partial checkpoint was removed and the last complete one is "
            f"{previous or 'none'}: fix that, then --resume_from_checkpoint latest")


def save_final_model(accelerator, model, tokenizer, output_dir: str, block_size: int):
    """save_pretrained (config.json + model.safetensors, HF GPT-2 format) and the tokenizer. Returns
    the whole model on the main process (sharded weights are gathered into a plain copy on the CPU;
    what comes after training uses it, no collective involved), None on the others."""
    unwrapped = accelerator.unwrap_model(model)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state = accelerator.get_state_dict(model) if sharded else None  # gathers the full weights
    if accelerator.is_main_process:
        final = unwrapped
        if sharded:
            final = GPT2(unwrapped.config).set_kernels(*resolve_kernels("auto", "cpu"))  # for the sample
            final.load_state_dict(state)
        ckpt.record_outputs(output_dir, "config.json", "model.safetensors", *SAVED_TOKENIZER_FILES)
        final.save_pretrained(output_dir, eos_token_id=eos_token_id(tokenizer))
        save_tokenizer(tokenizer, output_dir, model_max_length=block_size)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def weights_agree(accelerator, model) -> bool | None:
    """Whether every rank ends with the same weights (a checksum per rank, gathered); None when
    the weights are sharded (FSDP / DeepSpeed), where ranks hold different parts by design."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    with torch.no_grad():
        params = list(accelerator.unwrap_model(model).parameters())
        checksum = torch.stack([(p.double() * (i + 1)).sum() for i, p in enumerate(params)]).sum()
    sums = accelerator.gather(checksum.reshape(1))
    return bool((sums == sums[0]).all())


class MetricsLog:
    """metrics.jsonl in the output directory (always), plus Accelerate's trackers when enabled."""

    def __init__(self, accelerator, path: Path, tracking: bool):
        self.accelerator, self.path, self.tracking = accelerator, path, tracking

    def log(self, metrics: dict, step: int):
        if self.accelerator.is_main_process:
            if not self.path.exists():
                ckpt.record_outputs(self.path.parent, self.path.name)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tracking:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


# --------------------------------------------------------------------------- the end


def _evaluation_data_flags(args) -> str:
    """evaluate_perplexity.py's data flags for the validation text this run used."""
    if args.validation_file:
        return f"--validation_file {args.validation_file}"
    if args.dataset_name and args.dataset_name != gdata.BUILTIN_CORPUS:
        config = f" --dataset_config_name {args.dataset_config_name}" if args.dataset_config_name else ""
        return f"--dataset_name {args.dataset_name}{config} --dataset_split validation"
    if args.train_file:
        return "--validation_file HELD_OUT.txt"  # the carved split lives only inside this run
    return f"--dataset_name {gdata.BUILTIN_CORPUS} --dataset_split validation"


def _print_sample(args, model, tokenizer, device):
    """A short sample from --sample_prompt, cut to what the context leaves room for (never an error
    after the model is trained and saved)."""
    prompt_ids = tokenizer.encode(args.sample_prompt).ids or [eos_token_id(tokenizer)]
    prompt_ids = prompt_ids[-(model.config.n_positions - 1):]
    room = model.config.n_positions - len(prompt_ids)
    if args.sample_tokens > room:
        print(f"\n(the sample is {room} tokens, not --sample_tokens {args.sample_tokens}: the context is "
              f"{model.config.n_positions})")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=min(args.sample_tokens, room),
                             temperature=0.8, top_k=50, eos_token_id=eos_token_id(tokenizer), generator=generator,
                             vocab_size=tokenizer.get_vocab_size())
    print("\nSample:\n" + tokenizer.decode(out[0].tolist()))


def finish(run: Run, runtime: float) -> int:
    """The final model in Hugging Face format, all_results.json, a sample and the next commands."""
    accelerator, args, (loss, ppl) = run.accelerator, run.args, run.val
    output_dir = Path(args.output_dir)
    final = save_final_model(accelerator, run.model, run.tokenizer, args.output_dir, run.block_size)
    results = {"eval_loss": loss, "perplexity": ppl, "step": run.step, "train_tokens": run.step * run.tokens_per_step,
               "train_runtime_s": round(runtime, 1),
               "ranks_hold_identical_weights": weights_agree(accelerator, run.model)}
    if accelerator.is_main_process:
        ckpt.record_outputs(output_dir, "all_results.json")
        atomic_write_text(output_dir / "all_results.json", json.dumps(results, indent=2) + "\n")
        _print_sample(args, final, run.tokenizer, next(final.parameters()).device)
        print(f"\nDone in {runtime:.0f} s: val loss {loss:.4f}, val perplexity {ppl:.2f}. Model, config and "
              f"tokenizer in {output_dir}/ (Hugging Face format).")
        print(f"  evaluate: python scripts/evaluate_perplexity.py --model_name_or_path {output_dir} "
              f"{_evaluation_data_flags(args)}")
        print(f"  sample:   python scripts/generate.py --model_name_or_path {output_dir} --prompt \"The\"")
    accelerator.wait_for_everyone()  # then every rank ends (destroys the process group) together
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
