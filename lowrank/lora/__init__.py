"""LoRA on the fused op: layers with named adapters, initialisations, and model-level integration."""

from lowrank.lora.algebra import combine_adapters, combine_lora, truncate_adapter
from lowrank.lora.calibrate import calibrate_lora
from lowrank.lora.checkpoint import ResidualBaseWarning, adapter_size, load_adapter, save_adapter
from lowrank.lora.dora import dora_row_norms
from lowrank.lora.init import (
    LoRAFactors,
    corda_factors,
    eva_components,
    extract_lora,
    olora_factors,
    pissa_factors,
)
from lowrank.lora.layers import (
    BASE_ADAPTER,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRAMergedLinear,
)
from lowrank.lora.model import (
    delete_adapter,
    inject_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    mixed_adapter_batch,
    remove_lora,
    set_adapter,
    unmerge_lora,
)
from lowrank.lora.modules_to_save import ModulesToSaveWrapper
from lowrank.lora.quantized import QuantizedLoRALinear, quantize_base

__all__ = [
    "BASE_ADAPTER",
    "LoRAEmbedding",
    "LoRAFactors",
    "LoRALayer",
    "LoRALinear",
    "LoRAMergedLinear",
    "extract_lora",
    "dora_row_norms",
    "inject_lora",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "mixed_adapter_batch",
    "pissa_factors",
    "remove_lora",
    "unmerge_lora",
    "adapter_size",
    "load_adapter",
    "save_adapter",
    "combine_adapters",
    "combine_lora",
    "truncate_adapter",
    "QuantizedLoRALinear",
    "quantize_base",
    "LoRAConv1D",
    "ModulesToSaveWrapper",
    "set_adapter",
    "delete_adapter",
    "calibrate_lora",
    "olora_factors",
    "corda_factors",
    "eva_components",
    "ResidualBaseWarning",
]
