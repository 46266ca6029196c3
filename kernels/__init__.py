"""Our Triton kernels: fused flash attention and LayerNorm, forward and backward.

Depends on torch and triton only. Importing this package compiles and launches nothing; the
kernels are compiled on first call. (The name collides with the Hugging Face hub's `kernels`
package; transformers probes that one by version, and this package deliberately defines no
``__version__``, so transformers sees no hub `kernels` here.)
"""

from kernels.attention import attention_ref, flash_attention
from kernels.layer_norm import add_layer_norm, layer_norm, layer_norm_ref

__all__ = ["add_layer_norm", "attention_ref", "flash_attention", "layer_norm", "layer_norm_ref"]
