"""gpt2/tokenizer.py: train, save, load every supported way, and fail fast without a network."""

import time

import pytest

from gpt2.tokenizer import (
    EOT,
    TokenizerNotFoundError,
    eos_token_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main(argv=None):\n    return 0\n",
    "Attention is all you need; layer norm is nice too.",
    "Ünïcödé and émojis 🙂 must round-trip through byte-level BPE.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_trained_tokenizer_is_byte_level_bpe_with_eot(tokenizer):
    assert 257 <= tokenizer.get_vocab_size() <= 400
    assert eos_token_id(tokenizer) == tokenizer.token_to_id(EOT) == 0
    for text in TEXTS[:4] + ["never seen: ☃ 字 \t\n", ""]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text  # bytes alphabet: no unknown tokens, exact round trip
    ids = tokenizer.encode(f"a{EOT}b").ids
    assert ids.count(0) == 1  # the special token is one id, not split into bytes


def test_save_and_load_every_way(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok", model_max_length=64)
    text = "The lazy dog 🙂 returns 0."
    expected = tokenizer.encode(text).ids
    assert load_tokenizer(tmp_path / "tok").encode(text).ids == expected
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").encode(text).ids == expected
    # HF GPT-2's original layout: vocab.json + merges.txt only
    gpt2_style = tmp_path / "gpt2_style"
    gpt2_style.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (gpt2_style / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    loaded = load_tokenizer(gpt2_style)
    assert loaded.encode(text).ids == expected
    assert eos_token_id(loaded) == 0


def test_transformers_autotokenizer_reads_saved_directory(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tokenizer, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Attention is all you need."
    assert hf(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf.eos_token == EOT and hf.eos_token_id == 0


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path)


def test_unreachable_hub_fails_fast_with_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # not cached either
    start = time.perf_counter()
    with pytest.raises(TokenizerNotFoundError, match="can't be reached.*local tokenizer.json"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    assert time.perf_counter() - start < 10


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer(TEXTS, vocab_size=100)
