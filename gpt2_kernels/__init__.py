"""Our Triton kernels: fused flash attention and LayerNorm, forward and backward, and their dense
references.

Depends on torch and triton only. The references (reference.py: attention_ref, layer_norm_ref) need
torch alone, and gpt2's eager attention runs them where Triton can't be installed; there this
package holds them and nothing else. Where Triton is installed, importing the package imports the
op files, which registers the PyTorch custom operators behind the public functions,
torch.ops.gpt2_suite.{flash_attention, layer_norm, add_layer_norm} and their backward ops, so that
torch.compile(fullgraph=True), torch.export and FlopCounterMode see each kernel as one op
(gpt2_kernels/utils.py says why they are custom_ops, the op files what they are). Nothing is
compiled or launched until a kernel is called.

Not called `kernels`: that top-level name belongs to Hugging Face's PyPI package, which transformers
requires.
"""

from .reference import attention_ref, layer_norm_ref

try:
    import triton  # noqa: F401
except ImportError:  # no Triton for this platform (macOS, Windows): the references alone
    pass
else:
    from .attention import DocumentBounds, document_bounds, flash_attention
    from .layer_norm import add_layer_norm, layer_norm

__all__ = ["DocumentBounds", "add_layer_norm", "attention_ref", "document_bounds", "flash_attention", "layer_norm",
           "layer_norm_ref"]
