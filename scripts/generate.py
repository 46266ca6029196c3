"""Sample text from a GPT-2 checkpoint with the KV-cache sampler (gpt2/generation.py).

    # our checkpoint (a scripts/pretrain.py output directory), two prompts, three samples each
    python scripts/generate.py --model_name_or_path out/gpt2-tiny \\
        --prompt "ROMEO:" --prompt "The meaning of life is" --num_samples 3 \\
        --max_new_tokens 100 --temperature 0.8 --top_k 50 --seed 0

    # prompts from a file, one per line; greedy decoding; Hugging Face's GPT-2 (needs a network)
    python scripts/generate.py --model_name_or_path gpt2 --prompt_file prompts.txt --temperature 0

    # on a GPU with our Triton kernels in bf16
    python scripts/generate.py --model_name_or_path gpt2 --prompt "Hello" --kernels triton --dtype bf16

An empty prompt starts from <|endoftext|> (GPT-2's unconditional sampling). Each sample is
printed under a "=== prompt i, sample j ===" header, prompt included; generation stops at the
end-of-text token.
"""

from __future__ import annotations

import math
from pathlib import Path

import cli  # first: makes the checkout importable
import torch
from accelerate import Accelerator

from gpt2.errors import InputError, exit_on_input_error
from gpt2.generation import NonFiniteLogitsError
from gpt2.tokenizer import eos_token_id

MAX_SAMPLES = 1024  # samples of one prompt, generated as one batch with its KV cache


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_flags(parser, required=True, model_help="checkpoint directory or Hub name (gpt2)",
                             tokenizer_help="default: the model's directory / name")
    parser.add_argument("--prompt", action="append", default=None, help="repeat for several prompts")
    parser.add_argument("--prompt_file", default=None, help="a UTF-8 file, one prompt per non-empty line")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with mass p")
    parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt (one batch)")
    parser.add_argument("--seed", type=int, default=42)
    cli.add_device_flags(parser)

    def check(args):
        if args.max_new_tokens < 1:
            parser.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
        if not 1 <= args.num_samples <= MAX_SAMPLES:
            parser.error(f"--num_samples must be in [1, {MAX_SAMPLES}] (a prompt's samples are one batch), "
                         f"got {args.num_samples}")
        if not (math.isfinite(args.temperature) and args.temperature >= 0):
            parser.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
        if not 0 <= args.seed < 2**64:
            parser.error(f"--seed must be in [0, 2**64), got {args.seed}")
        if args.top_k is not None and args.top_k < 1:
            parser.error(f"--top_k must be at least 1, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            parser.error(f"--top_p must be in (0, 1], got {args.top_p}")

    return cli.parse_args(parser, argv, check=check)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise InputError(f"can't read --prompt_file: {error}") from None
        except UnicodeDecodeError as error:
            raise InputError(f"--prompt_file {args.prompt_file} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start})") from None
        prompts += [line for line in lines if line.strip()]
    return prompts or [""]


def encode_prompt(tokenizer, prompt: str, eos_id: int | None) -> list[int]:
    ids = tokenizer.encode(prompt).ids
    if not ids:
        if eos_id is None:
            raise InputError("an empty prompt needs an end-of-text token to start from, and this tokenizer has none")
        ids = [eos_id]
    return ids


def sample(model, prompt_ids: list[int], args, eos_id: int | None, generator: torch.Generator,
           tokenizer_size: int | None = None) -> list[list[int]]:
    """num_samples continuations of one prompt, as one batch; each cut at its first end-of-text;
    no id the tokenizer lacks (tokenizer_size)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids] * args.num_samples, device=device)
    try:
        output = model.generate(  # an InputError when prompt + max_new_tokens exceed the context
            input_ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=eos_id,
            use_cache=True,
            generator=generator,
            vocab_size=tokenizer_size,
        )
    except NonFiniteLogitsError:
        overflow = ", or its activations overflow fp16 (try --dtype bf16 or fp32)" if args.dtype == "fp16" else ""
        raise InputError(f"{args.model_name_or_path}: the model's logits are not finite (nan/inf), so there is "
                         f"nothing to sample from: the checkpoint's weights or config are broken{overflow}") from None
    completions = []
    for row in output[:, len(prompt_ids) :].tolist():
        completions.append(row[: row.index(eos_id)] if eos_id in row else row)
    return completions


def main(argv=None) -> list[dict]:
    cli.exit_with_launcher("generate.py")
    with exit_on_input_error("generate.py"):
        args = parse_args(argv)
        with cli.ending(Accelerator(cpu=cli.use_cpu(args.cpu))) as accelerator:
            model, tokenizer = cli.load_model_and_tokenizer(args, accelerator.device)
            return generate_samples(args, model, tokenizer, accelerator.device)


def generate_samples(args, model, tokenizer, device) -> list[dict]:
    """Every prompt's samples, printed under a header and returned as dicts."""
    eos_id = eos_token_id(tokenizer)
    for note in cli.tokenizer_notes(args, model, tokenizer):
        print(note, flush=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    for i, prompt in enumerate(read_prompts(args), start=1):
        prompt_ids = encode_prompt(tokenizer, prompt, eos_id)
        completions = sample(model, prompt_ids, args, eos_id, generator, tokenizer.get_vocab_size())
        for j, completion in enumerate(completions, start=1):
            text = tokenizer.decode(prompt_ids + completion)  # whole, so a character split at the seam joins
            print(f"=== prompt {i}, sample {j} ===\n{text}\n", flush=True)
            samples.append(dict(prompt=prompt, sample=j, token_ids=completion, text=text))
    return samples


if __name__ == "__main__":
    main()
