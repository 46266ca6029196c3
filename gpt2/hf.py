"""Hugging Face GPT-2 checkpoints: load them into our GPT2, save ours so transformers loads them.

The format: a directory with config.json and model.safetensors (or, read with
weights_only=True, pytorch_model.bin). Parameter names match ours key for key; HF's GPT-2 stores
its linear layers as Conv1D, whose weight is (in, out), the transpose of nn.Linear's (out, in):
those four names are transposed on the way in and out. The LM head is tied to wte and not stored.

Architectures transformers' GPT-2 can't express (grouped-query attention, rotary, no biases)
are saved with model_type "gpt2-suite" and our own fields, with a warning that says so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from gpt2.config import GPT2Config
from gpt2.errors import InputError, first_line
from gpt2.files import atomic_write
from gpt2.hub import download_files, is_hub_id

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers old HF checkpoints carry (the causal mask), not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Our fields that describe the architecture (attn_impl / norm_impl are a runtime choice, not saved).
ARCH_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "position_embedding",
    "rope_theta", "layer_norm_epsilon", "dropout", "bias",
)
OUR_MODEL_TYPE = "gpt2-suite"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# What a local directory needs for a name such as "gpt2" to be read as it, not as a Hub id.
LOCAL_CHECKPOINT = "checkpoint files: no config.json, no model.safetensors"


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """A checkpoint directory, or a file a checkpoint needs, that isn't there."""


class CorruptCheckpointError(InputError):
    """A checkpoint file that is there but can't be read: truncated, garbled, or not what its name says."""


def _unreadable(file, err: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{file} is unreadable or corrupt ({first_line(err)})")


def config_to_json(config: GPT2Config, eos_token_id: int | None = None) -> dict:
    """config.json's fields. eos_token_id is the tokenizer's end-of-text id, which transformers'
    generate and pipelines stop at (and GPT-2 starts an unconditional sample with); without it,
    GPT-2's own (50256) when the vocabulary is GPT-2's, else none."""
    ours = {name: getattr(config, name) for name in ARCH_FIELDS}
    if not config.is_hf_compatible:
        return {"model_type": OUR_MODEL_TYPE, "architectures": ["GPT2"], **ours}
    eot = eos_token_id
    if eot is None and config.vocab_size == 50257:
        eot = config.vocab_size - 1  # GPT-2's <|endoftext|>
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new",  # the tanh approximation of GELU
        "n_inner": None,  # 4 * n_embd
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        **ours,
    }


def config_from_json(values: dict, source: str) -> GPT2Config:
    """Our config from an HF GPT-2 config.json or one of ours; InputError for anything else."""
    if not isinstance(values, dict):
        raise CorruptCheckpointError(f"{source}: expected a JSON object, got a {type(values).__name__}")
    try:
        return _config_from_fields(values, source)
    except TypeError as err:  # a field of the wrong type ("dropout": "x") fails a comparison in validate()
        raise CorruptCheckpointError(f"{source}: a field has the wrong type ({first_line(err)})") from None


def _config_from_fields(values: dict, source: str) -> GPT2Config:
    model_type = values.get("model_type")
    if model_type == OUR_MODEL_TYPE:
        return GPT2Config.from_dict({k: values[k] for k in ARCH_FIELDS if k in values})
    if model_type != "gpt2":
        raise InputError(f"{source}: not a GPT-2 checkpoint (model_type={model_type!r}; expected 'gpt2')")
    unsupported = {
        "activation_function": (values.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": values.get("n_inner") in (None, 4 * values.get("n_embd", 768)),
        "scale_attn_weights": values.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": not values.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": not values.get("add_cross_attention", False),
    }
    for key, ok in unsupported.items():
        if not ok:
            raise InputError(f"{source}: unsupported GPT-2 variant, {key}={values.get(key)!r}")
    fields = {k: values[k] for k in ARCH_FIELDS if k in values}
    fields.setdefault("dropout", values.get("resid_pdrop", 0.0))
    return GPT2Config.from_dict(fields)


def save_pretrained(model, save_directory, eos_token_id: int | None = None) -> None:
    """config.json + model.safetensors; eos_token_id: the tokenizer's end-of-text id (config_to_json)."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to transformer.wte.weight
            continue
        tensor = tensor.detach()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        tensors[name] = tensor.contiguous().cpu()
    atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config_json = json.dumps(config_to_json(model.config, eos_token_id), indent=2) + "\n"
    atomic_write(directory / "config.json", lambda p: Path(p).write_text(config_json))
    if not model.config.is_hf_compatible:
        warnings.warn(
            f"{directory}: grouped-query attention, rotary embeddings or bias=False have no transformers "
            f"GPT-2 equivalent; saved with model_type '{OUR_MODEL_TYPE}', which GPT2.from_pretrained loads "
            f"and transformers does not",
            stacklevel=3,
        )


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    def read(file: Path, load):
        try:
            return load(file)
        except Exception as err:  # noqa: BLE001 - a corrupt pickle raises almost anything (IndexError, UnpicklingError)
            raise _unreadable(file, err) from None

    single, index, pickled = (directory / name for name in WEIGHT_FILES)
    if single.exists():
        return read(single, load_file)
    if index.exists():
        shards = read(index, lambda f: sorted(set(json.loads(f.read_text())["weight_map"].values())))
        return {name: tensor for shard in shards for name, tensor in read(directory / str(shard), load_file).items()}
    if pickled.exists():
        return read(pickled, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    raise CheckpointNotFoundError(f"{directory}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")


def _normalise_state_dict(tensors: dict, expected: dict, source: str) -> dict:
    """Map checkpoint tensors onto our parameter names and layouts, or name the first problem."""
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if not name.startswith(("transformer.", "lm_head.")):  # the original checkpoints omit the prefix
            name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[name] = tensor
    lm_head = state.pop("lm_head.weight", None)
    for name, param in expected.items():
        if name == "lm_head.weight":
            continue
        if name not in state:
            raise InputError(f"{source}: checkpoint is missing tensor {name!r}")
        if state[name].shape != param.shape:
            raise InputError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, the config implies "
                f"{tuple(param.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InputError(f"{source}: unexpected tensor {unexpected[0]!r} (not part of a GPT-2 model)")
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        raise InputError(f"{source}: lm_head.weight differs from transformer.wte.weight; only tied heads are supported")
    return state


def from_pretrained(cls, path_or_name, **config_overrides):
    path, name = Path(path_or_name), str(path_or_name)
    holds_checkpoint = any((path / file).is_file() for file in ("config.json", *WEIGHT_FILES))
    if is_hub_id(name) and not holds_checkpoint:  # "gpt2" is the Hub's, unless ./gpt2 holds a checkpoint
        path = download_files(name, ["config.json"], "model", local_files=LOCAL_CHECKPOINT)
        download_files(name, list(WEIGHT_FILES), "model", local_files=LOCAL_CHECKPOINT)
    elif path.is_file():
        raise InputError(f"{path}: expected a checkpoint directory (config.json + model.safetensors), got a file")
    elif not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointNotFoundError(f"{path}: no config.json; expected a GPT-2 checkpoint directory")
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise _unreadable(config_file, err) from None
    config = config_from_json(values, str(config_file))
    config = GPT2Config.from_dict({**config.to_dict(), **config_overrides})
    tensors = _read_weights(path)
    model = cls(config)
    state = _normalise_state_dict(tensors, model.state_dict(), str(path))
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte, checked above
    return model
