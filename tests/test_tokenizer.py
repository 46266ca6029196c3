"""gpt2/tokenizer.py: train, save, load every supported way, and fail fast without a network."""

import time
from pathlib import Path

import pytest

from gpt2.errors import InputError
from gpt2.tokenizer import (
    EOT,
    LOADABLE_TOKENIZER_FILES,
    SAVED_TOKENIZER_FILES,
    CorruptTokenizerError,
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


def test_the_file_lists_say_what_is_saved_and_what_is_read(tokenizer, tmp_path):
    """SAVED_TOKENIZER_FILES is exactly what a save writes (a run records them all, to delete them
    on an overwrite); LOADABLE_TOKENIZER_FILES, what load_tokenizer reads, are enough to load it."""
    save_tokenizer(tokenizer, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(SAVED_TOKENIZER_FILES)
    assert set(LOADABLE_TOKENIZER_FILES) < set(SAVED_TOKENIZER_FILES)
    for name in set(SAVED_TOKENIZER_FILES) - set(LOADABLE_TOKENIZER_FILES):  # transformers' files, not ours
        (tmp_path / "tok" / name).unlink()
    assert load_tokenizer(tmp_path / "tok").encode("fox").ids == tokenizer.encode("fox").ids


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


def test_hub_name_beside_a_directory_of_that_name(monkeypatch, tmp_path, tokenizer):
    """A directory counts as a tokenizer only if it holds one: beside an empty ./gpt2 (as our package
    folder is, at the repository root), "gpt2" is the Hub's tokenizer, and the message says why."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "gpt2").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerNotFoundError, match=r"tokenizer 'gpt2' is read as a Hub id \(the local directory "
                                                     r"'gpt2' holds no tokenizer.*can't be reached"):
        load_tokenizer("gpt2")
    # Paths that are not Hub ids keep their local messages.
    for path in ("./gpt2", tmp_path / "gpt2"):
        with pytest.raises(TokenizerNotFoundError, match="neither tokenizer.json nor vocab.json"):
            load_tokenizer(path)
    with pytest.raises(TokenizerNotFoundError, match="no such tokenizer file or directory"):
        load_tokenizer("./gpt2/deeper/tok")
    # A directory that does hold a tokenizer is read, hub-like name or not.
    save_tokenizer(tokenizer, tmp_path / "gpt2")
    assert load_tokenizer("gpt2").encode("lazy dog").ids == tokenizer.encode("lazy dog").ids


def test_hub_name_gpt2_from_the_repository_root(monkeypatch, tmp_path):
    """The real case: the package folder gpt2/ holds no tokenizer, so "gpt2" goes to the Hub."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert Path("gpt2", "tokenizer.py").is_file()
    with pytest.raises(TokenizerNotFoundError, match="'gpt2' is read as a Hub id.*can't be reached"):
        load_tokenizer("gpt2")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("via", ["file", "directory"])
def test_corrupt_tokenizer_json_is_one_line_naming_the_file(tokenizer, tmp_path, damage, via):
    save_tokenizer(tokenizer, tmp_path)
    file = tmp_path / "tokenizer.json"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xffnot json", "empty": b""}[damage])
    with pytest.raises(CorruptTokenizerError) as caught:
        load_tokenizer(file if via == "file" else tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert message.startswith(f"{file} is unreadable or corrupt") and "\n" not in message, message


def test_corrupt_vocab_and_merges_is_one_line(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text('{"a": ')
    with pytest.raises(CorruptTokenizerError, match=r"vocab.json or .*merges.txt is unreadable or corrupt") as caught:
        load_tokenizer(tmp_path)
    assert "\n" not in str(caught.value)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer(TEXTS, vocab_size=100)
