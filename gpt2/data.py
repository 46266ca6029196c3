"""Pretraining data: raw text from the hub, local files or the built-in corpus, tokenized and packed.

    raw = load_raw_datasets()                                   # the built-in corpus, "builtin:pydocs"
    raw = load_raw_datasets("wikitext", "wikitext-103-raw-v1")  # a hub dataset
    raw = load_raw_datasets(train_file="train.txt")             # local files (txt, json, jsonl, csv, parquet)
    lm = tokenize_and_pack(raw, tokenizer, block_size=256)      # {"train", "validation"} of input_ids rows

The built-in corpus, BUILTIN_CORPUS = "builtin:pydocs", is English prose that every Python
install carries: the reference-manual topics bundled as `pydoc_data.topics` plus the docstrings of
the standard library's modules, classes and functions, read from the source files with `ast` (so
no module is imported): one document per topic and per module, about 650 documents and 2.2 MB of
text (on Python 3.11; 530k tokens with an 8k BPE), with a fixed train/validation split by name.

A .txt file is one document, read as it is, every line break kept (as the evaluation reads it):
it is cut into rows of about TEXT_CHUNK_CHARS characters at places where the cut cannot change
its tokenization, and only its last row ends the document. Without a validation file, the last
validation_split_percentage of its text (from a line start) is held out.

Packing (non-streaming): every document is followed by the end-of-text token, the whole token
stream is cut into block_size rows, and only the final partial block is dropped (PackingStats
says how many tokens). Both steps run through `datasets.map`, so they are cached on disk and run
in parallel with num_proc; call them inside `accelerator.main_process_first()` so that one process
builds the cache and the others read it. Which document each token of a packed row belongs to, for
document masking, is gpt2/documents.py's (WithDocumentIds collates it).

Streaming (`load_raw_datasets(..., streaming=True)` then `stream_packed_blocks`): an
IterableDataset, shuffled through a buffer and split between ranks with split_dataset_by_node, so
each rank reads different documents; packing carries the leftover tokens from one document to the
next, so nothing is dropped at all.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from gpt2.errors import InputError, first_line

BUILTIN_CORPUS = "builtin:pydocs"
BUILTIN_VALIDATION_PERCENT = 5  # share of built-in documents (by a hash of their name) held out
STREAMING_VALIDATION_DOCUMENTS = 1000  # a stream without a validation split holds out its first documents

# File extensions and the `datasets` builder that reads each (training and evaluation alike).
FILE_BUILDERS = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


class DataError(InputError):
    """Bad or unreachable input data; the message says what is wrong and what would work."""


def file_builder(path: str | os.PathLike) -> str | None:
    """The `datasets` builder that reads a local file, by its extension; None when unsupported."""
    return FILE_BUILDERS.get(Path(path).suffix.lstrip(".").lower())


# --------------------------------------------------------------------------- the built-in corpus


def _stdlib_python_files() -> list[Path]:
    """The standard library's .py files in a fixed order, without tests and third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _module_docstrings(path: Path) -> str:
    """A module's docstrings (module, then classes and functions in source order), blank-line separated."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(doc.strip() for doc in docs if doc and doc.strip())


def _builtin_documents(split: str, python_version: str):
    """Generator for Dataset.from_generator. python_version is only part of the cache key: another
    Python carries other docs. A document lands in validation by a hash of its name, so the split
    never depends on order or on how many documents there are."""
    import pydoc_data.topics  # a data module: one dict of reference-manual sections

    def wanted(name: str) -> bool:
        in_validation = zlib.crc32(name.encode()) % 100 < BUILTIN_VALIDATION_PERCENT
        return in_validation == (split == "validation")

    for topic, text in sorted(pydoc_data.topics.topics.items()):
        name = f"pydoc_data.topics:{topic}"
        if text.strip() and wanted(name):
            yield {"text": text.strip(), "source": name}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_python_files():
        name = path.relative_to(root).as_posix()
        if wanted(name):
            text = _module_docstrings(path)
            if text:
                yield {"text": text, "source": name}


def load_builtin_corpus(cache_dir: str | None = None):
    """The built-in corpus as a DatasetDict {"train", "validation"} with columns text and source."""
    from datasets import Dataset, DatasetDict

    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return DatasetDict(
        {
            split: Dataset.from_generator(
                _builtin_documents,
                gen_kwargs={"split": split, "python_version": version},
                cache_dir=cache_dir,
            )
            for split in ("train", "validation")
        }
    )


# --------------------------------------------------------------------------- loading raw text


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: int = 5,
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """{"train", "validation"} raw text from the built-in corpus (no name, or BUILTIN_CORPUS), local
    files, a local dataset directory, or the hub. Without a validation split, one is carved off the
    training split deterministically (validation_split_percentage of the rows, fixed seed)."""
    from datasets import DatasetDict, IterableDatasetDict

    if train_file or validation_file:
        if dataset_name:
            raise DataError("pass either --dataset_name or --train_file/--validation_file, not both")
        raw = _load_files(train_file, validation_file, streaming, cache_dir, validation_split_percentage)
    elif dataset_name in (None, BUILTIN_CORPUS):
        raw = load_builtin_corpus(cache_dir)
        if streaming:
            raw = IterableDatasetDict({k: v.to_iterable_dataset(num_shards=8) for k, v in raw.items()})
    else:
        raw = _load_named(dataset_name, dataset_config_name, streaming, cache_dir)

    if "train" not in raw:
        raise DataError(f"dataset has no 'train' split; splits: {sorted(raw)}")
    if "validation" not in raw:
        held_out = next((s for s in ("valid", "val", "test") if s in raw), None)
        if held_out:
            raw["validation"] = raw[held_out]
        elif streaming:
            train = raw["train"]
            raw["validation"] = train.take(STREAMING_VALIDATION_DOCUMENTS)
            raw["train"] = train.skip(STREAMING_VALIDATION_DOCUMENTS)
        else:
            if len(raw["train"]) < 2:
                raise DataError(
                    f"the training data has {len(raw['train'])} row(s): too few to carve a validation "
                    f"split from; pass --validation_file or more data"
                )
            test_size = max(1, round(len(raw["train"]) * validation_split_percentage / 100))
            split = raw["train"].train_test_split(test_size=test_size, seed=0, shuffle=True)
            raw["train"], raw["validation"] = split["train"], split["test"]
    cls = IterableDatasetDict if streaming else DatasetDict
    return cls({"train": raw["train"], "validation": raw["validation"]})


def _load_files(train_file, validation_file, streaming, cache_dir, validation_split_percentage):
    from datasets import load_dataset

    data_files = {}
    for split, file in (("train", train_file), ("validation", validation_file)):
        if file:
            if not Path(file).exists():
                raise DataError(f"--{split}_file {file} does not exist")
            if Path(file).is_file() and Path(file).stat().st_size == 0:
                raise DataError(f"--{split}_file {file} is empty")
            data_files[split] = file
    if "train" not in data_files:
        raise DataError("--validation_file needs a --train_file too")
    extensions = {Path(f).suffix.lstrip(".").lower() for f in data_files.values()}
    builders = {file_builder(f) for f in data_files.values()}
    if None in builders or len(builders) != 1:
        raise DataError(
            f"can't read files with extension(s) {sorted(extensions)} together; supported: "
            f"{sorted(FILE_BUILDERS)} (all files of one kind)"
        )
    builder = builders.pop()
    kwargs = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
    try:
        raw = load_dataset(builder, data_files=data_files, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except Exception as err:  # datasets' builders raise many types for unreadable files
        raise DataError(f"could not read {sorted(data_files.values())} as {builder}: {err}") from err
    if builder != "text":
        return raw
    if "validation" not in raw:
        if streaming:
            raise DataError("a streamed .txt file is one document, with no rows to hold out: pass --validation_file")
        raw = _hold_out_text_end(raw, validation_split_percentage)
    progress = {} if streaming else {"desc": "Cutting text into rows"}  # a stream maps lazily, without a bar
    return raw.map(_chunk_documents, batched=True, remove_columns=["text"], fn_kwargs={"every": TEXT_CHUNK_CHARS},
                   **progress)


TEXT_CHUNK_CHARS = 1 << 20  # a .txt document is tokenized in rows of about this many characters
# Where a row may end: a line break between two non-space characters. The byte-level BPE's
# pre-tokenizer splits before and after such a line break anyway, so a cut there leaves the token
# ids exactly those of the whole document (a cut inside a run of whitespace or a word would not).
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _safe_cuts(text: str, every: int) -> list[int]:
    """Offsets that cut text into pieces of at least `every` characters, each just after a safe line break."""
    cuts, start = [], 0
    while start + every < len(text):
        found = _SAFE_CUT.search(text, start + every)
        if found is None:
            break
        start = found.end()
        cuts.append(start)
    return cuts


def _chunk_documents(batch, every: int):
    """Rows of at most about `every` characters from each document; end_of_document marks its last row."""
    texts, ends = [], []
    for text in batch["text"]:
        bounds = [0, *_safe_cuts(text, every), len(text)]
        texts += [text[a:b] for a, b in zip(bounds, bounds[1:])]
        ends += [False] * (len(bounds) - 2) + [True]
    return {"text": texts, "end_of_document": ends}


def _hold_out_text_end(raw, percentage: int):
    """{"train", "validation"} from one-document text: the validation split is the text's last
    `percentage` percent, from the start of a line."""
    from datasets import Dataset, DatasetDict

    text = "".join(raw["train"]["text"])
    cut = text.rfind("\n", 0, round(len(text) * (1 - percentage / 100))) + 1
    if cut <= 0 or cut >= len(text):
        raise DataError(f"the training text has no line break to hold out its last {percentage}% at; pass "
                        f"--validation_file")
    return DatasetDict({"train": Dataset.from_dict({"text": [text[:cut]]}),
                        "validation": Dataset.from_dict({"text": [text[cut:]]})})


def _load_named(name, config_name, streaming, cache_dir):
    """A hub dataset, or a local dataset directory (load_from_disk output or data files)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            data = load_from_disk(str(path))
            data = data if isinstance(data, DatasetDict) else DatasetDict({"train": data})
            return DatasetDict({k: v.to_iterable_dataset() for k, v in data.items()}) if streaming else data
        return load_dataset(str(path), config_name, streaming=streaming, cache_dir=cache_dir)

    from gpt2.hub import hub_offline, require_hub

    alternatives = (
        "Use local files (--train_file data.txt [--validation_file val.txt]; txt, json, jsonl, csv or "
        f"parquet), a local dataset directory, or the built-in offline corpus (--dataset_name "
        f"{BUILTIN_CORPUS}, the default)."
    )
    if not hub_offline():  # offline mode: straight to the local cache
        require_hub(name, "dataset", f"{alternatives} A dataset already in the local cache loads with "
                    f"HF_HUB_OFFLINE=1.", error=DataError)
    try:
        return load_dataset(name, config_name, streaming=streaming, cache_dir=cache_dir)
    except Exception as err:  # DatasetNotFoundError, ConnectionError, missing config, ...
        raise DataError(f"could not load dataset {name!r} (config {config_name!r}): {first_line(err)}. "
                        f"{alternatives}") from err


def resolve_text_column(column_names: list[str] | None, text_column: str | None) -> str:
    """The column holding the text: the one asked for, else "text", else the only column."""
    if column_names is None:  # a stream whose features are unknown until read
        return text_column or "text"
    if text_column:
        _check_column(column_names, text_column)
        return text_column
    if "text" in column_names:
        return "text"
    if len(column_names) == 1:
        return column_names[0]
    raise DataError(f"no 'text' column; pick one of {column_names} with --text_column")


# --------------------------------------------------------------------------- tokenize and pack


@dataclass
class PackingStats:
    """What packing did to one split: the token stream and what was cut off its end."""

    documents: int
    tokens: int  # including one end-of-text token per document
    blocks: int
    dropped_tokens: int  # the final partial block
    rows_without_text: int = 0  # null in the text column: dropped


def _tokenize_batch(batch, tokenizer, text_column: str, eot_id: int):
    """Token ids of each row, followed by the end-of-text token where the row ends a document
    (every row, unless an end_of_document column says otherwise)."""
    texts = batch[text_column]  # text, or None: a row without text is dropped (no end-of-text either)
    ends = batch.get("end_of_document") or [True] * len(texts)
    encoded = tokenizer.encode_batch([text or "" for text in texts])
    return {"input_ids": [enc.ids + [eot_id] * end if text is not None else []
                          for enc, end, text in zip(encoded, ends, texts)]}


def _pack_batch(batch, tokenized, doc_starts, block_size: int):
    """Rows block, block+1, ... of the concatenated token stream: find the documents that cover the
    token range [first * block_size, (last + 1) * block_size) and cut it into block_size rows."""
    import pyarrow.compute as pc

    blocks = np.asarray(batch["block"], dtype=np.int64)
    start, stop = int(blocks[0]) * block_size, (int(blocks[-1]) + 1) * block_size
    first_doc = int(np.searchsorted(doc_starts, start, side="right")) - 1
    last_doc = int(np.searchsorted(doc_starts, stop, side="left"))  # exclusive
    column = tokenized.data.slice(first_doc, last_doc - first_doc).column("input_ids")
    tokens = pc.list_flatten(column).to_numpy()
    offset = start - int(doc_starts[first_doc])
    tokens = tokens[offset : offset + stop - start].reshape(len(blocks), block_size)
    return {"input_ids": tokens.tolist()}



def _check_column(columns, column: str) -> None:
    """columns: a dataset's column names, or a batch (a dict by column) read from a stream, whose
    values are checked too: text or nothing (null)."""
    if column not in columns:
        raise DataError(f"text column {column!r} not found; columns: {sorted(columns)} (--text_column)")
    if isinstance(columns, dict):
        wrong = next((value for value in columns[column] if value is not None and not isinstance(value, str)), None)
        if wrong is not None:
            raise _not_text(column, f"{type(wrong).__name__} values such as {str(wrong)[:40]!r}")


def _not_text(column: str, found: str) -> DataError:
    return DataError(f"text column {column!r} holds {found}, not text; name the column that holds the text "
                     f"(--text_column)")


def check_text_column(dataset, column: str) -> int:
    """A map-style split's text column holds strings (nulls allowed, and dropped): DataError naming
    the type found otherwise, an int or list column say, which would train on nothing. Returns how
    many rows are null."""
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        found = f"{feature.dtype} values" if hasattr(feature, "dtype") else f"{type(feature).__name__} values"
        raise _not_text(column, found)
    return dataset.with_format("arrow")[column].null_count  # this split's rows (a split may index a shared table)


def text_sample(dataset, column: str, max_chars: int):
    """The string texts from the start of a split, up to max_chars in all: what a tokenizer trains on
    (a sample of a big corpus). Works on streams too."""
    seen = 0
    for batch in dataset.iter(batch_size=1000):
        _check_column(batch, column)
        for text in batch[column]:
            if seen >= max_chars:
                return
            if isinstance(text, str):
                seen += len(text)
                yield text

def tokenize_and_pack(raw, tokenizer, block_size: int, *, text_column: str | None = None, num_proc=None):
    """Non-streaming: (DatasetDict of {"input_ids": block_size ints} rows, {split: PackingStats}).

    Tokenization and packing are datasets.map calls, cached next to the raw data's cache files
    (in-memory data such as from_dict is not cached)."""
    from datasets import Dataset, DatasetDict
    from datasets.fingerprint import Hasher

    from gpt2.tokenizer import require_eos_token_id

    eot_id = require_eos_token_id(tokenizer)
    packed, stats = DatasetDict(), {}
    for split, dataset in raw.items():
        column = resolve_text_column(dataset.column_names, text_column)
        if len(dataset) == 0:
            raise DataError(f"the {split} split is empty")
        nulls = check_text_column(dataset, column)
        tokenized = dataset.map(
            _tokenize_batch,
            batched=True,
            num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= num_proc else None,
            remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer, "text_column": column, "eot_id": eot_id},
            desc=f"Tokenizing {split}",
        )
        import pyarrow.compute as pc

        lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_numpy()
        doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(doc_starts[-1])
        n_blocks = total // block_size
        documents = sum(dataset["end_of_document"]) if "end_of_document" in dataset.column_names else len(dataset)
        stats[split] = PackingStats(documents - nulls, total, n_blocks, total - n_blocks * block_size, nulls)
        if n_blocks == 0:
            raise DataError(
                f"the {split} split has {total} tokens, fewer than one block of {block_size}; "
                f"use more data or a smaller --block_size"
            )
        fingerprint = Hasher.hash([tokenized._fingerprint, block_size, "pack-v1"])
        cache_file = None
        if tokenized.cache_files:
            cache_file = str(Path(tokenized.cache_files[0]["filename"]).parent / f"packed-{fingerprint}.arrow")
        blocks = Dataset.from_dict({"block": np.arange(n_blocks, dtype=np.int64)})
        packed[split] = blocks.map(
            _pack_batch,
            batched=True,
            batch_size=max(1, 65536 // block_size),
            num_proc=num_proc if num_proc and num_proc > 1 and n_blocks >= num_proc else None,
            remove_columns=["block"],
            fn_kwargs={"tokenized": tokenized, "doc_starts": doc_starts, "block_size": block_size},
            cache_file_name=cache_file,
            new_fingerprint=fingerprint,
            desc=f"Packing {split} into blocks of {block_size}",
        )
    return packed.with_format("torch"), stats


def stream_packed_blocks(dataset, tokenizer, block_size: int, *, text_column: str | None = None):
    """Streaming: {"input_ids": LongTensor(block_size)} dicts from an IterableDataset. Leftover tokens
    carry into the next block, so only the stream's last partial block is lost."""
    from gpt2.tokenizer import require_eos_token_id

    eot_id = require_eos_token_id(tokenizer)
    column = resolve_text_column(dataset.column_names, text_column)
    buffer: list[int] = []
    for batch in dataset.iter(batch_size=256):
        _check_column(batch, column)
        for ids in _tokenize_batch(batch, tokenizer, column, eot_id)["input_ids"]:
            buffer.extend(ids)
        while len(buffer) >= block_size:
            yield {"input_ids": torch.tensor(buffer[:block_size], dtype=torch.long)}
            del buffer[:block_size]


class PackedStream(torch.utils.data.IterableDataset):
    """A torch-style iterable of packed blocks from a streaming dataset, for one rank.

    Each pass shuffles the documents through a buffer (reseeded per pass: seed + epoch) and keeps
    this rank's part with split_dataset_by_node, so ranks read disjoint documents. shuffle=False
    gives one plain pass (validation); epochs=None repeats forever (training runs by step count).
    """

    def __init__(self, dataset, tokenizer, block_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, buffer_size: int = 10_000, epochs: int | None = 1,
                 text_column: str | None = None):
        self.dataset, self.tokenizer, self.block_size = dataset, tokenizer, block_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.buffer_size, self.epochs, self.text_column = buffer_size, epochs, text_column

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            dataset = self.dataset
            if self.shuffle:
                dataset = dataset.shuffle(seed=self.seed, buffer_size=self.buffer_size)
                dataset.set_epoch(epoch)
            dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
            blocks = 0
            for block in stream_packed_blocks(dataset, self.tokenizer, self.block_size, text_column=self.text_column):
                blocks += 1
                yield block
            if blocks == 0:
                raise DataError(f"rank {self.rank}'s share of the stream holds less than one block of tokens")
            epoch += 1


# --------------------------------------------------------------------------------------------
# DataLoaders for pretraining


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator. Without one, every new iterator (each evaluation, the first
    batch after a resume) draws its seed from the global RNG, which dropout draws from too, so a
    resumed run would drop out other units than an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def packed_dataloaders(packed, *, batch_size: int, eval_batch_size: int, seed: int, collate=None,
                       max_eval_samples: int | None = None, min_train_blocks: int = 1):
    """(train, validation) DataLoaders over tokenize_and_pack's blocks: training blocks shuffled,
    whole batches only; validation blocks in order, at most max_eval_samples. DataError when the
    training blocks are fewer than min_train_blocks (what one optimizer step takes)."""
    validation = packed["validation"]
    if max_eval_samples:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    if len(packed["train"]) < min_train_blocks:
        raise DataError(f"the training split packs into {len(packed['train'])} blocks, fewer than one optimizer "
                        f"step needs ({min_train_blocks}); use more data or a smaller --block_size / "
                        f"--per_device_train_batch_size")
    train = DataLoader(packed["train"], shuffle=True, drop_last=True, batch_size=batch_size,
                       generator=loader_generator(seed), collate_fn=collate)
    return train, DataLoader(validation, batch_size=eval_batch_size, generator=loader_generator(seed),
                             collate_fn=collate)


def stream_dataloaders(raw, tokenizer, block_size: int, *, batch_size: int, eval_batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1, buffer_size: int = 10_000, text_column: str | None = None,
                       collate=None, max_eval_samples: int | None = None):
    """(train, validation) DataLoaders over streamed splits, this rank's share of each: training
    shuffled through a buffer and repeated forever (a run goes by steps); validation one pass, its
    first max_eval_samples blocks read once and kept."""
    train = PackedStream(raw["train"], tokenizer, block_size, rank=rank, world_size=world_size, seed=seed,
                         buffer_size=buffer_size, epochs=None, text_column=text_column)
    valid = PackedStream(raw["validation"], tokenizer, block_size, rank=rank, world_size=world_size, shuffle=False,
                         epochs=1, text_column=text_column)
    if max_eval_samples:
        valid = list(itertools.islice(valid, max_eval_samples))
    return (DataLoader(train, batch_size=batch_size, generator=loader_generator(seed), collate_fn=collate),
            DataLoader(valid, batch_size=eval_batch_size, generator=loader_generator(seed), collate_fn=collate))


def data_identity(dataset_name: str | None, dataset_config_name: str | None, train_file: str | None,
                  validation_file: str | None, train_split) -> str:
    """Names the training data, so a resume can refuse other data: the dataset or files, and the
    datasets fingerprint of the training split where it has one (map-style data)."""
    source = dataset_name or BUILTIN_CORPUS
    if train_file:
        source = " + ".join(str(Path(f).resolve()) for f in (train_file, validation_file) if f)
    elif dataset_config_name:
        source += f" ({dataset_config_name})"
    fingerprint = getattr(train_split, "_fingerprint", None)
    return f"{source}, fingerprint {fingerprint}" if fingerprint else source
