"""A from-scratch GPT-2 with pluggable attention and LayerNorm implementations."""

from gpt2.config import PRESETS, GPT2Config
from gpt2.model import GPT2

__all__ = ["GPT2", "GPT2Config", "PRESETS"]
