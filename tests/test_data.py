"""gpt2/data.py: the built-in corpus, loading local files, exact packing, streaming shards."""

import json
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from gpt2 import data as gdata  # noqa: E402
from gpt2.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Every test gets its own datasets cache under tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def _documents(n=60, seed=0):
    rng = np.random.default_rng(seed)
    words = "the model reads tokens and predicts the next one while layers attend to earlier words".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_documents(200), vocab_size=300)


@pytest.mark.slow
def test_builtin_corpus_is_offline_deterministic_and_split():
    before = set(sys.modules)
    raw = gdata.load_builtin_corpus()
    assert set(raw) == {"train", "validation"}
    assert len(raw["train"]) > 300 and len(raw["validation"]) > 10
    train_sources, valid_sources = set(raw["train"]["source"]), set(raw["validation"]["source"])
    assert not train_sources & valid_sources  # split by document
    assert any(s.startswith("pydoc_data.topics:") for s in train_sources)
    assert any(s.endswith(".py") for s in train_sources)
    assert sum(len(t) for t in raw["train"]["text"]) > 1_000_000  # enough prose to learn from
    # docstrings are read with ast: no standard-library module is imported (antigravity would open a browser)
    assert not {"antigravity", "this", "tkinter", "turtle", "idlelib"} & (set(sys.modules) - before)
    again = gdata.load_builtin_corpus()
    assert again["validation"]["source"] == raw["validation"]["source"]
    assert gdata.load_raw_datasets(gdata.BUILTIN_CORPUS)["validation"]["source"] == raw["validation"]["source"]


@pytest.mark.parametrize("block_size", [1, 17, 64])
def test_packing_is_the_exact_token_stream(tokenizer, block_size):
    docs = _documents(50)
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})})
    packed, stats = gdata.tokenize_and_pack(raw, tokenizer, block_size)
    stream = np.concatenate([np.array(enc.ids + [0]) for enc in tokenizer.encode_batch(docs)])  # EOT = 0
    rows = np.asarray(packed["train"][:]["input_ids"])
    assert rows.shape == (len(stream) // block_size, block_size)
    np.testing.assert_array_equal(rows.ravel(), stream[: rows.size])
    s = stats["train"]
    assert (s.documents, s.tokens, s.blocks) == (50, len(stream), rows.shape[0])
    assert s.dropped_tokens == len(stream) - rows.size < block_size


def test_files_carve_validation_and_cache(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(_documents(40))))
    raw = gdata.load_raw_datasets(train_file=str(path), validation_split_percentage=10)
    assert len(raw["validation"]) == 4 and len(raw["train"]) == 36
    assert gdata.load_raw_datasets(train_file=str(path), validation_split_percentage=10)["validation"]["id"] == (
        raw["validation"]["id"]
    )  # carved deterministically
    with pytest.raises(gdata.DataError, match="no 'text' column.*--text_column"):
        gdata.tokenize_and_pack(raw, tokenizer, 16)
    with pytest.raises(gdata.DataError, match="'content' not found"):
        gdata.tokenize_and_pack(raw, tokenizer, 16, text_column="content")
    packed, _ = gdata.tokenize_and_pack(raw, tokenizer, 16, text_column="body", num_proc=2)
    again, _ = gdata.tokenize_and_pack(raw, tokenizer, 16, text_column="body", num_proc=2)
    assert packed["train"].cache_files and packed["train"].cache_files == again["train"].cache_files


def test_text_files_are_read_as_they_are(tmp_path, monkeypatch):
    """A .txt file is one document with every line break kept (blank lines and whitespace-only lines
    included, as WikiText has them): its rows join back into the file, only the last ends the
    document, and cutting it into rows leaves its token ids those of the whole text."""
    paragraphs = [f"{doc}\n\n \n\n\n   indented, {doc[:20]}\n" for doc in _documents(30)]
    text = "First line\nsecond line.\n\n" + "".join(paragraphs)
    (tmp_path / "a.txt").write_text(text)
    tokenizer = train_tokenizer([text], vocab_size=400)  # with merged whitespace runs ("\n\n", "   ")
    assert len(tokenizer.encode("\n\n").ids) == 1
    monkeypatch.setattr(gdata, "TEXT_CHUNK_CHARS", 1)  # a row at every line break where a cut is allowed
    raw = gdata.load_raw_datasets(train_file=str(tmp_path / "a.txt"), validation_file=str(tmp_path / "a.txt"))
    rows = raw["train"]
    assert len(rows) > 5 and "".join(rows["text"]) == text
    assert rows["end_of_document"] == [False] * (len(rows) - 1) + [True]
    lm, stats = gdata.tokenize_and_pack(raw, tokenizer, block_size=8)
    eot = tokenizer.token_to_id("<|endoftext|>")
    whole = tokenizer.encode(text).ids + [eot]
    assert stats["train"].documents == 1 and stats["train"].tokens == len(whole)
    packed = [token for row in lm["train"].with_format(None)["input_ids"] for token in row]
    assert packed == whole[: stats["train"].blocks * 8]


def test_text_file_holds_out_its_last_lines(tmp_path):
    lines = [f"line {i} of the text" for i in range(100)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    raw = gdata.load_raw_datasets(train_file=str(tmp_path / "a.txt"), validation_split_percentage=10)
    train, valid = "".join(raw["train"]["text"]), "".join(raw["validation"]["text"])
    assert train + valid == (tmp_path / "a.txt").read_text()
    assert valid.startswith("line 90") or valid.startswith("line 89")  # from a line start, about the last 10%
    with pytest.raises(gdata.DataError, match="pass --validation_file"):
        gdata.load_raw_datasets(train_file=str(tmp_path / "a.txt"), streaming=True)


def test_bad_files_are_clear_errors(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(gdata.DataError, match="is empty"):
        gdata.load_raw_datasets(train_file=str(tmp_path / "empty.txt"))
    with pytest.raises(gdata.DataError, match="does not exist"):
        gdata.load_raw_datasets(train_file=str(tmp_path / "missing.txt"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(gdata.DataError, match="supported"):
        gdata.load_raw_datasets(train_file=str(tmp_path / "data.xml"))
    tiny = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hi"]})})
    with pytest.raises(gdata.DataError, match="fewer than one block"):
        gdata.tokenize_and_pack(tiny, tokenizer, 64)


def test_unreachable_hub_dataset_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(gdata.DataError, match=r"can't be reached.*--train_file.*builtin:pydocs"):
        gdata.load_raw_datasets("some-org/some-dataset")


def test_stream_shards_are_disjoint_and_lossless(tokenizer):
    docs = [f"document {i}: " + d for i, d in enumerate(_documents(64))]
    stream = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=4)
    shards = [
        [b["input_ids"] for b in gdata.PackedStream(stream, tokenizer, 8, rank=r, world_size=2, seed=1, buffer_size=16)]
        for r in range(2)
    ]
    # each rank's documents, decoded back from its blocks: no document is on both ranks
    seen = [set(tokenizer.decode(np.concatenate(s).tolist()).split("document ")) - {""} for s in shards]
    ids = [{x.split(":")[0] for x in part} for part in seen]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    stream_tokens = sum(len(enc.ids) + 1 for enc in tokenizer.encode_batch(docs))
    assert stream_tokens - 16 < 8 * (len(shards[0]) + len(shards[1])) <= stream_tokens  # one partial block per rank


def test_packed_dataloaders_shuffle_by_their_own_seed(tokenizer):
    """Training batches: whole batches, every block at most once, the same order for the same seed
    whatever the global RNG did in between (dropout draws from it); validation in order, capped;
    too few blocks for one step is one clear error."""
    import torch

    raw = datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": _documents(40, seed)})
                                for split, seed in (("train", 1), ("validation", 2))})
    packed, _ = gdata.tokenize_and_pack(raw, tokenizer, 16)
    orders = []
    for _ in range(2):
        train, valid = gdata.packed_dataloaders(packed, batch_size=3, eval_batch_size=4, seed=7, max_eval_samples=5)
        torch.rand(100)  # the global RNG moves; the loaders' order must not
        orders.append([row.tolist() for batch in train for row in batch["input_ids"]])
    assert orders[0] == orders[1] and len(orders[0]) == 3 * (len(packed["train"]) // 3)
    in_order = [row.tolist() for row in packed["train"][: len(orders[0])]["input_ids"]]
    assert len({tuple(r) for r in orders[0]}) == len(orders[0]) and orders[0] != in_order  # shuffled
    assert torch.equal(torch.cat([b["input_ids"] for b in valid]), packed["validation"][:5]["input_ids"])
    with pytest.raises(gdata.DataError, match="fewer than one optimizer step needs"):
        gdata.packed_dataloaders(packed, batch_size=3, eval_batch_size=4, seed=7,
                                 min_train_blocks=len(packed["train"]) + 1)


def test_data_identity_names_the_files_and_the_split(tmp_path):
    split = datasets.Dataset.from_dict({"text": ["a", "b"]})
    (tmp_path / "t.txt").write_text("x")
    named = gdata.data_identity(None, None, str(tmp_path / "t.txt"), None, split)
    assert named.startswith(str((tmp_path / "t.txt").resolve())) and split._fingerprint in named
    assert gdata.data_identity("wikitext", "wikitext-2-raw-v1", None, None, None) == "wikitext (wikitext-2-raw-v1)"
