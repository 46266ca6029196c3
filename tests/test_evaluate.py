"""scripts/evaluate_perplexity.py and gpt2/evaluation.py: the window plan, byte accounting, the
total NLL against an independent per-token brute force, invariance to batch size, dtype and
process count, and a clear message for every bad input."""

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import expect_input_error, load_script

from gpt2 import GPT2, GPT2Config
from gpt2.evaluation import WindowDataset, collate_windows, plan_windows, tokenize_stream, tokenize_texts
from gpt2.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate_perplexity.py"
WORDS = "the a cat sat on mat naïve café 日本 😀 über rock roll and then of to is was ¿qué? 42 —".split()


evaluate_perplexity = load_script(SCRIPT)


def sample_text(num_words: int, seed: int) -> str:
    """Words, including multi-byte characters (2-, 3- and 4-byte UTF-8), spaces and newlines."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) + rng.choice(["", "", "", ",", ".\n", "\n\n"]) for _ in range(num_words)]
    return " ".join(words)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny GPT-2 and a 300-token byte-level BPE, saved the way pretraining saves them."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_tokenizer([sample_text(3000, seed=1)], vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=tokenizer.get_vocab_size())
    GPT2(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(sample_text(100, seed=2), encoding="utf-8")
    return path


def run_eval(checkpoint, data_file, *extra) -> dict:
    return evaluate_perplexity.main(
        ["--model_name_or_path", str(checkpoint), "--validation_file", str(data_file), *map(str, extra)]
    )


def brute_force_nll(checkpoint, text: str, context_start) -> tuple[float, int]:
    """Sum over tokens t >= 1 of -log p(token t | tokens context_start(t) .. t-1), in float64,
    from plain logits: shares no code with the script but the model. Contexts of equal length go
    through the model together, one row per scored token."""
    ids = load_tokenizer(checkpoint).encode(text).ids
    model = GPT2.from_pretrained(checkpoint).double().eval()
    by_length = {}
    for t in range(1, len(ids)):
        by_length.setdefault(t - context_start(t), []).append(ids[context_start(t) : t + 1])
    total = 0.0
    with torch.no_grad():
        for rows in by_length.values():
            rows = torch.tensor(rows)  # (n, context + 1): the context, then the token scored
            log_probs = torch.log_softmax(model(rows[:, :-1])[:, -1].double(), dim=-1)
            total -= log_probs.gather(1, rows[:, -1:]).sum().item()
    return total, len(ids) - 1


# --------------------------------------------------------------------------------------------
# The window plan and the byte accounting


@pytest.mark.parametrize(
    "num_tokens, max_length, stride", [(2, 2, 1), (17, 8, 4), (97, 16, 5), (100, 10, 10), (129, 32, 31), (5, 64, 32)]
)
def test_windows_score_each_token_once(num_tokens, max_length, stride):
    windows = plan_windows(num_tokens, max_length, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert all(w.end - w.begin <= max_length and w.begin < w.score_from <= w.end for w in windows)
    assert [w.begin for w in windows] == list(range(0, stride * len(windows), stride))
    assert windows[-1].end == num_tokens
    if stride < max_length:  # every token but the first, exactly once, in order
        assert scored == list(range(1, num_tokens))
    else:  # disjoint windows: each window's first token has no context and is not scored
        assert scored == [t for t in range(num_tokens) if t % max_length]


def test_byte_spans_match_the_tokens_bytes(text_file):
    """For a byte-level BPE each token is a known byte string: the spans built from offsets must
    end where the tokens' bytes end, wherever a token ends on a character boundary, and the whole
    stream must cover the text's bytes."""
    tokenizer = train_tokenizer([sample_text(3000, seed=1)], vocab_size=300)
    text = text_file.read_text(encoding="utf-8")
    stream = tokenize_stream(tokenizer, text)
    byte_decoder = {char: byte for byte, char in enumerate(_bytes_to_unicode())}
    token_bytes = [bytes(byte_decoder[c] for c in tokenizer.id_to_token(i)) for i in stream.ids.tolist()]
    assert b"".join(token_bytes) == text.encode("utf-8")
    ends = torch.tensor([len(b) for b in token_bytes]).cumsum(0)
    on_char_boundary = torch.tensor([_is_char_boundary(text.encode(), int(e)) for e in ends])
    assert (~on_char_boundary).any(), "the test text should make the BPE split some character"
    assert torch.equal(stream.byte_ends[on_char_boundary], ends[on_char_boundary])
    assert stream.num_bytes == len(text.encode("utf-8"))
    assert stream.bytes_between(1, len(stream)) == stream.num_bytes - len(token_bytes[0])
    windows = plan_windows(len(stream), 16, 5)
    assert sum(item["num_bytes"] for item in WindowDataset(stream, windows)) == stream.num_bytes - len(token_bytes[0])


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet), indexed by byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _is_char_boundary(data: bytes, position: int) -> bool:
    return position == len(data) or (data[position] & 0xC0) != 0x80


def test_padded_batch_labels():
    stream = tokenize_stream(train_tokenizer(["ab ab ab abc"] * 20, vocab_size=260), "ab abc ab ab abc")
    windows = plan_windows(len(stream), 4, 3)
    batch = collate_windows([WindowDataset(stream, windows)[i] for i in range(len(windows))])
    scored = (batch["labels"][:, 1:] != -100).sum(1)
    assert scored.tolist() == batch["num_tokens"].tolist() == [w.num_scored for w in windows]


# --------------------------------------------------------------------------------------------
# Exactness of the script's totals


def test_total_nll_matches_brute_force(checkpoint, text_file, tmp_path):
    max_length, stride = 16, 5
    report = run_eval(
        checkpoint,
        text_file,
        "--max_length",
        max_length,
        "--stride",
        stride,
        "--batch_size",
        3,
        "--output_json",
        tmp_path / "eval.json",
    )

    def context_start(t):  # the protocol's window for token t: the first whose end is past t
        k = next(k for k in range(t + 1) if k * stride + max_length > t)
        return k * stride

    expected, tokens = brute_force_nll(checkpoint, text_file.read_text(encoding="utf-8"), context_start)
    assert report["tokens"] == tokens == report["stream_tokens"] - 1
    assert report["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert report["nll_per_token"] == pytest.approx(expected / tokens, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(expected / tokens), rel=1e-5)
    assert report["bits_per_token"] == pytest.approx(expected / tokens / math.log(2), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(expected / report["bytes"] / math.log(2), rel=1e-5)
    assert report["windows"] == len(plan_windows(report["stream_tokens"], max_length, stride))
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(report)


def test_stride_one_is_full_context_scoring(checkpoint, text_file):
    """stride 1: every token is scored with the max_length - 1 tokens before it (or all of them)."""
    text = text_file.read_text(encoding="utf-8")[:200]
    data = text_file.parent / "short.txt"
    data.write_text(text, encoding="utf-8")
    report = run_eval(checkpoint, data, "--max_length", 8, "--stride", 1, "--batch_size", 16)
    expected, tokens = brute_force_nll(checkpoint, text, lambda t: max(0, t - 7))
    assert report["tokens"] == tokens
    assert report["nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_defaults_and_disjoint_windows(checkpoint, text_file):
    report = run_eval(checkpoint, text_file)
    assert (report["max_length"], report["stride"]) == (32, 16)  # the model's context, half of it
    disjoint = run_eval(checkpoint, text_file, "--stride", 32)
    assert disjoint["tokens"] == disjoint["stream_tokens"] - disjoint["windows"]
    assert disjoint["nll_per_token"] > report["nll_per_token"] - 0.5  # sanity, not a model-quality claim


def test_invariant_to_batch_size(checkpoint, text_file):
    reports = [run_eval(checkpoint, text_file, "--max_length", 12, "--stride", 7, "--batch_size", b) for b in (1, 4, 7)]
    for report in reports[1:]:
        for key in ("tokens", "bytes", "windows"):
            assert report[key] == reports[0][key]
        assert report["nll_sum"] == pytest.approx(reports[0]["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("dtype, rel", [("bf16", 2e-2), ("fp16", 5e-3)])
def test_low_precision_close_to_fp32(checkpoint, text_file, dtype, rel):
    fp32 = run_eval(checkpoint, text_file, "--batch_size", 4)
    low = run_eval(checkpoint, text_file, "--batch_size", 4, "--dtype", dtype)
    assert low["tokens"] == fp32["tokens"] and low["dtype"] == dtype
    assert low["nll_sum"] == pytest.approx(fp32["nll_sum"], rel=rel)


def test_eager_kernels_agree(checkpoint, text_file):
    sdpa = run_eval(checkpoint, text_file, "--kernels", "sdpa")
    eager = run_eval(checkpoint, text_file, "--kernels", "eager")
    assert eager["kernels"] == "eager/torch"
    assert eager["nll_sum"] == pytest.approx(sdpa["nll_sum"], rel=1e-6)


def test_on_a_faster_gpu_auto_picks_our_kernels_for_a_model_with_dropout(checkpoint, tmp_path, monkeypatch):
    """The scripts' inference path on a GPU where our kernels are measured faster, for a checkpoint
    whose config has dropout (HF's gpt2 has 0.1): --kernels auto gives our Triton kernels (dropout
    does nothing in eval mode), and the model's logits are SDPA's. CI has no GPU: the device is
    named cuda, of a family with a faster result, while the model stays on this CPU (Triton's
    interpreter runs the kernels)."""
    from gpt2 import registry

    monkeypatch.setattr(registry, "cuda_capability", lambda: (9, 0))
    monkeypatch.setitem(registry.TRITON_TRAINING_SPEEDUP, (9, 0), (1.3, "faster.csv"))
    with_dropout = tmp_path / "dropout"
    model = GPT2.from_pretrained(checkpoint)
    model.config.dropout = 0.1
    model.save_pretrained(with_dropout)
    save_tokenizer(load_tokenizer(checkpoint), with_dropout)
    to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, device=None, **kwargs: to(self, **kwargs))
    args = argparse.Namespace(model_name_or_path=str(with_dropout), tokenizer_name=None, kernels="auto", dtype="fp32")
    ours, _ = evaluate_perplexity.cli.load_model_and_tokenizer(args, torch.device("cuda"))
    assert (ours.config.attn_impl, ours.config.norm_impl, ours.config.dropout) == ("triton", "triton", 0.1)
    assert not ours.training
    ids = torch.randint(0, ours.config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), GPT2.from_pretrained(with_dropout).eval()(ids), rtol=1e-5, atol=1e-5)


def test_jsonl_rows_joined_and_capped(checkpoint, tmp_path):
    rows = [sample_text(20, seed=s) for s in range(5)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"body": row, "id": i}) + "\n" for i, row in enumerate(rows)))
    report = run_eval(checkpoint, data, "--text_column", "body", "--max_samples", 3)
    single = tmp_path / "joined.txt"
    single.write_text("\n\n".join(rows[:3]), encoding="utf-8")
    joined = run_eval(checkpoint, single)
    assert report["texts"] == 3
    assert (report["tokens"], report["bytes"]) == (joined["tokens"], joined["bytes"])
    assert report["nll_sum"] == pytest.approx(joined["nll_sum"], rel=1e-9)


def test_builtin_corpus_split(checkpoint):
    """The command pretraining prints for its default data: the built-in corpus's validation split."""
    from gpt2.data import BUILTIN_CORPUS, load_builtin_corpus

    report = evaluate_perplexity.main(["--model_name_or_path", str(checkpoint), "--dataset_name", BUILTIN_CORPUS,
                                       "--dataset_split", "validation", "--max_samples", "2", "--stride", "32"])
    expected = "\n\n".join(load_builtin_corpus()["validation"]["text"][:2])
    assert report["stream_bytes"] == len(expected.encode("utf-8"))
    expect_input_error(evaluate_perplexity.main, ["--model_name_or_path", checkpoint, "--dataset_name", BUILTIN_CORPUS],
                       "has splits 'train' and 'validation'")


# --------------------------------------------------------------------------------------------
# Document masking: attention within each text


def write_rows(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")
    return path


def test_document_ids_follow_text_boundaries(checkpoint):
    """Each text's tokens decode to the text and the separator after it: the separator ends the
    text before it, as the end-of-text token ends a packed document."""
    tokenizer = load_tokenizer(checkpoint)
    texts = [sample_text(n, seed=10 + n) for n in (7, 1, 12, 3)]
    stream = tokenize_texts(tokenizer, texts)
    ids = stream.document_ids
    assert (ids[1:] >= ids[:-1]).all() and ids[0] == 0 and ids[-1] == len(texts) - 1
    for j, text in enumerate(texts):
        decoded = tokenizer.decode(stream.ids[ids == j].tolist(), skip_special_tokens=False)
        assert decoded == text + ("\n\n" if j < len(texts) - 1 else "")


def test_document_masked_nll_matches_brute_force(checkpoint, tmp_path):
    """--document_masking --restart_positions: token t is predicted from the tokens of its
    predecessor's text inside t's window only, positions counted from where that context starts:
    exactly a plain model run on that slice alone."""
    max_length, stride = 16, 5
    texts = [sample_text(n, seed=20 + n) for n in (9, 2, 14, 1, 6)]
    data = write_rows(tmp_path / "rows.jsonl", texts)
    report = run_eval(checkpoint, data, "--max_length", max_length, "--stride", stride, "--batch_size", 3,
                      "--document_masking", "--restart_positions")
    document = tokenize_texts(load_tokenizer(checkpoint), texts).document_ids.tolist()
    doc_start = [next(i for i in range(t + 1) if document[i] == document[t]) for t in range(len(document))]

    def context_start(t):
        window = next(k for k in range(t + 1) if k * stride + max_length > t) * stride
        return max(window, doc_start[t - 1])

    expected, tokens = brute_force_nll(checkpoint, "\n\n".join(texts), context_start)
    assert len(set(document)) == len(texts) and report["document_masking"] and report["restart_positions"]
    assert report["tokens"] == tokens
    assert report["nll_sum"] == pytest.approx(expected, rel=1e-5)
    unmasked = run_eval(checkpoint, data, "--max_length", max_length, "--stride", stride)
    # the tolerance above tells the two apart (an untrained model leans on context only a little)
    assert unmasked["tokens"] == tokens and unmasked["nll_sum"] != pytest.approx(expected, rel=1e-5)


def test_document_masking_with_rope_needs_no_restarted_positions(checkpoint, tmp_path):
    """Rotary positions are relative: masked attention without --restart_positions already scores
    each token as a model run on its own text's slice of the window alone."""
    rope = tmp_path / "rope"
    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, position_embedding="rope",
                        vocab_size=load_tokenizer(checkpoint).get_vocab_size())
    with pytest.warns(UserWarning, match="no transformers GPT-2 equivalent"):
        GPT2(config).save_pretrained(rope)
    save_tokenizer(load_tokenizer(checkpoint), rope)
    max_length, stride = 16, 5
    texts = [sample_text(n, seed=40 + n) for n in (8, 3, 11)]
    data = write_rows(tmp_path / "rows.jsonl", texts)
    report = run_eval(rope, data, "--max_length", max_length, "--stride", stride, "--document_masking")
    document = tokenize_texts(load_tokenizer(rope), texts).document_ids.tolist()
    doc_start = [document.index(document[t]) for t in range(len(document))]

    def context_start(t):
        window = next(k for k in range(t + 1) if k * stride + max_length > t) * stride
        return max(window, doc_start[t - 1])

    expected, tokens = brute_force_nll(rope, "\n\n".join(texts), context_start)
    assert report["tokens"] == tokens and not report["restart_positions"]
    assert report["nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_document_masking_of_one_text_changes_nothing(checkpoint, text_file):
    plain = run_eval(checkpoint, text_file, "--batch_size", 4)
    masked = run_eval(checkpoint, text_file, "--batch_size", 4, "--document_masking", "--restart_positions")
    assert masked["tokens"] == plain["tokens"]
    assert masked["nll_sum"] == pytest.approx(plain["nll_sum"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(checkpoint, text_file, tmp_path):
    """Two CPU processes (gloo): the windows are split between them, the sampler repeats some to
    even out the last batch, and the totals still count each window once.

    `accelerate launch --cpu --num_processes 2` starts one process (accelerate's CPU path wants
    mpirun), so the processes are started as for GPUs and the script's --cpu picks gloo."""
    args = ["--model_name_or_path", checkpoint, "--validation_file", text_file, "--max_length", 12, "--stride", 7]
    one = run_eval(checkpoint, text_file, *args[4:], "--batch_size", 3)
    assert one["windows"] % 6, "the window count should leave a ragged last batch across 2 x 3"
    output = tmp_path / "two.json"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [*launch, SCRIPT, *args, "--batch_size", 3, "--cpu", "--output_json", output]
    result = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(output.read_text())
    assert two["num_processes"] == 2
    for key in ("tokens", "bytes", "windows", "stream_tokens"):
        assert two[key] == one[key]
    assert two["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)


def test_wikitext2_test_split(checkpoint, shared_data, tmp_path):
    """Real text: the start of the wikitext-2 test file (the whole file is 1.1M tokens under this
    300-token BPE, too slow for the suite), disjoint windows, every byte accounted for."""
    text = (Path(shared_data) / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:30_000]
    path = tmp_path / "wikitext-2-test-head.txt"
    path.write_text(text, encoding="utf-8")
    report = run_eval(checkpoint, path, "--stride", 32, "--batch_size", 256)
    assert report["stream_bytes"] == len(text.encode("utf-8"))
    assert report["tokens"] == report["stream_tokens"] - report["windows"]
    assert 0 < report["bytes"] < report["stream_bytes"]
    vocab = load_tokenizer(checkpoint).get_vocab_size()
    # An untrained model sits near the uniform distribution's log(vocab) nats per token.
    assert abs(report["nll_per_token"] - math.log(vocab)) < 0.5


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback, within seconds


def expect_error(argv, *fragments, within: float = 10.0):
    return expect_input_error(evaluate_perplexity.main, argv, *fragments, within=within)


def test_missing_checkpoint(tmp_path, text_file):
    expect_error(["--model_name_or_path", tmp_path / "nope", "--validation_file", text_file], "no such checkpoint")


def test_non_gpt2_checkpoint(tmp_path, text_file):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    expect_error(["--model_name_or_path", tmp_path, "--validation_file", text_file], "not a GPT-2 checkpoint")


def test_unreachable_dataset(checkpoint, monkeypatch):
    """Without a network the Hub probe answers in seconds; with one, the Hub says there is no such
    dataset. Either way: one line, no traceback."""
    expect_error(
        ["--model_name_or_path", checkpoint, "--dataset_name", "gpt2-suite-tests/no-such-dataset-3f9a"],
        "no-such-dataset-3f9a",
        within=30.0,
    )


def test_missing_validation_file(checkpoint, tmp_path):
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", tmp_path / "x.txt"], "does not exist")


def test_empty_split(checkpoint, tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", tmp_path / "empty.jsonl"], "no non-empty")


def test_text_shorter_than_two_tokens(checkpoint, tmp_path):
    (tmp_path / "one.txt").write_text("a")
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", tmp_path / "one.txt"], "at least 2")


def test_missing_text_column(checkpoint, tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"body": "hello there"}]))
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", tmp_path / "rows.json"], "--text_column")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--stride", 17, "--max_length", 16], "--stride must be in [1, max_length=16]"),
        (["--stride", 0], "--stride must be in"),
        (["--stride", -3], "--stride must be in"),
        (["--max_length", 64], "longer than the model's context"),
        (["--max_length", 1], "at least 2"),
    ],
)
def test_bad_window_arguments(checkpoint, text_file, extra, fragment):
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", text_file, *extra], fragment)


def test_restart_positions_needs_document_masking(checkpoint, text_file):
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", text_file, "--restart_positions"],
                 "--restart_positions needs --document_masking")


def test_no_text_names_the_offline_choice(checkpoint, text_file):
    """No data flag: the message names the held-out text a no-flag pretraining run can be scored on."""
    expect_error(["--model_name_or_path", checkpoint], "--dataset_name builtin:pydocs --dataset_split validation")
    expect_error(["--model_name_or_path", checkpoint, "--validation_file", text_file, "--dataset_name", "x"],
                 "not both")


def test_output_json_is_checked_before_the_work_and_never_an_input(checkpoint, text_file, tmp_path, monkeypatch):
    """A path that can't take the report fails in a second, before the model loads (the loader is
    made to fail if it is reached); an input (the text, a file of the checkpoint) is refused and
    left as it was; a good path gets the report through a temporary file and a rename."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("the evaluation started before --output_json was checked")

    (tmp_path / "a_file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anywhere: fake the read-only directory
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    text_before, config_before = text_file.read_bytes(), (checkpoint / "config.json").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(evaluate_perplexity.cli, "load_model_and_tokenizer", must_not_load)
        for output, fragment in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "r.json", "is a file"),
                                 (locked / "r.json", "not writable"), (text_file, "is one of the inputs"),
                                 (checkpoint / "config.json", "is one of the inputs")):
            expect_error(["--model_name_or_path", checkpoint, "--validation_file", text_file,
                          "--output_json", output], "--output_json", fragment)
    assert text_file.read_bytes() == text_before and (checkpoint / "config.json").read_bytes() == config_before
    report = run_eval(checkpoint, text_file, "--output_json", tmp_path / "new" / "r.json")
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == json.loads(json.dumps(report))
    assert os.listdir(tmp_path / "new") == ["r.json"]
    inode = (tmp_path / "new" / "r.json").stat().st_ino  # a second report replaces the file (a rename),
    run_eval(checkpoint, text_file, "--output_json", tmp_path / "new" / "r.json")  # never rewrites it in place
    assert (tmp_path / "new" / "r.json").stat().st_ino != inode and os.listdir(tmp_path / "new") == ["r.json"]


def test_a_last_window_of_one_token(checkpoint, tmp_path):
    """Disjoint windows (--stride = --max_length) over N = 1 (mod stride) tokens end with a window of
    one token, alone in its batch: it scores nothing, and the totals are the brute force's over the
    other windows (each scores its tokens after the first, in float64)."""
    tokenizer = load_tokenizer(checkpoint)
    text = sample_text(60, seed=5)
    while len(tokenizer.encode(text).ids) % 4 != 1:
        text += " a"
    ids = tokenizer.encode(text).ids
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    report = run_eval(checkpoint, tmp_path / "t.txt", "--max_length", 4, "--stride", 4, "--batch_size", 1)
    model = GPT2.from_pretrained(checkpoint).double().eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 4):
            window = torch.tensor([ids[start : start + 4]])
            if window.shape[1] > 1:
                log_probs = torch.log_softmax(model(window)[0, :-1].double(), dim=-1)
                nll -= log_probs.gather(1, window[0, 1:, None]).sum().item()
                count += window.shape[1] - 1
    assert report["windows"] == (len(ids) + 3) // 4 and report["tokens"] == count
    assert report["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
