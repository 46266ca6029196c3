"""scripts/generate.py: prompts in, samples out through the KV-cache sampler; reproducible with a
seed; greedy decoding equal to an argmax loop over plain logits; clear messages for bad input."""

import json
from pathlib import Path

import pytest
import torch
from conftest import expect_input_error, load_script

from gpt2 import GPT2, GPT2Config
from gpt2.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


generate = load_script(SCRIPT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny GPT-2 and a small byte-level BPE, saved the way pretraining saves them."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=tokenizer.get_vocab_size())
    GPT2(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


def run(checkpoint, *extra) -> list[dict]:
    return generate.main(["--model_name_or_path", str(checkpoint), *map(str, extra)])


def test_prompts_and_samples_printed(checkpoint, capsys):
    samples = run(checkpoint, "--prompt", "To be", "--prompt", "whether", "--num_samples", 3, "--max_new_tokens", 7)
    out = capsys.readouterr().out
    assert [(s["prompt"], s["sample"]) for s in samples] == [(p, j) for p in ("To be", "whether") for j in (1, 2, 3)]
    for i, s in enumerate(samples):
        assert s["text"].startswith(s["prompt"])
        assert len(s["token_ids"]) <= 7
        assert f"=== prompt {i // 3 + 1}, sample {s['sample']} ===\n{s['text']}\n" in out


def test_seed_reproduces_and_changes(checkpoint):
    args = ("--prompt", "To be", "--num_samples", 3, "--max_new_tokens", 8, "--top_k", 50, "--top_p", 0.95)
    first, again = run(checkpoint, *args, "--seed", 1), run(checkpoint, *args, "--seed", 1)
    other = run(checkpoint, *args, "--seed", 2)
    assert [s["token_ids"] for s in first] == [s["token_ids"] for s in again]
    assert [s["token_ids"] for s in first] != [s["token_ids"] for s in other]


def test_greedy_matches_argmax_over_plain_logits(checkpoint):
    """temperature 0 through the KV cache == an argmax loop recomputing the whole prefix."""
    samples = run(checkpoint, "--prompt", "that is", "--temperature", 0, "--num_samples", 2, "--max_new_tokens", 10)
    tokenizer = load_tokenizer(checkpoint)
    model = GPT2.from_pretrained(checkpoint).eval()
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode("that is").ids
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == eos:
                ids.pop()
                break
    expected = ids[len(tokenizer.encode("that is").ids) :]
    assert samples[0]["token_ids"] == samples[1]["token_ids"] == expected


def test_prompt_file_and_empty_prompt(checkpoint, tmp_path):
    (tmp_path / "prompts.txt").write_text("To be\n\n  \nthe question\n", encoding="utf-8")
    samples = run(checkpoint, "--prompt_file", tmp_path / "prompts.txt", "--max_new_tokens", 3)
    assert [s["prompt"] for s in samples] == ["To be", "the question"]
    unconditional = run(checkpoint, "--max_new_tokens", 5, "--kernels", "eager")  # starts from <|endoftext|>
    assert unconditional[0]["prompt"] == ""


def expect_error(checkpoint, *extra, fragment):
    expect_input_error(generate.main, ["--model_name_or_path", checkpoint, *extra], fragment)


def test_bad_input(checkpoint, tmp_path):
    expect_error(tmp_path / "missing", "--prompt", "x", fragment="no such checkpoint")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    expect_error(tmp_path / "bert", "--prompt", "x", fragment="not a GPT-2 checkpoint")
    expect_error(checkpoint, "--prompt", "x", "--max_new_tokens", 200, fragment="exceeds the model's context")
    expect_error(checkpoint, "--prompt_file", tmp_path / "none.txt", fragment="can't read --prompt_file")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    expect_error(checkpoint, "--prompt_file", tmp_path / "binary.txt", fragment="is not UTF-8 text")


@pytest.mark.parametrize(
    "flag, value",
    [("--max_new_tokens", 0), ("--num_samples", 0), ("--temperature", -1), ("--top_k", 0), ("--top_p", 0),
     ("--temperature", "nan"), ("--top_p", "nan"), ("--seed", 2**64), ("--seed", -1), ("--num_samples", 10**8)],
)
def test_bad_sampling_arguments(checkpoint, flag, value):
    expect_error(checkpoint, flag, value, fragment=flag)


def test_samples_stay_inside_a_smaller_tokenizer(tmp_path, capsys):
    """A model whose vocabulary is larger than its tokenizer, made to favour an id the tokenizer
    lacks above all others: no sample holds such an id (they would be dropped from the text), and
    the run says the sizes differ; as does naming a tokenizer other than the checkpoint's own."""
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    size = tokenizer.get_vocab_size()
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=size + 20))
    with torch.no_grad():  # every position's hidden state points at wte[size + 5], the longest row
        wte = model.transformer.wte.weight
        wte[size + 5] *= 10 * wte.norm(dim=1).max() / wte[size + 5].norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[size + 5])
    model.save_pretrained(tmp_path / "big")
    save_tokenizer(tokenizer, tmp_path / "big")
    for temperature in (0, 1):
        samples = run(tmp_path / "big", "--prompt", "To be", "--max_new_tokens", 20, "--num_samples", 4,
                      "--temperature", temperature)
        produced = [t for s in samples for t in s["token_ids"]]
        assert produced and max(produced) < size
    assert f"the tokenizer has {size} tokens and the model's vocabulary {size + 20}" in capsys.readouterr().out
    other = train_tokenizer([TEXT[::-1]], vocab_size=280)
    save_tokenizer(other, tmp_path / "other")
    run(tmp_path / "big", "--tokenizer_name", tmp_path / "other", "--prompt", "To", "--max_new_tokens", 2)
    assert "is not the tokenizer saved with the checkpoint" in capsys.readouterr().out


def test_config_file_with_a_list_flag(checkpoint, tmp_path):
    """--config works here as in pretraining: a list for a flag given several times (--prompt), and
    the command line wins over the file."""
    (tmp_path / "gen.yaml").write_text(f"model_name_or_path: {checkpoint}\nprompt: [To be, whether]\n"
                                       f"max_new_tokens: 3\ntemperature: 0\n")
    samples = generate.main(["--config", str(tmp_path / "gen.yaml")])
    assert [s["prompt"] for s in samples] == ["To be", "whether"] and all(len(s["token_ids"]) <= 3 for s in samples)
    samples = generate.main(["--config", str(tmp_path / "gen.yaml"), "--prompt", "that", "--max_new_tokens", 5])
    assert [s["prompt"] for s in samples] == ["that"] and len(samples[0]["token_ids"]) <= 5
    (tmp_path / "bad.yaml").write_text("temperature: nan\n")
    expect_input_error(generate.main, ["--model_name_or_path", checkpoint, "--config", tmp_path / "bad.yaml"],
                       "--temperature must be a finite number", f"set by 'temperature' in {tmp_path / 'bad.yaml'}")


@pytest.fixture(scope="module")
def loud_checkpoint(tmp_path_factory) -> Path:
    """The tiny model with its final LayerNorm scaled by 1e10: logits of order 1e9, which a
    temperature of 1e-30 would take past float32's largest number (3.4e38) if it divided them as
    they are."""
    directory = tmp_path_factory.mktemp("loud-gpt2")
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=tokenizer.get_vocab_size()))
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1e10)
        model.transformer.ln_f.bias.mul_(1e10)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy(loud_checkpoint, temperature):
    """A temperature so small that the scaled logits would overflow float32, or that is 0 in
    float32, samples the greedy tokens, every sample of the batch."""
    args = ("--prompt", "To be", "--num_samples", 3, "--max_new_tokens", 12)
    greedy = [s["token_ids"] for s in run(loud_checkpoint, *args, "--temperature", 0)]
    assert greedy[0]  # the model does not end the text at once: there is something to compare
    assert [s["token_ids"] for s in run(loud_checkpoint, *args, "--temperature", temperature)] == greedy


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_broken_weights_are_one_line_naming_the_checkpoint(tmp_path, poison):
    """A checkpoint whose logits come out nan or inf is refused in one line naming it, greedy or
    sampling, not with torch.multinomial's RuntimeError or silently argmax over nan."""
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=tokenizer.get_vocab_size()))
    with torch.no_grad():
        model.transformer.ln_f.bias[3] = float(poison)
    model.save_pretrained(tmp_path / "broken")
    save_tokenizer(tokenizer, tmp_path / "broken")
    for temperature in (0, 1):
        expect_error(tmp_path / "broken", "--prompt", "To be", "--max_new_tokens", 5, "--temperature", temperature,
                     fragment=f"{tmp_path / 'broken'}: the model's logits are not finite (nan/inf)")
