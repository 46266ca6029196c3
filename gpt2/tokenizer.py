"""Tokenizers: load one (a file, a directory, or a hub name), or train a byte-level BPE on our text.

Everything here returns a plain `tokenizers.Tokenizer` (the Rust library behind transformers'
fast tokenizers): `tok.encode(text).ids`, `tok.encode_batch(texts)`, `tok.decode(ids)`.

    load_tokenizer("out/")                 # a directory holding tokenizer.json (what pretrain saves)
    load_tokenizer("out/tokenizer.json")   # the file itself
    load_tokenizer("gpt2-local/")          # HF GPT-2 style vocab.json + merges.txt
    load_tokenizer("gpt2")                 # the hub, when a network is there (a quick clear error otherwise);
                                           # a directory ./gpt2 counts only if it holds tokenizer files
    tok = train_tokenizer(texts, vocab_size=8192)   # byte-level BPE with <|endoftext|>, like GPT-2's
    save_tokenizer(tok, "out/")            # tokenizer.json + files that transformers' AutoTokenizer reads
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gpt2.errors import InputError, first_line
from gpt2.hub import is_hub_id, local_directory_note, require_hub

EOT = "<|endoftext|>"  # GPT-2's document separator; our trained tokenizers reserve it as a special token
# What save_tokenizer writes into a directory (vocab.json and merges.txt for a BPE only).
SAVED_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                         "special_tokens_map.json")
# What load_tokenizer reads from a directory: any of them makes it a tokenizer directory.
LOADABLE_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
# Separator tokens of other tokenizer families, tried in order when <|endoftext|> is absent.
_EOS_CANDIDATES = (EOT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# What a local directory needs for a name such as "gpt2" to be read as it, not as a Hub id.
LOCAL_TOKENIZER = "tokenizer files: no tokenizer.json, no vocab.json + merges.txt"


class TokenizerNotFoundError(InputError, OSError):
    """A tokenizer path or hub name that can't be loaded; the message says what would work."""


class CorruptTokenizerError(InputError):
    """A tokenizer file that is there but can't be read: truncated, garbled, or not a tokenizer."""


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json file, a directory holding tokenizer.json (or GPT-2's vocab.json + merges.txt),
    or a hub repository name such as "gpt2" (unless a directory of that name holds tokenizer files)."""
    path, name = Path(path_or_name), str(path_or_name)
    if path.is_file():
        return _from_tokenizer_json(path)
    if is_hub_id(name) and not any((path / file).is_file() for file in LOADABLE_TOKENIZER_FILES):
        return _from_hub(name)
    if not path.is_dir():
        raise TokenizerNotFoundError(f"{path}: no such tokenizer file or directory")
    if (path / "tokenizer.json").is_file():
        return _from_tokenizer_json(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _from_vocab_and_merges(path / "vocab.json", path / "merges.txt")
    raise TokenizerNotFoundError(
        f"{path} holds neither tokenizer.json nor vocab.json + merges.txt; "
        f"point at a directory written by scripts/pretrain.py or save_tokenizer()"
    )


def _from_tokenizer_json(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it can't parse
        message = f"{file} is unreadable or corrupt: not a tokenizer.json ({first_line(err)})"
        raise CorruptTokenizerError(message) from None


def _from_vocab_and_merges(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2's original files: a byte-level BPE, no prefix space, <|endoftext|> as a special token."""
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as err:  # noqa: BLE001 - as in _from_tokenizer_json
        raise CorruptTokenizerError(f"{vocab} or {merges} is unreadable or corrupt ({first_line(err)})") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.token_to_id(EOT) is not None:
        tokenizer.add_special_tokens([EOT])
    return tokenizer


def _from_hub(name: str) -> Tokenizer:
    """tokenizer.json from the hub (cache first), or the repo's vocab.json + merges.txt."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str, local_only: bool) -> str | None:
        try:
            return hf_hub_download(name, filename, local_files_only=local_only)
        except Exception:  # not cached / not in the repo / not a repo: try the next source
            return None

    for local_only in (True, False):
        if not local_only:
            require_hub(
                name, "tokenizer",
                "Use a local tokenizer.json or directory (scripts/pretrain.py saves one in its --output_dir), or "
                "leave --tokenizer_name unset to train a BPE tokenizer on the training text.",
                error=TokenizerNotFoundError, local_files=LOCAL_TOKENIZER,
            )
        file = fetch("tokenizer.json", local_only)
        if file:
            return _from_tokenizer_json(Path(file))
        vocab, merges = fetch("vocab.json", local_only), fetch("merges.txt", local_only)
        if vocab and merges:
            return _from_vocab_and_merges(Path(vocab), Path(merges))
    note = local_directory_note(name, LOCAL_TOKENIZER)
    raise TokenizerNotFoundError(
        f"{name!r} is not a local tokenizer file or directory, and the hub repository {name!r} "
        f"has no tokenizer.json or vocab.json + merges.txt" + (f"; {note}" if note else "")
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, length: int | None = None
) -> Tokenizer:
    """A byte-level BPE trained with tokenizers' BpeTrainer, GPT-2 style.

    The 256 byte symbols are always in the alphabet, so any text encodes without unknown tokens;
    <|endoftext|> is special token 0. The result has at most vocab_size tokens (fewer when the text
    runs out of pairs seen min_frequency times).
    """
    if vocab_size < 257:
        raise InputError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_non_empty(texts), trainer=trainer, length=length)
    return tokenizer


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    return (text for text in texts if text)


def eos_token_id(tokenizer: Tokenizer) -> int | None:
    """The id of the end-of-text token (<|endoftext|>, or </s>-style for other families); None if none."""
    for token in _EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def require_eos_token_id(tokenizer: Tokenizer) -> int:
    """eos_token_id for packing documents, which needs one: InputError when the tokenizer has none."""
    eot_id = eos_token_id(tokenizer)
    if eot_id is None:
        raise InputError("the tokenizer has no end-of-text token (<|endoftext|> or </s>) to separate documents")
    return eot_id


def save_tokenizer(
    tokenizer: Tokenizer, output_dir: str | os.PathLike, *, model_max_length: int | None = None
) -> None:
    """Write tokenizer.json (plus vocab.json + merges.txt for a BPE), tokenizer_config.json and
    special_tokens_map.json, so transformers' AutoTokenizer.from_pretrained(output_dir) loads it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    if isinstance(tokenizer.model, models.BPE):  # vocab.json + merges.txt, for GPT-2's slow tokenizer
        tokenizer.model.save(str(output_dir))
    eos_id = eos_token_id(tokenizer)
    eos = tokenizer.id_to_token(eos_id) if eos_id is not None else None
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos} if eos else {}
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or int(1e30),
        **special,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (output_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
