"""Perplexity under a stated protocol: one token stream, sliding windows, every token scored once.

The protocol is the one in Hugging Face's perplexity guide
(https://huggingface.co/docs/transformers/perplexity):

1. the texts are joined with "\\n\\n" and tokenized once, as one stream of N tokens;
2. windows of `max_length` tokens start at 0, stride, 2*stride, ... until one reaches the end;
3. each window scores only the tokens the previous window didn't, so with stride < max_length
   every token but the first is scored exactly once, each with at least max_length - stride
   tokens of context (all of them when stride == 1). With stride == max_length the windows are
   disjoint and a window's first token, having no context inside it, is not scored (as in the
   guide); the counts below say exactly how many tokens were scored.

Unlike the guide, which subtracts one token per window from its count, the token count here is
exact, and totals are sums of per-window NLL and counts, never means of means.

Bytes: a token's span ends at its end character offset from the tokenizer (a running maximum,
so overlapping spans, as when a byte-level BPE splits one character over two tokens, count
once), converted to a UTF-8 byte position; it starts where the previous token's span ended. The
last token's span runs to the end of the text. So the scored tokens of a stream cover every byte
after the first token, and bits per byte is total NLL / (ln 2 * those bytes): a number that does
not depend on the tokenizer. Offsets come from encoding without the tokenizer's post-processor,
which would otherwise add special tokens or trim whitespace out of the spans.

Documents (document_masking): the texts joined with "\\n\\n" are still one stream, but each
token also carries its text's index (a token belongs to the text its first character lies in; the
separator's tokens end the text before them, as the end-of-text token ends a document in packed
pretraining), and attention in a window stays within each text. A token then sees at most its own
text's earlier tokens in the window, and the first token of a text is predicted from the end of
the one before it, as after an end-of-text token. With restart_positions, positions start at 0 at
each text's first token in the window (or at the window's start for a text that began before it).

Everything here is device- and process-agnostic; scripts/evaluate_perplexity.py adds Accelerate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from gpt2.data import (
    BUILTIN_CORPUS,
    FILE_BUILDERS,
    check_text_column,
    file_builder,
    load_builtin_corpus,
    resolve_text_column,
)
from gpt2.documents import document_kwargs, document_positions
from gpt2.errors import InputError, first_line
from gpt2.hub import hub_offline, require_hub
from gpt2.loss import IGNORE_INDEX

JOIN_SEPARATOR = "\n\n"  # between texts of a split, as in the Hugging Face perplexity guide


class EvaluationInputError(InputError):
    """Bad input to the evaluation (data, arguments): the message says what and what to do."""


# --------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    begin: int  # first token in the window: context starts here
    end: int  # one past the last token in the window
    score_from: int  # first token this window scores; it scores tokens score_from .. end - 1

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The sliding windows of the protocol over a stream of num_tokens tokens."""
    if num_tokens < 2:
        raise EvaluationInputError(
            f"the text is {num_tokens} token(s) long; perplexity needs at least 2 (the first token is never scored)"
        )
    check_window_arguments(max_length, stride)
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        # A token needs one token of context inside its window, so position `begin` is never scored.
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def check_window_arguments(max_length: int, stride: int, n_positions: int | None = None) -> None:
    if max_length < 2:
        raise EvaluationInputError(f"--max_length must be at least 2, got {max_length}")
    if n_positions is not None and max_length > n_positions:
        raise EvaluationInputError(
            f"--max_length {max_length} is longer than the model's context (n_positions={n_positions})"
        )
    if not 0 < stride <= max_length:
        raise EvaluationInputError(
            f"--stride must be in [1, max_length={max_length}], got {stride} "
            f"(stride == max_length gives disjoint windows)"
        )


# --------------------------------------------------------------------------------------------
# Token stream and byte accounting


@dataclass
class TokenStream:
    ids: torch.Tensor  # (N,) int64 token ids
    byte_ends: torch.Tensor  # (N,) int64: UTF-8 byte position where token i's span ends
    num_bytes: int  # UTF-8 bytes in the whole text
    document_ids: torch.Tensor  # (N,) int64, non-decreasing: the text each token belongs to

    def __len__(self) -> int:
        return self.ids.numel()

    def bytes_between(self, first: int, end: int) -> int:
        """UTF-8 bytes covered by tokens first .. end - 1 (first >= 1)."""
        return int(self.byte_ends[end - 1] - self.byte_ends[first - 1])


def utf8_byte_positions(text: str) -> torch.Tensor:
    """(len(text) + 1,) int64: entry c is len(text[:c].encode("utf-8"))."""
    code_points = torch.frombuffer(bytearray(text.encode("utf-32-le", "surrogatepass")), dtype=torch.int32)
    widths = 1 + (code_points >= 0x80).long() + (code_points >= 0x800).long() + (code_points >= 0x10000).long()
    return torch.cat([torch.zeros(1, dtype=torch.long), widths.cumsum(0)])


def tokenize_stream(tokenizer, text: str, text_starts: list[int] | None = None) -> TokenStream:
    """Tokenize text once (a tokenizers.Tokenizer), without special tokens, with byte spans.
    text_starts: the character offsets where the joined texts begin (text_offsets); a token
    belongs to the last text that begins at or before its first character. None: one text."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(tokenizer.to_str())
    raw.post_processor = None  # no added special tokens, no whitespace trimmed out of offsets
    encoding = raw.encode(text, add_special_tokens=False)
    ids = torch.tensor(encoding.ids, dtype=torch.long)
    if ids.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return TokenStream(ids, empty, len(text.encode("utf-8", "surrogatepass")), empty)
    char_ends = torch.tensor([end for _, end in encoding.offsets], dtype=torch.long).cummax(0).values
    positions = utf8_byte_positions(text)
    byte_ends = positions[char_ends]
    byte_ends[-1] = positions[-1]  # text after the last token's span belongs to the last token
    document_ids = torch.zeros_like(ids)
    if text_starts is not None and len(text_starts) > 1:
        char_starts = torch.tensor([start for start, _ in encoding.offsets], dtype=torch.long).cummax(0).values
        later_starts = torch.tensor(text_starts[1:], dtype=torch.long)
        document_ids = torch.searchsorted(later_starts, char_starts, right=True)
    return TokenStream(ids, byte_ends, int(positions[-1]), document_ids)


def join_texts(texts: list[str]) -> str:
    return JOIN_SEPARATOR.join(texts)


def text_offsets(texts: list[str]) -> list[int]:
    """The character offset at which each text begins in join_texts(texts)."""
    starts, offset = [], 0
    for text in texts:
        starts.append(offset)
        offset += len(text) + len(JOIN_SEPARATOR)
    return starts


def tokenize_texts(tokenizer, texts: list[str]) -> TokenStream:
    """The protocol's stream of texts (joined with JOIN_SEPARATOR), each token knowing its text."""
    return tokenize_stream(tokenizer, join_texts(texts), text_offsets(texts))


# --------------------------------------------------------------------------------------------
# Batches of windows and their scores


class WindowDataset(torch.utils.data.Dataset):
    """Item i is window i of the stream: its tokens, labels (IGNORE_INDEX where not scored) and
    the byte count of its scored tokens; with documents, also its tokens' document_ids (the
    stream's, counted from 0 in the window)."""

    def __init__(self, stream: TokenStream, windows: list[Window], documents: bool = False):
        self.stream, self.windows, self.documents = stream, windows, documents

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        w = self.windows[index]
        input_ids = self.stream.ids[w.begin : w.end]
        labels = input_ids.clone()
        labels[: w.score_from - w.begin] = IGNORE_INDEX
        item = dict(
            window_index=index,
            input_ids=input_ids,
            labels=labels,
            num_tokens=w.num_scored,
            num_bytes=self.stream.bytes_between(w.score_from, w.end),
        )
        if self.documents:
            ids = self.stream.document_ids[w.begin : w.end]
            item["document_ids"] = ids - ids[0]
        return item


def collate_windows(items: list[dict], pad_token_id: int = 0, restart_positions: bool = False) -> dict:
    """Right-pad windows to the longest; causal attention keeps padding out of earlier positions
    (with document_ids, the padding is a document of its own). restart_positions: position_ids
    that start at 0 in every document (items with document_ids only)."""
    length = max(item["input_ids"].numel() for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : item["input_ids"].numel()] = item["input_ids"]
        labels[row, : item["labels"].numel()] = item["labels"]
    batch = dict(
        window_index=torch.tensor([item["window_index"] for item in items], dtype=torch.long),
        input_ids=input_ids,
        labels=labels,
        num_tokens=torch.tensor([item["num_tokens"] for item in items], dtype=torch.long),
        num_bytes=torch.tensor([item["num_bytes"] for item in items], dtype=torch.long),
    )
    if "document_ids" in items[0]:
        document_ids = torch.empty((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = item["document_ids"].numel()
            document_ids[row, :n] = item["document_ids"]
            document_ids[row, n:] = item["document_ids"][-1] + 1
        batch["document_ids"] = document_ids
        if restart_positions:
            batch["position_ids"] = document_positions(document_ids)
    return batch


@torch.no_grad()
def sequence_nll(model, batch: dict, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a batch: the sum of next-token NLL in float64 (B,), and the number of tokens
    scored (B,). The targets are batch["labels"] (input_ids when it has none) shifted by one, those
    equal to IGNORE_INDEX not scored; document-masked when the batch carries document ids. Through
    the model's chunked loss, so the batch's logits never exist whole. Both evaluations (this
    module's windows, pretraining's validation blocks) sum NLL here."""
    device = device if device is not None else batch["input_ids"].device
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device) if "labels" in batch else input_ids
    token_nll = model(input_ids, labels=labels, reduction="none", **document_kwargs(batch, device))  # (B, T-1)
    return token_nll.double().sum(1), (labels[:, 1:] != IGNORE_INDEX).sum(1)


# --------------------------------------------------------------------------------------------
# Totals across batches and processes


@dataclass
class PerplexityTotals:
    """Sums over windows, fed with per-window values gathered from every process."""

    num_windows: int  # windows in the plan; each must be added exactly once
    nll_sum: float = 0.0  # nats, summed over scored tokens
    tokens: int = 0
    bytes: int = 0
    seen: torch.Tensor = field(default=None, repr=False)  # (num_windows,) times each window was added

    def __post_init__(self):
        if self.seen is None:
            self.seen = torch.zeros(self.num_windows, dtype=torch.long)

    def add(self, window_index, nll, num_tokens, num_bytes) -> None:
        """Per-window 1-D tensors of equal length (any device), e.g. from gather_for_metrics."""
        self.seen.index_add_(0, window_index.cpu(), torch.ones_like(window_index.cpu()))
        self.nll_sum += float(nll.double().sum())
        self.tokens += int(num_tokens.sum())
        self.bytes += int(num_bytes.sum())

    def check_complete(self) -> None:
        """Raise RuntimeError unless every window was counted exactly once."""
        missing = int((self.seen == 0).sum())
        repeated = int((self.seen > 1).sum())
        if missing or repeated:
            raise RuntimeError(
                f"window accounting is wrong: {missing} window(s) missing and {repeated} counted more "
                f"than once out of {self.num_windows}; the totals would be biased"
            )

    def metrics(self) -> dict:
        nll_per_token = self.nll_sum / self.tokens if self.tokens else math.nan
        return dict(
            perplexity=math.exp(nll_per_token) if self.tokens else math.nan,
            nll_per_token=nll_per_token,
            bits_per_token=nll_per_token / math.log(2),
            bits_per_byte=self.nll_sum / (math.log(2) * self.bytes) if self.bytes else math.nan,
            nll_sum=self.nll_sum,
            tokens=self.tokens,
            bytes=self.bytes,
            windows=self.num_windows,
        )


# --------------------------------------------------------------------------------------------
# Data


def load_texts(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    dataset_split: str = "test",
    validation_file: str | None = None,
    text_column: str = "text",
    max_samples: int | None = None,
) -> list[str]:
    """The texts of a split: a Hugging Face dataset, or a local txt/json/jsonl/parquet file.

    A .txt file is one text, the whole file (lines are not samples; newlines are normalised to
    "\\n" by the reader); json/jsonl/parquet files and datasets give one text per row of
    text_column. Raises EvaluationInputError with a short message on any failure to load.
    """
    if (dataset_name is None) == (validation_file is None):
        raise EvaluationInputError("give exactly one of --dataset_name or --validation_file")
    import datasets

    if validation_file is not None:
        builder, kwargs = file_builder(validation_file), {}
        if builder is None:
            raise EvaluationInputError(
                f"--validation_file must end in one of {sorted(FILE_BUILDERS)}, got {validation_file!r}"
            )
        if not os.path.isfile(validation_file):
            raise EvaluationInputError(f"--validation_file {validation_file!r} does not exist")
        if builder == "text":
            kwargs["sample_by"] = "document"
        source = f"--validation_file {validation_file!r}"
        load = lambda: datasets.load_dataset(builder, data_files=validation_file, split="train", **kwargs)
    elif dataset_name == BUILTIN_CORPUS:
        if dataset_split not in ("train", "validation"):
            raise EvaluationInputError(f"{BUILTIN_CORPUS} has splits 'train' and 'validation', not {dataset_split!r}")
        source = f"{BUILTIN_CORPUS} split {dataset_split!r}"
        load = lambda: load_builtin_corpus()[dataset_split]
    else:
        if not (os.path.exists(dataset_name) or hub_offline()):  # offline mode: the local cache
            require_hub(dataset_name, "dataset", "Pass --validation_file, or set HF_HUB_OFFLINE=1 to use the local "
                        "cache.", error=EvaluationInputError)
        source = f"dataset {dataset_name!r}" + (f" ({dataset_config_name})" if dataset_config_name else "")
        source += f" split {dataset_split!r}"
        load = lambda: datasets.load_dataset(dataset_name, dataset_config_name, split=dataset_split)
    try:
        dataset = load()
    except Exception as error:  # datasets raises many types; all mean "could not load"
        raise EvaluationInputError(f"could not load {source}: {first_line(error)}") from None
    resolve_text_column(dataset.column_names, text_column)  # there, and text: a DataError otherwise
    check_text_column(dataset, text_column)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    # Empty rows stay: the guide joins every row (wikitext's blank lines included) with "\n\n".
    texts = [text for text in dataset[text_column] if text is not None]
    if not any(texts):
        raise EvaluationInputError(f"{source} has no non-empty text in column {text_column!r}")
    return texts
