"""LoRA layers over a quantized frozen base (QLoRA-style): int8 or float8_e4m3fn weights, fp32 row scales.

:func:`quantize_base` turns every :class:`~lowrank.lora.layers.LoRALinear` of a model into a
:class:`QuantizedLoRALinear`, whose forward is one call of the fused op
:func:`lowrank.lora_linear_quantized`; adapters stay trainable in the activation dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lowrank._ops import lora_linear_quantized, lora_term
from lowrank.lora.init import WEIGHT_INITS, all_finite
from lowrank.lora.layers import LoRALayer, LoRALinear
from lowrank.quantize import QUANT_DTYPES, _resolve_dtype, dequantize, quantize_weight

__all__ = ["QuantizedLoRALinear", "quantize_base"]


class QuantizedLoRALinear(LoRALinear):
    r"""A :class:`LoRALinear` whose frozen base weight is stored quantized.

    ``y = x (s[:, None] * Q)^T + b + scale * dropout(x) A^T B^T`` with ``Q`` (out, in) int8 or float8_e4m3fn
    and ``s`` (out,) float32 (buffers ``qweight`` and ``weight_scale``, see :func:`lowrank.quantize_weight`).
    Adapters (``lora_A``, ``lora_B``), their names, dropout, checkpoints (PEFT layout, adapters only) and
    mixed-adapter batches work as in :class:`LoRALinear`. Build it with :meth:`from_lora_linear` or
    :func:`quantize_base`.

    Notes
    -----
    - The forward is one :func:`lowrank.lora_linear_quantized` call (the base and the adapter in one
      pass at decode); training with dropout > 0 runs the base through the same op and the adapter as two
      thin products. Mixed-adapter batches dequantize the weight for the call (lora_linear_multi has no
      quantized variant yet).
    - ``weight`` is a *computed* attribute: a fresh dequantized copy (in the base dtype) on every access,
      for code that reads the base weight; writing to it changes nothing. ``remove_lora`` therefore gives
      back an ``nn.Linear`` holding the dequantized weight.
    - ``merge()``/``unmerge()`` dequantize, add or subtract the adapter's ``scale B A`` in float32 and
      quantize again (new row scales): the merged weight carries a fresh rounding error, and unmerging does
      not restore the original codes exactly. A ``UserWarning`` says so.
    - ``module.to(dtype)`` changes the dtype the layer computes in (and of the bias and adapters) but never
      touches ``qweight`` or ``weight_scale``; ``module.to(device)`` moves them. A model built on the meta
      device can be quantized (shapes only) and materialised with ``to_empty`` before loading a state dict.
    - State-dict buffers: ``qweight`` (int8; float8 codes are stored as their bytes, uint8, so that dtype
      casts of the module skip them: the ``qweight`` attribute views them back) and ``weight_scale``.
    """

    quant_dtype: str
    _supports_dora = False

    @classmethod
    def from_lora_linear(cls, layer: LoRALinear, dtype: str | torch.dtype = "int8") -> QuantizedLoRALinear:
        """Quantize ``layer``'s base weight (per output row, see :func:`lowrank.quantize_weight`).

        The adapters, bias and settings are taken over (not copied); ``layer`` should not be used after.
        Raises TypeError for anything but a plain ``LoRALinear``, ValueError when an adapter is merged.
        """
        if type(layer) is not LoRALinear:
            raise TypeError(f"layer must be a LoRALinear (not a subclass), got {type(layer).__name__}")
        if layer.merged_adapters:
            raise ValueError(
                f"adapter {layer.merged_adapters[0]!r} is merged into the weight; unmerge() before quantizing"
            )
        dora = [n for n, flag in layer.use_dora.items() if flag]
        if dora:
            raise ValueError(
                f"adapters {dora} are DoRA adapters (use_dora=True), which the quantized layer does not "
                "support; delete them or keep the layer unquantized"
            )
        name, _, _ = _resolve_dtype(dtype)
        new = cls.__new__(cls)
        new.__dict__ = dict(layer.__dict__)
        new._parameters = {k: v for k, v in layer._parameters.items() if k != "weight"}
        new._buffers = dict(layer._buffers)
        new._modules = dict(layer._modules)
        new._stack_cache = None
        new._base_dtype = layer.weight.dtype
        new.quant_dtype = name
        new._store(*quantize_weight(layer.weight.detach(), name))
        return new

    def _store(self, qweight: torch.Tensor, weight_scale: torch.Tensor) -> None:
        codes = qweight.view(torch.uint8) if qweight.dtype == torch.float8_e4m3fn else qweight
        self._buffers["qweight"] = codes
        self._buffers["weight_scale"] = weight_scale

    @property
    def qweight(self) -> torch.Tensor:
        """The quantized base weight (out_features, in_features), int8 or float8_e4m3fn."""
        codes = self._buffers["qweight"]
        return codes.view(QUANT_DTYPES[self.quant_dtype][0]) if codes.dtype == torch.uint8 else codes

    @property
    def weight_scale(self) -> torch.Tensor:
        """Per-row float32 scales (out_features,)."""
        return self._buffers["weight_scale"]

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        """A fresh dequantized copy of the base weight (frozen Parameter, base dtype): read-only in effect."""
        return nn.Parameter(
            dequantize(self.qweight, self.weight_scale, self._base_dtype), requires_grad=False
        )

    def _apply(self, fn, recurse=True):
        # Casts reach the bias and adapters; the codes and scales only follow the device.
        codes, scale = self._buffers.pop("qweight"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=self._base_dtype, device=scale.device))
            for key, value in (("qweight", codes), ("weight_scale", scale)):
                if value.is_meta and probe.device.type != "meta":  # to_empty() of a model built on meta
                    self._buffers[key] = torch.empty_like(value, device=probe.device)
                else:
                    self._buffers[key] = value.to(probe.device)
        self._base_dtype = probe.dtype
        return self

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # meta (shape inference): torch keeps no autocast state for it, and asking raises
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self._base_dtype

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        name = self.active_adapter if name is None else name
        if name is None:
            raise RuntimeError("no active adapter")
        self._check_name(name)
        A, B = self._factors(name)
        work = torch.float64 if self._base_dtype == torch.float64 else torch.float32
        return (B.to(work) @ A.to(work)) * self.scaling[name]

    def _reset_factors(self, name: str, init: str, triplets=None, n_iter=None) -> None:
        if init in WEIGHT_INITS:
            raise ValueError(
                f"init={init!r} rewrites the base weight, which is quantized here: add the {init} adapter "
                "before quantize_base"
            )
        super()._reset_factors(name, init, triplets, n_iter)

    def _add_to_weight(self, delta: torch.Tensor, sign: float) -> None:
        warnings.warn(
            f"merging into a {self.quant_dtype} base: the weight is dequantized, updated and quantized "
            "again, which adds a rounding error (and unmerge does not restore the original codes exactly)",
            UserWarning,
            stacklevel=3,
        )
        work = torch.float64 if self._base_dtype == torch.float64 else torch.float32
        updated = dequantize(self.qweight, self.weight_scale, work).add_(delta.to(work), alpha=sign)
        if sign > 0 and not all_finite(updated):
            raise ValueError(
                "merge: the merged weight would hold NaN or infinite values (a non-finite adapter); the "
                "weight is left unchanged and the adapter unmerged"
            )
        self._store(*quantize_weight(updated, self.quant_dtype))

    def _base_only(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        zero_A = x.new_zeros(1, self.in_features)
        zero_B = x.new_zeros(self.out_features, 1)
        return lora_linear_quantized(x, self.qweight, self.weight_scale, zero_A, zero_B, 0.0, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._row_adapters is not None:
            return self._forward_mixed(x)
        dtype = self._compute_dtype(x)
        if x.dtype != dtype:
            x = x.to(dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        name = self._active_unmerged()
        if name is None:
            return self._base_only(x, bias)
        A, B = self._factors(name)
        if A.dtype != dtype:
            A, B = A.to(dtype), B.to(dtype)
        scale = self.scaling[name]
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return self._base_only(x, bias) + lora_term(dropout(x), A, B, scale)
        return lora_linear_quantized(x, self.qweight, self.weight_scale, A, B, scale, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.quant_dtype}"


def quantize_base(model: nn.Module, dtype: str | torch.dtype = "int8") -> nn.Module:
    """Store the base weights of a model's LoRA linear layers quantized (QLoRA-style), in place.

    Every :class:`~lowrank.lora.layers.LoRALinear` (exact type) becomes a :class:`QuantizedLoRALinear`:
    its frozen weight is replaced by int8 or float8_e4m3fn codes with per-output-row float32 scales
    (:func:`lowrank.quantize_weight`; weight memory per layer drops from 4 (fp32) or 2 (bf16) bytes per
    element to 1 plus 4 bytes per row). Adapters, bias, names and the active adapter are kept;
    ``lora_state_dict``/``save_adapter``/``load_adapter`` see the same adapter keys.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers (see :func:`lowrank.inject_lora`), or a single ``LoRALinear``.
    dtype : {"int8", "float8_e4m3fn"}, default "int8"

    Returns
    -------
    nn.Module
        ``model`` (modified in place), or the new layer when ``model`` itself is a ``LoRALinear``.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    ValueError
        Unknown ``dtype``, no ``LoRALinear`` layer in ``model`` (the message says when they are all
        quantized already), a layer has a merged adapter or a DoRA
        adapter (``use_dora=True``: not supported on a quantized base).

    Notes
    -----
    ``LoRAMergedLinear`` (fused qkv) and ``LoRAEmbedding`` layers, and plain ``nn.Linear`` layers, are left
    as they are (a ``UserWarning`` names the LoRA ones skipped). Cost: one pass over each weight.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_base: model must be an nn.Module, got {type(model).__name__}")
    _resolve_dtype(dtype)
    if type(model) is LoRALinear:
        return QuantizedLoRALinear.from_lora_linear(model, dtype)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is LoRALinear]
    skipped = [
        n for n, m in model.named_modules() if isinstance(m, LoRALayer) and not isinstance(m, LoRALinear)
    ]
    skipped += [
        n
        for n, m in model.named_modules()
        if isinstance(m, LoRALinear) and type(m) not in (LoRALinear, QuantizedLoRALinear)
    ]
    if not targets:
        if any(isinstance(m, QuantizedLoRALinear) for m in model.modules()):
            raise ValueError(
                "quantize_base: the model's LoRALinear layers are quantized already (QuantizedLoRALinear); "
                "a second quantization would only add rounding error"
            )
        raise ValueError("quantize_base: model has no LoRALinear layers (call lowrank.inject_lora first)")
    for name, layer in targets:
        if layer.merged_adapters:
            raise ValueError(f"quantize_base: layer {name!r} has a merged adapter; unmerge_lora(model) first")
        if any(layer.use_dora.values()):
            raise ValueError(
                f"quantize_base: layer {name!r} holds DoRA adapters (use_dora=True), which the quantized "
                "layer does not support"
            )
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLoRALinear.from_lora_linear(layer, dtype))
    if skipped:
        warnings.warn(
            f"quantize_base left these LoRA layers unquantized: {skipped}", UserWarning, stacklevel=2
        )
    return model
