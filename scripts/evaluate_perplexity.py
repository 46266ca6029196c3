"""Perplexity and bits per byte of a GPT-2 checkpoint on a text split, under a stated protocol.

The protocol (gpt2/evaluation.py has it in full): the split's texts joined with "\\n\\n" and
tokenized once; windows of --max_length tokens (default: the model's context) moving by --stride
(default: max_length // 2); each window scores only the tokens no earlier window scored, so every
token but the first is scored once, with at least max_length - stride tokens of context. Totals
are sums of NLL, tokens and bytes over windows, gathered from every process. --document_masking
keeps attention within each text (a model pretrained with --document_masking), and
--restart_positions restarts its positions there.

    # our checkpoint (a scripts/pretrain.py output directory) on a local file, CPU or one GPU
    python scripts/evaluate_perplexity.py --model_name_or_path out \\
        --validation_file my_text.txt --output_json out/eval.json

    # the no-flag pretraining run's model on the built-in corpus's held-out documents (offline)
    python scripts/evaluate_perplexity.py --model_name_or_path out --dataset_name builtin:pydocs \\
        --dataset_split validation

    # a model pretrained with --document_masking, on the built-in corpus's held-out documents
    python scripts/evaluate_perplexity.py --model_name_or_path out --dataset_name builtin:pydocs \
        --dataset_split validation --document_masking

    # Hugging Face's GPT-2 on the perplexity guide's data and setting (needs a network)
    python scripts/evaluate_perplexity.py --model_name_or_path gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --dataset_split test \\
        --max_length 1024 --stride 512 --batch_size 8 --dtype bf16

    # several processes: windows are split across them and each is counted exactly once
    accelerate launch --multi_gpu --num_processes 8 scripts/evaluate_perplexity.py --model_name_or_path gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --batch_size 8 --dtype bf16
    # two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate_perplexity.py --cpu \\
        --model_name_or_path out --validation_file my_text.txt

(`accelerate launch --cpu --num_processes 2` starts a single process: Accelerate's CPU launcher
wants mpirun. Start the processes as for GPUs, or with torchrun, and pass --cpu.)
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import cli  # first: makes the checkout importable
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gpt2.errors import exit_on_input_error
from gpt2.evaluation import (
    JOIN_SEPARATOR,
    PerplexityTotals,
    WindowDataset,
    check_window_arguments,
    collate_windows,
    load_texts,
    plan_windows,
    sequence_nll,
    tokenize_texts,
)
from gpt2.files import atomic_write_text, check_output_file


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_flags(parser, required=True, model_help="checkpoint directory or Hub name (gpt2)",
                             tokenizer_help="default: the model's directory / name")
    data = parser.add_argument_group("data (one of --dataset_name, --validation_file)")
    data.add_argument("--dataset_name", default=None, help="a Hugging Face dataset, e.g. wikitext")
    data.add_argument("--dataset_config_name", default=None, help="e.g. wikitext-2-raw-v1")
    data.add_argument("--dataset_split", default="test")
    data.add_argument(
        "--validation_file", default=None, help="txt (the whole file is one text), json, jsonl, csv or parquet"
    )
    data.add_argument("--text_column", default="text")
    data.add_argument("--max_samples", type=int, default=None, help="use only the split's first N texts")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--max_length", type=int, default=None, help="window length; default: model context")
    protocol.add_argument("--stride", type=int, default=None, help="window step; default: max_length // 2")
    protocol.add_argument("--document_masking", action="store_true",
                          help="attention stays within each text (a .txt file is one text; a dataset row is one), "
                               "as pretraining's --document_masking keeps it within each document")
    protocol.add_argument("--restart_positions", action="store_true",
                          help="with --document_masking: positions start at 0 in every text, as pretraining's flag")
    run = parser.add_argument_group("execution")
    run.add_argument("--batch_size", type=int, default=1, help="windows per forward pass, per process")
    cli.add_device_flags(run)
    parser.add_argument("--output_json", default=None, help="also write the results here")

    def check(args):
        if args.batch_size < 1:
            parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
        if args.max_samples is not None and args.max_samples < 1:
            parser.error(f"--max_samples must be at least 1, got {args.max_samples}")
        if args.dataset_name is None and args.validation_file is None:
            parser.error("give the text to score: --validation_file FILE or --dataset_name NAME (the no-flag "
                         "pretraining run held out --dataset_name builtin:pydocs --dataset_split validation)")
        if args.dataset_name is not None and args.validation_file is not None:
            parser.error("give one of --dataset_name or --validation_file, not both")
        if args.restart_positions and not args.document_masking:
            parser.error("--restart_positions needs --document_masking (positions restart at each text)")

    return cli.parse_args(parser, argv, check=check)


def window_lengths(args, n_positions: int) -> tuple[int, int]:
    max_length = args.max_length if args.max_length is not None else n_positions
    stride = args.stride if args.stride is not None else max(1, max_length // 2)
    check_window_arguments(max_length, stride, n_positions)
    return max_length, stride


def build_dataloader(stream, windows, batch_size: int, document_masking: bool = False,
                     restart_positions: bool = False) -> DataLoader:
    collate = functools.partial(collate_windows, restart_positions=restart_positions)
    return DataLoader(WindowDataset(stream, windows, documents=document_masking), batch_size=batch_size,
                      shuffle=False, collate_fn=collate)


def evaluate(model, dataloader, num_windows: int, accelerator: Accelerator) -> PerplexityTotals:
    """Per-window NLL sums and counts, gathered from every process; gather_for_metrics drops the
    windows the sampler repeated to even out the last batch, and the totals check that each window
    arrived exactly once."""
    totals = PerplexityTotals(num_windows)
    for batch in tqdm(dataloader, desc="windows", disable=not accelerator.is_local_main_process):
        nll, _ = sequence_nll(model, batch)
        gathered = accelerator.gather_for_metrics((batch["window_index"], nll, batch["num_tokens"], batch["num_bytes"]))
        totals.add(*gathered)
    totals.check_complete()
    return totals


def build_report(
    args,
    totals: PerplexityTotals,
    stream,
    num_texts: int,
    max_length: int,
    stride: int,
    model,
    accelerator: Accelerator,
    seconds: float,
) -> dict:
    source = args.validation_file or args.dataset_name
    return {
        **totals.metrics(),
        "stream_tokens": len(stream),
        "stream_bytes": stream.num_bytes,
        "protocol": (
            "sliding window (Hugging Face perplexity guide): texts joined with "
            f"{JOIN_SEPARATOR!r} and tokenized once; each window scores only tokens no earlier "
            "window scored; the first token is never scored; bytes are the UTF-8 bytes the scored "
            "tokens cover (tokenizer offsets)"
            + ("; attention within each text (document masking)" if args.document_masking else "")
            + ("; positions restart at each text" if args.restart_positions else "")
        ),
        "model": args.model_name_or_path,
        "tokenizer": args.tokenizer_name or args.model_name_or_path,
        "dataset": source,
        "dataset_config": args.dataset_config_name,
        "split": None if args.validation_file else args.dataset_split,
        "text_column": args.text_column,
        "texts": num_texts,
        "max_samples": args.max_samples,
        "max_length": max_length,
        "stride": stride,
        "document_masking": args.document_masking,
        "restart_positions": args.restart_positions,
        "dtype": args.dtype,
        "kernels": f"{model.config.attn_impl}/{model.config.norm_impl}",
        "batch_size": args.batch_size,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device.type),
        "seconds": round(seconds, 3),
    }


def print_summary(report: dict) -> None:
    width = max(map(len, report))
    for key, value in report.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


def main(argv=None) -> dict:
    cli.exit_with_launcher("evaluate_perplexity.py")
    with exit_on_input_error("evaluate_perplexity.py"):
        args = parse_args(argv)
        with cli.ending(Accelerator(cpu=cli.use_cpu(args.cpu))) as accelerator:
            return perplexity_report(args, accelerator)


def perplexity_report(args, accelerator: Accelerator) -> dict:
    """Load, plan the windows, score them on every process, print and return the report."""
    if args.output_json:  # before any work: a path that can't take the report fails now, not after
        inputs = [p for p in (args.validation_file, args.model_name_or_path, args.tokenizer_name) if p]
        with cli.about(f"--output_json {args.output_json}"):
            check_output_file(args.output_json, inputs)
    model, tokenizer = cli.load_model_and_tokenizer(args, accelerator.device)
    for note in cli.tokenizer_notes(args, model, tokenizer):
        accelerator.print(note)
    max_length, stride = window_lengths(args, model.config.n_positions)
    with accelerator.main_process_first():  # one process fills the datasets cache, the others read it
        texts = load_texts(args.dataset_name, args.dataset_config_name, args.dataset_split,
                           args.validation_file, args.text_column, args.max_samples)
    stream = tokenize_texts(tokenizer, texts)
    windows = plan_windows(len(stream), max_length, stride)
    start = time.perf_counter()
    dataloader = build_dataloader(stream, windows, args.batch_size, args.document_masking, args.restart_positions)
    dataloader = accelerator.prepare(dataloader)  # shards the windows
    totals = evaluate(model, dataloader, len(windows), accelerator)
    report = build_report(
        args, totals, stream, len(texts), max_length, stride, model, accelerator, time.perf_counter() - start
    )
    if accelerator.is_main_process:
        print_summary(report)
        if args.output_json:
            Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output_json, json.dumps(report, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
