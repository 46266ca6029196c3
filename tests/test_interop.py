"""Hugging Face GPT-2 checkpoints, both ways, against transformers' own implementation."""

import json
import time
from pathlib import Path

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from gpt2.errors import InputError
from gpt2.hf import CheckpointNotFoundError, CorruptCheckpointError, config_to_json
from gpt2.hub import HubError

transformers = pytest.importorskip("transformers")

# fp32 logits of two independent implementations of the same network: differences come from
# summation order only, a few ulps of values of order 1.
ATOL = 1e-5


def tiny_config(**overrides):
    return GPT2Config(**{**dict(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=3), **overrides})


def hf_logits(directory, ids):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, not missing
    return model.eval()(ids).logits


def test_ours_to_transformers(tmp_path):
    model = GPT2(tiny_config()).eval()
    with torch.no_grad():  # move every parameter off its init so a mis-copied one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 101, (2, 19))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path, ids), model(ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_transformers_to_ours(tmp_path, safe_serialization):
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=3)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ids = torch.randint(0, 101, (2, 19))
    ours = GPT2.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(ids).logits, rtol=0, atol=ATOL)
    assert ours.config.dropout == hf_config.resid_pdrop


def test_original_checkpoint_layout(tmp_path):
    """The 2019 checkpoints have no 'transformer.' prefix and carry the causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    model = GPT2(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(GPT2.from_pretrained(tmp_path)(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("variant", [dict(n_kv_head=1), dict(position_embedding="rope"), dict(bias=False)])
def test_non_gpt2_architectures_round_trip_in_our_format(tmp_path, variant):
    model = GPT2(tiny_config(**variant)).eval()
    with pytest.warns(UserWarning, match="no transformers GPT-2 equivalent"):
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2-suite"
    loaded = GPT2.from_pretrained(tmp_path, attn_impl="eager")
    assert loaded.config.attn_impl == "eager"
    loaded.set_kernels(attn_impl=model.config.attn_impl)
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def _saved(tmp_path):
    GPT2(tiny_config()).save_pretrained(tmp_path)
    from safetensors.torch import load_file

    return load_file(tmp_path / "model.safetensors")


def _rewrite(tmp_path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    tensors = _saved(tmp_path)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    _rewrite(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"missing tensor 'transformer.h.1.mlp.c_fc.bias'"):
        GPT2.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    tensors = _saved(tmp_path)
    tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(48, 100)
    _rewrite(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn.weight' has shape \(100, 48\)"):
        GPT2.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    tensors = _saved(tmp_path)
    tensors["transformer.h.0.attn.q_norm.weight"] = torch.zeros(16)
    _rewrite(tmp_path, tensors)
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.q_norm.weight'"):
        GPT2.from_pretrained(tmp_path)


def test_not_gpt2(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        GPT2.from_pretrained(tmp_path)


def _one_line_naming(err, file):
    """A corrupt file's error: our kind, one line, naming the file itself (not only its directory)."""
    assert isinstance(err, CorruptCheckpointError) and isinstance(err, InputError)
    message = str(err)
    assert "\n" not in message and message.startswith(f"{file} is unreadable or corrupt"), message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights(tmp_path, damage):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x13garbage" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match="unreadable or corrupt") as caught:
        GPT2.from_pretrained(tmp_path)
    _one_line_naming(caught.value, weights)


def test_corrupt_pytorch_bin(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="unreadable or corrupt") as caught:
        GPT2.from_pretrained(tmp_path)
    _one_line_naming(caught.value, tmp_path / "pytorch_model.bin")


def test_corrupt_shard_index(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CorruptCheckpointError) as caught:
        GPT2.from_pretrained(tmp_path)
    _one_line_naming(caught.value, tmp_path / "model.safetensors.index.json")


@pytest.mark.parametrize(
    "content", [b"{garbage", b"", b'{"model_type": "gpt2", "n_embd": ', b"\xff\xfe\x00\x01", b"[1, 2]",
                b'{"model_type": "gpt2", "dropout": "lots"}']
)
def test_corrupt_config_json(tmp_path, content):
    _saved(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as caught:
        GPT2.from_pretrained(tmp_path)
    assert str(caught.value).startswith(str(config_file)) and "\n" not in str(caught.value), caught.value


def test_saved_files_are_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        GPT2(tiny_config()).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT2.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        GPT2.from_pretrained(tmp_path / "nope" / "deeper" / "ckpt")
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        GPT2.from_pretrained(tmp_path)


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """Without a reachable Hub a hub name fails within seconds, saying what to do instead."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(OSError, match="gpt2-suite-tests/no-such-model.*can't be reached.*local directory"):
        GPT2.from_pretrained("gpt2-suite-tests/no-such-model")
    assert time.monotonic() - start < 10


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    model = GPT2(tiny_config())
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwriting an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_hub_name_beside_a_directory_of_that_name(monkeypatch, tmp_path):
    """A directory counts as a checkpoint only if it holds one: beside an empty ./gpt2 (as our package
    folder is, at the repository root), "gpt2" is the Hub's model, and the message says why."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "org/model"):
        with pytest.raises(HubError, match=rf"model '{name}' is read as a Hub id \(the local directory '{name}' "
                                           r"holds no checkpoint.*can't be reached.*local directory"):
            GPT2.from_pretrained(name)
    # Paths that are not Hub ids keep their local messages.
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        GPT2.from_pretrained("./gpt2")
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        GPT2.from_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        GPT2.from_pretrained("gpt2/a/b")
    # A directory that does hold a checkpoint is read, hub-like name or not.
    model = GPT2(tiny_config())
    model.save_pretrained(tmp_path / "gpt2")
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(GPT2.from_pretrained("gpt2")(ids), model(ids), rtol=0, atol=0)


def test_hub_name_gpt2_from_the_repository_root(monkeypatch, tmp_path):
    """The real case: the package folder gpt2/ is not a checkpoint, so "gpt2" goes to the Hub."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert Path("gpt2", "model.py").is_file()
    with pytest.raises(HubError, match="'gpt2' is read as a Hub id.*can't be reached"):
        GPT2.from_pretrained("gpt2")



def test_models_from_one_checkpoint_own_their_config(tmp_path):
    GPT2(tiny_config()).save_pretrained(tmp_path)
    a, b = GPT2.from_pretrained(tmp_path), GPT2.from_pretrained(tmp_path)
    b.set_kernels(attn_impl="eager")
    assert a.config.attn_impl == "sdpa" and all(block.attn.config.attn_impl == "sdpa" for block in a.transformer.h)


def _always_ends_text(model, eot: int):
    """Make end-of-text the greedy choice at every position: ln_f outputs only its bias, set to
    wte[eot], and wte[eot] is the longest row, so eot's logit |wte[eot]|^2 beats every other
    wte[eot] . wte[j] (Cauchy-Schwarz)."""
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[eot] *= 10 * wte.norm(dim=1).max() / wte[eot].norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[eot])
    return model


def test_transformers_generation_stops_at_end_of_text(tmp_path):
    """config.json carries the tokenizer's end-of-text id (0 in our trained tokenizers, not GPT-2's
    50256), so transformers' generate and text-generation pipeline stop there, and AutoTokenizer
    knows it as a special token."""
    from gpt2.tokenizer import EOT, save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 5] * 4, vocab_size=300)
    eot = tokenizer.token_to_id(EOT)
    model = _always_ends_text(GPT2(tiny_config(vocab_size=tokenizer.get_vocab_size())).eval(), eot)
    model.save_pretrained(tmp_path, eos_token_id=eot)
    save_tokenizer(tokenizer, tmp_path, model_max_length=32)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["eos_token_id"] == saved["bos_token_id"] == eot

    prompt = tokenizer.encode("the quick").ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == [*prompt, eot]  # stopped after the first end-of-text, not 8 of them
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    (generated,) = pipe("the quick", max_new_tokens=8, do_sample=False, return_tensors=True)
    assert generated["generated_token_ids"] == [*prompt, eot]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == eot and eot in hf_tokenizer.all_special_ids
    assert hf_tokenizer.decode([*prompt, eot], skip_special_tokens=True) == "the quick"


def test_gpt2_vocabulary_defaults_to_gpt2_end_of_text(tmp_path):
    """Without a tokenizer's id, a GPT-2-sized vocabulary gets GPT-2's 50256; another size gets none."""
    config = GPT2Config(vocab_size=50257, n_positions=8, n_embd=8, n_layer=1, n_head=1)
    assert config_to_json(config)["eos_token_id"] == 50256
    assert config_to_json(tiny_config())["eos_token_id"] is None
    assert config_to_json(tiny_config(), eos_token_id=7)["bos_token_id"] == 7
