"""lowrank: low-rank numerical linear algebra and fused LoRA kernels for PyTorch.

The public API is what this module exports; everything else is private.
"""

from lowrank import distributed as distributed  # the submodule: lowrank.distributed.rsvd, ...
from lowrank._ops import WITH_CUDA, lora_linear, lora_linear_multi, lora_linear_quantized
from lowrank.budget import RankAllocation, allocate_ranks
from lowrank.completion import als
from lowrank.cur import cur, interpolation_matrix, interpolative
from lowrank.factor import ConvergenceWarning, low_rank_factor
from lowrank.lora import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
    LoRAMergedLinear,
    ModulesToSaveWrapper,
    QuantizedLoRALinear,
    ResidualBaseWarning,
    adapter_size,
    combine_adapters,
    combine_lora,
    delete_adapter,
    dora_row_norms,
    extract_lora,
    inject_lora,
    load_adapter,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    mixed_adapter_batch,
    quantize_base,
    remove_lora,
    save_adapter,
    set_adapter,
    truncate_adapter,
    unmerge_lora,
)
from lowrank.lora.calibrate import calibrate_lora
from lowrank.nmf import nmf
from lowrank.nystrom import nystrom
from lowrank.pca import PCAResult, pca, pca_inverse_transform, pca_transform
from lowrank.qr import cholesky_qr
from lowrank.quantize import dequantize, quantize_weight
from lowrank.sketch import StreamingSVD
from lowrank.svd import SVDResult, rsvd, svd, svd_error

__version__ = "0.1.0"

__all__ = [
    "WITH_CUDA",
    "lora_linear",
    "SVDResult",
    "cholesky_qr",
    "rsvd",
    "svd",
    "svd_error",
    "StreamingSVD",
    "PCAResult",
    "ConvergenceWarning",
    "ResidualBaseWarning",
    "als",
    "cur",
    "interpolation_matrix",
    "interpolative",
    "low_rank_factor",
    "RankAllocation",
    "allocate_ranks",
    "nmf",
    "nystrom",
    "pca",
    "pca_inverse_transform",
    "pca_transform",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMergedLinear",
    "extract_lora",
    "dora_row_norms",
    "inject_lora",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "mixed_adapter_batch",
    "remove_lora",
    "unmerge_lora",
    "adapter_size",
    "load_adapter",
    "save_adapter",
    "lora_linear_multi",
    "combine_adapters",
    "combine_lora",
    "truncate_adapter",
    "lora_linear_quantized",
    "quantize_weight",
    "dequantize",
    "QuantizedLoRALinear",
    "quantize_base",
    "LoRAConv1D",
    "ModulesToSaveWrapper",
    "set_adapter",
    "delete_adapter",
    "calibrate_lora",
]
