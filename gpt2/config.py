"""GPT2Config: the model's hyperparameters, presets, and their validation."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gpt2.errors import InputError

ATTN_IMPLS = ("eager", "sdpa", "triton")
NORM_IMPLS = ("torch", "triton")
POSITION_EMBEDDINGS = ("learned", "rope")


@dataclass
class GPT2Config:
    vocab_size: int = 50257  # tokens in the vocabulary (GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>)
    n_positions: int = 1024  # longest sequence the model can attend over (context length)
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention layer; head size is n_embd // n_head
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head, 1 = multi-query
    position_embedding: str = "learned"  # "learned" (GPT-2's absolute table) or "rope" (rotary, on q and k)
    rope_theta: float = 10000.0  # rotary base frequency; used only when position_embedding == "rope"
    layer_norm_epsilon: float = 1e-5  # added to the variance inside every LayerNorm
    dropout: float = 0.0  # one rate for embedding, attention-probability and residual dropout
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    attn_impl: str = "sdpa"  # attention implementation: "eager" (readable reference), "sdpa", "triton"
    norm_impl: str = "torch"  # LayerNorm implementation: "torch" or "triton"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        self.validate()

    def validate(self) -> None:
        """Raise InputError (a ValueError) naming what is allowed when a field is out of range."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise InputError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"each head gets n_embd // n_head channels"
            )
        if self.n_head % self.n_kv_head:
            raise InputError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); allowed: "
                f"{[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise InputError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise InputError(f"rope needs an even head size, got n_embd // n_head = {self.head_dim}")
        if self.attn_impl not in ATTN_IMPLS:
            raise InputError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.norm_impl not in NORM_IMPLS:
            raise InputError(f"norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("layer_norm_epsilon", "rope_theta"):  # inf or nan would train a model of NaNs
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise InputError(f"{name} must be positive and finite, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_hf_compatible(self) -> bool:
        """True when transformers' GPT2LMHeadModel can express this architecture."""
        return self.n_kv_head == self.n_head and self.position_embedding == "learned" and self.bias

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT2Config:
        """One of PRESETS by name, with any field overridden."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> GPT2Config:
        """Our fields from a dict; unknown keys raise, so typos don't pass silently."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise InputError(f"unknown GPT2Config field(s) {unknown}; fields: {sorted(fields)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: str) -> GPT2Config:
        """Apply "n_layer=2,n_embd=64,bias=false" (the --config_overrides syntax) to a copy."""
        values = self.to_dict()
        if values["n_kv_head"] == values["n_head"]:
            values["n_kv_head"] = None  # plain multi-head attention follows an overridden n_head
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for item in filter(None, (part.strip() for part in overrides.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or key not in values:
                raise InputError(f"bad override {item!r}: expected key=value with key in {sorted(values)}")
            try:
                values[key] = _parse_value(raw, types[key])
            except ValueError as err:
                raise InputError(f"bad override {item!r}: {err}") from None
        return GPT2Config(**values)

    @classmethod
    def from_name_or_path(cls, name: str | Path) -> GPT2Config:
        """A preset by name, or a config.json (or a directory holding one: ours, or an HF GPT-2's,
        whose extra keys are ignored)."""
        if name in PRESETS:
            return cls.from_preset(name)
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InputError(f"{str(name)!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:  # invalid JSON, not UTF-8, unreadable
            raise InputError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a JSON object of config fields, got a {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in values.items() if k in known})


def _parse_value(raw: str, annotation: str):
    if "bool" in annotation:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise InputError(f"expected true/false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if "int" in annotation:
        return None if raw.lower() == "none" and "None" in annotation else int(raw)
    if "float" in annotation:
        return float(raw)
    return raw


# Sizes of the four released GPT-2 models, and one small enough to train on a laptop CPU.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # ~3.5M parameters with an 8k vocabulary: a few minutes on 2 CPU cores.
    "gpt2-tiny": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, vocab_size=8192),
}
