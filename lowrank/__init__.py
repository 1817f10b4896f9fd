"""lowrank: low-rank numerical linear algebra and fused LoRA kernels for PyTorch.

The public API is what this module exports; everything else is private.
"""

from lowrank._ops import WITH_CUDA, lora_linear, lora_linear_multi

__version__ = "0.1.0"

__all__ = [
    "WITH_CUDA",
    "lora_linear",
    "lora_linear_multi",
]
