"""Hugging Face GPT-2 checkpoints, both ways, against transformers' own implementation."""

import json
import time

import pytest
import torch

from gpt2 import GPT2, GPT2Config

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


def test_corrupt_weights(tmp_path):
    _saved(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        GPT2.from_pretrained(tmp_path)


def test_corrupt_pytorch_bin(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        GPT2.from_pretrained(tmp_path)


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
