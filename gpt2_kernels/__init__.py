"""Our Triton kernels: fused flash attention and LayerNorm, forward and backward.

Depends on torch and triton only. Importing this package compiles and launches nothing; the
kernels are compiled on first call. Importing it registers the PyTorch custom operators behind the
public functions, torch.ops.gpt2_suite.{flash_attention, layer_norm, add_layer_norm} and their
backward ops, so that torch.compile(fullgraph=True), torch.export and FlopCounterMode see each
kernel as one op (gpt2_kernels/utils.py says why they are custom_ops, the op files what they are).
Not called `kernels`: that top-level name belongs to Hugging Face's PyPI package, which transformers
requires.
"""

from .attention import DocumentBounds, attention_ref, document_bounds, flash_attention
from .layer_norm import add_layer_norm, layer_norm, layer_norm_ref

__all__ = ["DocumentBounds", "add_layer_norm", "attention_ref", "document_bounds", "flash_attention", "layer_norm",
           "layer_norm_ref"]
