"""LoRA layers on the fused op: ``LoRALinear``, ``LoRAMergedLinear`` (fused q/k/v) and ``LoRAEmbedding``.

Every layer keeps its frozen base parameters under the names of the module it replaces (``weight``,
``bias``), so a base model's state dict still loads, and holds any number of named adapters
(``add_adapter`` / ``set_adapter`` / ``delete_adapter``); one adapter is active at a time and switching
copies no weight. ``merge()`` folds the active adapter into ``weight`` so inference costs exactly the base
layer; ``unmerge()`` takes it out again.

References
----------
E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
D. Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowrank._linop import python_number
from lowrank._ops import lora_linear, lora_linear_inference, lora_linear_multi, lora_term
from lowrank.lora.dora import dora_row_norms, weight_row_sq_norms
from lowrank.lora.init import WEIGHT_INITS, all_finite, check_init, pissa_budget, reset_lora_factors_
from lowrank.lora.init import weight_init_factors as _weight_init_factors

__all__ = [
    "BASE_ADAPTER",
    "LoRALayer",
    "LoRALinear",
    "LoRAMergedLinear",
    "LoRAConv1D",
    "LoRAEmbedding",
    "is_conv1d",
]

#: The adapter name that selects the base layer alone for a row of a mixed-adapter batch.
BASE_ADAPTER = "__base__"


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class LoRALayer(nn.Module):
    """Adapter bookkeeping shared by the LoRA layers (not used directly).

    Attributes
    ----------
    r, lora_alpha, scaling, use_rslora, use_dora : dict[str, ...]
        Per adapter name: rank, alpha, the LoRA multiplier (``alpha / r``, or ``alpha / sqrt(r)`` with
        rsLoRA), whether rsLoRA scaling is used and whether the adapter is a DoRA adapter.
    lora_dropout : nn.ModuleDict
        Per adapter name: ``nn.Dropout`` (``dropout > 0``) or ``nn.Identity``.
    active_adapter : str or None
        The adapter used by ``forward``; ``None`` runs the base layer alone.
    merged_adapters : list[str]
        Adapters currently folded into ``weight`` (at most one).
    weight_init : dict[str, str]
        Adapters whose initialisation rewrote ``weight`` to a residual (``"pissa"``, ``"olora"``, and
        ``"corda"`` from :func:`lowrank.lora.calibrate_lora`) -> that init's name. Such an adapter is relative
        to the residual weight: :func:`lowrank.lora.save_adapter` warns when it saves one without
        ``convert_to_lora_from``.
    """

    # names of the two nn.ParameterDict attributes holding (first-applied, second-applied) factors
    _factor_names: tuple[str, str] = ("lora_A", "lora_B")
    # initialisations from the base weight that this layer supports
    _weight_inits: tuple[str, ...] = WEIGHT_INITS
    weight: nn.Parameter
    # Per-row adapter names of a mixed-adapter batch (set by lowrank.mixed_adapter_batch), else None.
    _row_adapters: tuple[str, ...] | None = None
    # Whether this layer type takes DoRA adapters (use_dora=True); LoRALinear does.
    _supports_dora: bool = False

    def _init_adapter_state(self) -> None:
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.weight_init: dict[str, str] = {}
        self._base_requires_grad = True

    def _freeze_base(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        self._base_requires_grad = bool(weight.requires_grad)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)

    # -- to be provided by each layer ------------------------------------------------------------
    def _max_rank(self) -> int:
        raise NotImplementedError

    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _reset_factors(
        self, name: str, init: str, triplets: Sequence | None = None, n_iter: int | None = None
    ) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """The active (or named) adapter's contribution to ``weight``, scaling included, in its layout."""
        raise NotImplementedError

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        pissa_triplets: Sequence | None = None,
    ) -> None:
        """Create adapter ``name`` of rank ``r`` and make it active (when no adapter is active yet).

        Parameters
        ----------
        name : str
            Adapter name: non-empty, without ".", not already used.
        r : int
            Rank, ``>= 1``. Typical: 4 to 64; the adapter costs ``r * (in + out)`` parameters and
            ``2 r (in + out)`` FLOPs per token. ``B A`` has rank at most ``min(in, out)`` of the (slice of
            the) weight it adapts, so a larger ``r`` adds parameters, not expressiveness; it is accepted (PEFT
            trains and saves such adapters) except with the weight inits ``"pissa"`` / ``"olora"``, which
            need ``r <= min(in, out)``.
        alpha : float, optional
            LoRA alpha; default ``r`` (scaling 1). Scaling is ``alpha / r`` (Hu et al. 2021), or
            ``alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023), which keeps the update's size
            stable as ``r`` grows.
        dropout : float, default 0.0
            Dropout probability on the adapter's input, in [0, 1).
        use_rslora : bool, default False
        init : {"default", "gaussian", "pissa", "olora", "zeros"}
            Also PEFT's ``True`` (= ``"default"``) and ``"pissa_niter_N"`` (= ``"pissa"`` at PEFT's
            cost, ``2 N + 2`` products, unchecked; see :func:`lowrank.lora.init.check_init`). See
            :func:`lowrank.lora.init.reset_lora_factors_`, :func:`lowrank.lora.init.pissa_factors` and
            :func:`lowrank.lora.init.olora_factors`.
            ``"pissa"`` / ``"olora"`` rewrite ``weight`` to the residual of its top-``r`` SVD / QR part
            (output unchanged); ``"olora"`` is for linear layers.
            The data-driven ``"corda"`` / ``"eva"`` go through :func:`lowrank.lora.calibrate_lora`.
        use_dora : bool, default False
            Make it a DoRA adapter (Liu et al. 2024, arXiv:2402.09353; :class:`LoRALinear` and
            :class:`LoRAConv1D`): a trainable magnitude ``lora_magnitude_vector[name]`` (out,), initialised
            to the row norms of ``W + scale B A`` (``W`` in the (out, in) layout) after the factors' init,
            rescales each output row (see :class:`LoRALinear`).
            Other layer types raise ValueError naming ``use_dora``.
        pissa_triplets : list of (U, S, Vh) or None, optional
            ``init="pissa"`` only: the top-``r`` singular triplets of each matrix the layer factors (one
            per enabled slice of a :class:`LoRAMergedLinear`; the (out, in) view of a Conv1D; the table of
            an embedding), computed ahead by :func:`lowrank.lora.init.pissa_triplets` (as
            :func:`lowrank.inject_lora` does, batched over a model); a ``None`` entry is computed here.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")
        if name == BASE_ADAPTER:
            raise ValueError(
                f"adapter name {name!r} is reserved: mixed_adapter_batch reads it as 'no adapter' for a row"
            )
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.r)})")
        # NumPy scalars are numbers to users (r=np.int64(8), alpha=np.float32(16), use_dora=np.True_)
        r, alpha, dropout = python_number(r), python_number(alpha), python_number(dropout)
        use_rslora, use_dora = python_number(use_rslora), python_number(use_dora)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1 for this layer ({self._shape_text()}), got {r!r}")
        if alpha is None:
            alpha = float(r)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
        if use_dora and not self._supports_dora:
            raise ValueError(
                f"use_dora=True is not supported by {type(self).__name__} (DoRA adapters are available on "
                "LoRALinear and LoRAConv1D layers only)"
            )
        n_iter = pissa_budget(init)  # "pissa_niter_N": PiSSA at PEFT's product budget
        init = check_init(init)  # PEFT's spellings (True, "pissa_niter_N") as ours
        if pissa_triplets is not None:
            if init != "pissa" or not isinstance(pissa_triplets, (list, tuple)):
                raise ValueError(
                    "pissa_triplets must be a list (an entry per factored matrix) with init='pissa'"
                )
            count = len(getattr(self, "_enabled_sizes", (self.weight,)))  # enabled slices of a fused layer
            if len(pissa_triplets) != count:
                raise ValueError(
                    f"pissa_triplets has {len(pissa_triplets)} entries; the layer factors {count}"
                )
        if init in WEIGHT_INITS and init not in self._weight_inits:
            raise ValueError(
                f"init={init!r} is not supported by {type(self).__name__} (use {self._weight_inits})"
            )
        max_rank = self._max_rank()
        if init in WEIGHT_INITS and r > max_rank:
            raise ValueError(
                f"r must be an int in [1, {max_rank}] for init={init!r} on this layer "
                f"({self._shape_text()}), got {r!r}"
            )
        if init in WEIGHT_INITS and self.merged_adapters:
            raise RuntimeError(
                f"cannot add an init={init!r} adapter while an adapter is merged; call unmerge() first"
            )
        first_shape, second_shape = self._factor_shapes(r)
        kwargs = {"device": self.weight.device, "dtype": self.weight.dtype}
        getattr(self, self._factor_names[0])[name] = nn.Parameter(torch.empty(first_shape, **kwargs))
        getattr(self, self._factor_names[1])[name] = nn.Parameter(torch.empty(second_shape, **kwargs))
        self.lora_dropout[name] = nn.Dropout(p=float(dropout)) if dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = float(alpha)
        self.use_rslora[name] = use_rslora
        self.scaling[name] = float(alpha) / (math.sqrt(r) if use_rslora else r)
        self.use_dora[name] = use_dora
        self._reset_factors(name, init, pissa_triplets, n_iter)
        if init in WEIGHT_INITS:
            self.__dict__.setdefault("weight_init", {})[name] = init
        if use_dora:
            self._init_magnitude(name)
        if self.active_adapter is None:
            self.active_adapter = name

    def _add_first_adapter(self, r: int, **options) -> None:
        """``add_adapter("default", ...)`` for a wrapped module; bad input leaves its Parameters as found."""
        try:
            self.add_adapter("default", r, **options)
        except Exception:
            self.weight.requires_grad_(self._base_requires_grad)
            if getattr(self, "bias", None) is not None:
                self.bias.requires_grad_(self._base_requires_grad)
            raise

    def _shape_text(self) -> str:
        return f"weight {tuple(self.weight.shape)}"

    def _check_name(self, name: str) -> None:
        if name not in self.r:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.r)}")

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter used by ``forward`` (``None``: base layer only). No weight is copied."""
        if name is not None:
            self._check_name(name)
        if self.merged_adapters and name not in self.merged_adapters:
            raise RuntimeError(
                f"adapter {self.merged_adapters[0]!r} is merged into the weight; unmerge() before switching"
            )
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, the first remaining one (or ``None``) becomes active."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(
                f"adapter {name!r} is merged into the weight; call unmerge() before deleting it"
            )
        for attr in (*self._factor_names, "lora_dropout"):
            del getattr(self, attr)[name]
        if self.use_dora.pop(name, False):
            del self.lora_magnitude_vector[name]
            self.clear_dora_cache()
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del table[name]
        getattr(self, "weight_init", {}).pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.r), None)

    @property
    def merged(self) -> bool:
        """True when an adapter is folded into ``weight``."""
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into ``weight`` (computed in float32): forward becomes the base layer."""
        if self.merged_adapters:
            raise RuntimeError(f"adapter {self.merged_adapters[0]!r} is already merged; call unmerge() first")
        if self.active_adapter is None:
            raise RuntimeError("no active adapter to merge")
        self._fold(self.active_adapter, sign=1.0)
        self.merged_adapters.append(self.active_adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter out of ``weight`` again.

        ``merge`` and ``unmerge`` add and subtract the same ``delta_weight`` in float32 (float64 for float64
        weights) and round to the weight's dtype, so each entry comes back to within **one ulp of the merged
        weight** (the spacing of ``weight.dtype`` at the merged value): rounding the merged weight loses at
        most half an ulp, and rounding back at most as much again. For float32 weights that is float32
        rounding; for bf16 (8-bit significand) one ulp is at most 2**-7 of the merged value, so where the
        delta is much larger than the weight itself, the weight's low bits are lost (float16: 2**-10).
        Measured: at most 1.0 ulp on bf16 128 x 256 layers with rank-8 adapters (tests/test_lora_layers.py).
        """
        if not self.merged_adapters:
            raise RuntimeError("no adapter is merged; nothing to unmerge")
        name = self.merged_adapters.pop()
        self._fold(name, sign=-1.0)

    def _fold(self, name: str, sign: float) -> None:
        """Add (``sign=1``) or subtract (``-1``) adapter ``name``'s update to ``weight``."""
        self._add_to_weight(self.delta_weight(name), sign=sign)

    def _init_magnitude(self, name: str) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # the DoRA cache holds weak references (not picklable) and is rebuilt on demand
        state = self.__dict__.copy()
        state.pop("_dora_cache", None)
        return state

    def clear_dora_cache(self) -> None:
        """Forget cached DoRA row norms (see :class:`LoRALinear`); needed only after changing ``weight``
        or a factor through ``.data`` (which bypasses the version counters the cache is keyed on)."""
        self.__dict__.pop("_dora_cache", None)

    def _add_to_weight(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # out of place: weight.to(work) IS weight when it is already in the work dtype
        updated = torch.add(weight.to(work), delta.to(work), alpha=sign)
        write_merged(weight, updated, sign)

    def lora_parameters(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """``(local state-dict key, parameter)`` of every LoRA factor (of adapter ``name`` if given)."""
        for attr in self._factor_names:
            for adapter, param in getattr(self, attr).items():
                if name is None or adapter == name:
                    yield f"{attr}.{adapter}", param
        for adapter, param in getattr(self, "lora_magnitude_vector", {}).items():
            if name is None or adapter == name:
                yield f"lora_magnitude_vector.{adapter}", param

    def _row_adapter_ids(self, x: torch.Tensor, min_dim: int = 2) -> tuple[list[str], torch.Tensor]:
        """For a mixed-adapter batch: the adapters this layer serves and each row's index into them.

        Rows are the first dimension of ``x``; a row whose adapter is ``BASE_ADAPTER`` or an adapter this
        layer does not hold gets ``-1`` (the base layer alone), as PEFT does for layers an adapter skips.
        """
        names = self._row_adapters
        if x.dim() < min_dim or x.shape[0] != len(names):
            raise ValueError(
                f"mixed_adapter_batch got {len(names)} adapter names but this layer's input has shape "
                f"{tuple(x.shape)}: give one name per row of the batch (the first dimension)"
            )
        if self.merged_adapters:
            raise RuntimeError(
                f"adapter {self.merged_adapters[0]!r} is merged into the weight; unmerge() before running a "
                "mixed-adapter batch"
            )
        used = [n for n in dict.fromkeys(names) if n in self.r]
        dora = [n for n in used if self.use_dora.get(n, False)]
        if dora:
            raise ValueError(
                f"mixed-adapter batches do not support DoRA adapters (use_dora=True): {dora}; run them "
                "with set_adapter instead"
            )
        index = {n: i for i, n in enumerate(used)}
        ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64).to(
            x.device, non_blocking=True
        )
        if self.training and any(self.lora_dropout[n].__class__ is nn.Dropout for n in used):
            raise NotImplementedError(
                "mixed-adapter batches do not apply LoRA dropout: call model.eval() or use adapters made "
                "with dropout=0 for mixed-batch training"
            )
        return used, ids

    def _active_unmerged(self) -> str | None:
        """The adapter ``forward`` must add, or None (no adapter, or merged)."""
        if self.merged_adapters:
            return None
        return self.active_adapter

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={self.r[n]} scale={self.scaling[n]:g}" + (" dora" if self.use_dora.get(n) else "")
            for n in self.r
        )
        merged = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"{self._shape_text()}, adapters={{{adapters}}}, active={self.active_adapter!r}{merged}"


def write_merged(weight: torch.Tensor, updated: torch.Tensor, sign: float) -> None:
    """Write a merged (``sign > 0``) or unmerged weight computed in a wider dtype into ``weight``.

    A merge whose result is not finite in ``weight.dtype`` (a NaN/Inf adapter, or a float16 entry beyond
    65504) would destroy the base weight for good -- unmerging NaN or Inf cannot give it back -- so it
    raises ValueError and leaves ``weight`` unchanged (PEFT's ``safe_merge`` check, on by default here:
    one pass over the weight, as the merge itself; huggingface/peft#1001, #3710).
    """
    rounded = updated.to(weight.dtype)
    if sign > 0 and not all_finite(rounded) and all_finite(weight.detach()):
        raise ValueError(
            f"merge: the merged weight would hold NaN or infinite values in {weight.dtype} (a non-finite "
            "adapter, or entries beyond the dtype's range); the weight is left unchanged and the adapter "
            "unmerged"
        )
    weight.copy_(rounded)


def _tensor_state(*tensors: torch.Tensor) -> list[tuple]:
    """What a cached value computed from ``tensors`` depends on: each tensor's identity (a weak reference,
    so the cache keeps nothing alive), storage, version counter (bumped by every in-place change, e.g. an
    optimizer step or ``copy_``), dtype, device and shape."""
    return [(weakref.ref(t), t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors]


def _same_state(state: list[tuple], tensors: tuple[torch.Tensor, ...]) -> bool:
    if len(state) != len(tensors):
        return False
    for (ref, ptr, version, dtype, device, shape), t in zip(state, tensors):
        if ref() is not t or (ptr, version, dtype, device, shape) != (
            t.data_ptr(),
            t._version,
            t.dtype,
            t.device,
            t.shape,
        ):
            return False
    return True


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the fused op runs in: autocast's when autocast is on for x's device, else the weight's."""
    device_type = x.device.type
    if device_type == "meta":  # shape inference: no autocast state exists for meta
        return weight.dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _check_input(x: object, weight: torch.Tensor, *, floating: bool) -> None:
    """Clear errors for inputs the base layer would reject deep inside torch (or accept with a cast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if floating:
        if x.is_complex() and not weight.is_complex():
            raise TypeError(
                f"x has complex dtype {x.dtype} but the layer's weight is {weight.dtype}; a real layer does "
                "not take complex input (nn.Linear refuses it too)"
            )
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    elif x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"x must hold integer indices (int64 or int32), got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(
            f"x is on device {x.device} but the layer's weight is on {weight.device}; move the input or the "
            "layer (a meta tensor has no data to compute with)"
        )


class LoRALinear(LoRALayer):
    r"""``nn.Linear`` with named low-rank adapters: ``y = x W^T + b + scale * dropout(x) A^T B^T``.

    The base ``weight`` (out, in) and ``bias`` are frozen; ``lora_A[name]`` (r, in) and ``lora_B[name]``
    (out, r) are trainable, ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). With dropout 0 or in
    eval mode the forward is one call of the fused op :func:`lowrank.lora_linear` (which keeps no activation
    beyond ``x`` for backward); when training with dropout > 0 the adapter sees ``dropout(x)`` while the
    base sees ``x``, which one fused call cannot express, so the base runs as ``F.linear`` and the adapter
    as two thin ``F.linear`` calls (this path also keeps the dropped input and the r-wide activation).
    Merged, the forward is ``F.linear`` on the merged weight: exactly the base layer's cost.

    Under ``torch.autocast`` the fused op runs in the autocast dtype (inputs and parameters cast, like
    ``nn.Linear``); otherwise the adapter factors are cast to the weight's dtype when they differ.

    **DoRA** (``use_dora=True``; Liu et al. 2024, arXiv:2402.09353, with PEFT's conventions): the adapter
    also holds a magnitude ``lora_magnitude_vector[name]`` (out,) and the layer computes

    ``y = (m / n) * (x W^T + scale * (x A^T) B^T) + b``,  ``n_i = ‖W_i + scale B_i A‖`` (row norms),

    with ``n`` treated as a constant in backward (detached, as the paper's section 4.3 and PEFT) and the
    bias added after the rescaling (as PEFT). The bracket is one :func:`lowrank.lora_linear` call and the
    rescaling one ``addcmul`` epilogue: no second pass over ``W`` per batch. ``n`` comes from the factors
    (:func:`lowrank.lora.dora.dora_row_norms`: one ``A W^T`` product, never ``W + scale B A``), with
    ``‖W_i‖²`` cached, and the whole ``n`` is cached until ``weight``, ``lora_A`` or ``lora_B`` change
    (keyed on their storage and version counters: an optimizer step or any in-place update invalidates it;
    after writing through ``.data`` call :meth:`clear_dora_cache`). In eval mode it is therefore computed
    once. With dropout > 0 in training, as PEFT: ``y = x W^T + b + (m/n - 1) * (d W^T) + (m/n) scale
    (d A^T) B^T`` with ``d = dropout(x)`` (two passes over ``W``). Merging folds
    ``W <- (m/n) * (W + scale B A)``; unmerging divides by the same stored factor and subtracts
    ``scale B A`` (see :meth:`unmerge` for the rounding).

    Parameters
    ----------
    in_features, out_features : int
    r : int
        Rank of the ``"default"`` adapter, ``1 <= r <= min(in_features, out_features)``.
    alpha, dropout, use_rslora, init, use_dora
        See :meth:`add_adapter`.
    bias : bool, default True
    device, dtype
        Of the new base parameters (initialised like ``nn.Linear``) and adapter factors.

    Complexity
    ----------
    Forward ``2 M in out + 2 M r (in + out)`` FLOPs for ``M`` tokens; ``r (in + out)`` trainable parameters.
    DoRA adds ``out`` parameters, ``2 M out`` FLOPs (epilogue) and, when the factors changed, ``2 r in out``
    FLOPs for the norms.

    Examples
    --------
    >>> layer = LoRALinear.from_linear(nn.Linear(64, 32), r=8, alpha=16)
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    """

    _supports_dora = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        base = nn.Linear(
            _check_dim("in_features", in_features),
            _check_dim("out_features", out_features),
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self._setup(base.weight, base.bias)
        self.add_adapter(
            "default", r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora
        )

    def _setup(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        self._init_adapter_state()
        self.out_features, self.in_features = weight.shape
        self._freeze_base(weight, bias)
        self.weight = weight
        self.bias = bias
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only (PEFT's name)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        pissa_triplets: Sequence | None = None,
    ) -> LoRALinear:
        """Wrap ``linear`` without copying: the layer holds its ``weight``/``bias`` Parameters (frozen);
        ``pissa_triplets`` as in :meth:`add_adapter`."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, LoRALayer):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias)
        layer._add_first_adapter(
            r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            use_dora=use_dora,
            pissa_triplets=pissa_triplets,
        )
        return layer

    # -- DoRA ------------------------------------------------------------------------------------
    def _init_magnitude(self, name: str) -> None:
        """``lora_magnitude_vector[name] = ‖W + scale B A‖`` row-wise, in the weight's dtype (as PEFT)."""
        norms = self.dora_weight_norm(name)
        self.lora_magnitude_vector[name] = nn.Parameter(norms.to(self.weight.dtype))

    def dora_weight_norm(self, name: str | None = None) -> torch.Tensor:
        """Row norms ``‖W_i + scale B_i A‖`` (out,) of DoRA adapter ``name`` (default: the active one).

        float32 (float64 for float64 weights), detached; cached until ``weight``, ``lora_A[name]`` or
        ``lora_B[name]`` change (see the class notes). See :func:`lowrank.lora.dora.dora_row_norms`.
        """
        name = self.active_adapter if name is None else name
        if name is None:
            raise RuntimeError("no active adapter")
        self._check_name(name)
        A, B = self.lora_A[name], self.lora_B[name]
        weight = self.weight
        if torch.compiler.is_compiling():
            return dora_row_norms(self._linear_weight(), A, B, self.scaling[name])
        cache = self.__dict__.setdefault("_dora_cache", {"weight": None, "norms": {}})
        return self._dora_cached(name, A, B, weight, cache)[0]

    def _dora_cached(
        self, name: str, A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor, cache: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 1 / max(n, tiny))`` of adapter ``name``, from the cache when still valid.

        ``weight`` is the stored Parameter (the cache key); the norms are taken over the output rows of its
        ``nn.Linear``-layout view :meth:`_linear_weight` (for :class:`LoRAConv1D`, the columns of the
        (in, out) storage, read in place through the transposed view).
        """
        sq = cache["weight"]
        linear = self._linear_weight()
        if sq is None or not _same_state(sq[0], (weight,)):
            work = torch.float64 if weight.dtype == torch.float64 else torch.float32
            sq = (_tensor_state(weight), weight_row_sq_norms(linear).to(work))
            cache["weight"] = sq
        hit = cache["norms"].get(name)
        if hit is not None and hit[1] == self.scaling[name] and _same_state(hit[0], (weight, A, B)):
            return hit[2]
        norms = dora_row_norms(linear, A, B, self.scaling[name], weight_sq_norms=sq[1])
        value = (norms, norms.clamp_min(torch.finfo(norms.dtype).tiny).reciprocal_())
        cache["norms"][name] = (_tensor_state(weight, A, B), self.scaling[name], value)
        return value

    def _dora_factor(self, name: str) -> torch.Tensor:
        """``m / n`` (out,) in the norm's dtype, differentiable in ``m`` only (``n`` is a constant)."""
        magnitude = self.lora_magnitude_vector[name]
        if torch.compiler.is_compiling():
            norms = self.dora_weight_norm(name)
            return magnitude.to(norms.dtype) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        cache = self.__dict__.setdefault("_dora_cache", {"weight": None, "norms": {}})
        _, inverse = self._dora_cached(name, self.lora_A[name], self.lora_B[name], self.weight, cache)
        return (
            magnitude * inverse if magnitude.dtype == inverse.dtype else magnitude.to(inverse.dtype) * inverse
        )

    def _fold(self, name: str, sign: float) -> None:
        if not self.use_dora.get(name, False):
            super()._fold(name, sign)
            return
        weight = self._linear_weight()  # (out, in); a view of the (in, out) storage for LoRAConv1D
        # float64 (one-time cost): unmerge then loses only the two roundings to weight.dtype
        work = torch.float32 if weight.device.type == "mps" else torch.float64
        delta = LoRALinear.delta_weight(self, name).to(work)  # (out, in) as well
        if sign > 0:
            factor = self._dora_factor(name).detach().to(work)
            if not bool(torch.isfinite(factor).all()) or not bool((factor != 0).all()):
                raise ValueError(
                    f"cannot merge DoRA adapter {name!r}: lora_magnitude_vector / row norm is zero or not "
                    "finite in some row, so unmerge could not restore the weight"
                )
            write_merged(weight, torch.add(weight.to(work), delta).mul_(factor[:, None]), sign)
            self.__dict__.setdefault("_dora_merge_factor", {})[name] = factor
        else:
            factor = self.__dict__.get("_dora_merge_factor", {}).pop(name, None)
            if factor is None:
                raise RuntimeError(
                    f"DoRA adapter {name!r} is marked merged but its merge factor is unknown (set by merge())"
                )
            weight.copy_(weight.to(work).div_(factor[:, None]).sub_(delta))

    def unmerge(self) -> None:
        """Take the merged adapter out of ``weight`` again.

        LoRA adapters: see :meth:`LoRALayer.unmerge` (each entry back to within one ulp of the merged
        weight). DoRA adapters: ``merge`` computes ``f (W + scale B A)`` with ``f = m / n`` in float64 and
        keeps ``f``; unmerging computes ``W_merged / f - scale B A`` in float64. Only the two roundings to
        ``weight.dtype`` remain: the merged entry's (half an ulp of ``f (W + scale B A)``, i.e. half an ulp
        of ``W + scale B A`` after dividing by ``f``) and the final one (half an ulp of ``W``), so each entry
        comes back to within one ulp of ``max(|W|, |W + scale B A|)`` in ``weight.dtype``. Checked on
        float32 and bfloat16 layers in tests/test_lora_dora.py.
        """
        super().unmerge()

    def _max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def _reset_factors(
        self, name: str, init: str, triplets: Sequence | None = None, n_iter: int | None = None
    ) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if init not in WEIGHT_INITS:
            reset_lora_factors_(A, B, init)
            return
        factors = _weight_init_factors(init, triplets, 1, n_iter)
        with torch.no_grad():
            B0, A0, residual = factors(0, self.weight, self.r[name], self.scaling[name])
            A.copy_(A0)
            B.copy_(B0)
            self.weight.copy_(residual)

    def _linear_weight(self) -> torch.Tensor:
        """The base weight in ``nn.Linear`` layout (out, in), as ``F.linear`` and the fused op take it."""
        return self.weight

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as the fused op takes them: (r_total, in) and (out, r_total)."""
        return self.lora_A[name], self.lora_B[name]

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        name = self.active_adapter if name is None else name
        if name is None:
            raise RuntimeError("no active adapter")
        self._check_name(name)
        A, B = self._factors(name)
        work = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (B.to(work) @ A.to(work)) * self.scaling[name]

    def _adapter_stacks(
        self, used: list[str], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A_stack, B_stack, scales)`` of the adapters ``used``, zero-padded to their largest rank.

        Padded rows of A and columns of B contribute nothing (see :func:`lowrank.lora_linear_multi`).
        Without autograd (inference) the stacks are cached until an adapter's parameters change, so
        serving a mixed batch copies no adapter weights per call; with autograd they are rebuilt each call
        so that gradients reach every adapter's own parameters.
        """
        params = [getattr(self, attr)[n] for n in used for attr in self._factor_names]
        key = (tuple(used), dtype, device, tuple((id(p), p._version) for p in params))
        cached = getattr(self, "_stack_cache", None)
        if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
            return cached[1]
        factors = [self._factors(n) for n in used]
        rank = max(A.shape[0] for A, _ in factors)
        A_stack = torch.stack([F.pad(A, (0, 0, 0, rank - A.shape[0])) for A, _ in factors]).to(dtype)
        B_stack = torch.stack([F.pad(B, (0, rank - B.shape[1])) for _, B in factors]).to(dtype)
        scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        scales = torch.tensor([self.scaling[n] for n in used], dtype=scale_dtype).to(device)
        stacks = (A_stack, B_stack, scales)
        self._stack_cache = (key, stacks) if not torch.is_grad_enabled() else None
        return stacks

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """One :func:`lowrank.lora_linear_multi` call: each row of the batch uses its own adapter."""
        used, ids = self._row_adapter_ids(x)
        dtype = _compute_dtype(x, self.weight)
        weight, bias = self._linear_weight().to(dtype), None if self.bias is None else self.bias.to(dtype)
        if not used:
            return F.linear(x.to(dtype), weight, bias)
        A_stack, B_stack, scales = self._adapter_stacks(used, dtype, x.device)
        row_ids = ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        return lora_linear_multi(x.to(dtype), weight, A_stack, B_stack, row_ids, scales, bias)

    # -- inference fast path (issue 19) ------------------------------------------------------------------
    # On small layers the per-call Python (adapter/dtype/device look-ups, the op's Python face, the boxed
    # dispatch of torch.ops and its autograd layer) was most of the cost of LoRA over the base layer (a
    # MiniLM-sized BERT ran at 1.07-1.13x its base at 1 x 16 tokens). Without autograd, forward reuses ONE
    # cached decision per layer: the fused op's arguments, with the module state they were derived from
    # (active adapter, train/eval, scale, and the identities of the Parameters). Each call checks that state
    # with a few identity tests, then hands the arguments to lowrank._ops.lora_linear_inference, a direct
    # call of the op (unboxed dispatch below autograd) that itself checks what depends on the call (x a plain
    # tensor of the layer's dtype and device, no autograd, no autocast, no torch-function mode) and answers
    # None when it cannot serve. Any miss (set_adapter, delete_adapter, merge/unmerge, .to(), train()/eval(),
    # Parameters replaced, another input dtype/device, autocast, grad mode) runs the general path, which
    # re-caches. In-place edits of a cached Parameter reach the op by themselves (it reads the Parameter);
    # where the cached factors are derived from the Parameters (LoRAMergedLinear's block layout of B) their
    # version counters are part of the state.
    _fast: tuple | None = None

    def _apply(self, fn, recurse=True):  # .to()/.half()/.cuda() swap Parameter data: drop the cache
        self._fast = None
        return super()._apply(fn, recurse)

    def _fast_state(self) -> tuple | None:
        """The module state the cached op arguments depend on (see above), or None when not cacheable."""
        name = self.active_adapter
        if name is None or self.merged_adapters or self._row_adapters is not None or self.use_dora.get(name):
            return None
        params = self._parameters
        A = self._modules[self._factor_names[0]]._parameters.get(name)
        B = self._modules[self._factor_names[1]]._parameters.get(name)
        if A is None or B is None:
            return None
        return (name, self.training, self.scaling.get(name), params["weight"], params.get("bias"), A, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is not None and not torch.compiler.is_compiling():
            name, training, scale, weight, bias, A, B, versions, args = fast
            params = self._parameters
            if (
                self.active_adapter == name
                and self.training is training
                and not self.merged_adapters
                and self._row_adapters is None
                and params["weight"] is weight
                and params.get("bias") is bias
                and self.scaling.get(name) == scale
                and self._modules[self._factor_names[0]]._parameters.get(name) is A
                and self._modules[self._factor_names[1]]._parameters.get(name) is B
                and (versions is None or versions == (A._version, B._version))
            ):
                out = lora_linear_inference(x, *args)
                if out is not None:
                    return out
        _check_input(x, self.weight, floating=True)
        if self._row_adapters is not None:
            return self._forward_mixed(x)
        name = self._active_unmerged()
        if name is None:
            return F.linear(x, self._linear_weight(), self.bias)
        A, B = self._factors(name)
        scale = self.scaling[name]
        dropout = self.lora_dropout[name]
        if self.use_dora.get(name, False):
            return self._forward_dora(x, name, A, B, scale, dropout)
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            # The adapter sees dropout(x), the base sees x: two separate products (see class docstring).
            return F.linear(x, self._linear_weight(), self.bias) + lora_term(dropout(x), A, B, scale)
        dtype = _compute_dtype(x, self.weight)
        weight, bias = self._linear_weight(), self.bias
        cacheable = x.dtype == dtype and weight.dtype == dtype and A.dtype == dtype and B.dtype == dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if weight.dtype != dtype:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if A.dtype != dtype:
            A, B = A.to(dtype), B.to(dtype)
        self._fast = None
        if cacheable and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # fast-path cache (see above): the exact arguments of this call, for the next calls
            state = self._fast_state()
            if state is not None:
                derived = A is not state[5] or B is not state[6]
                versions = (state[5]._version, state[6]._version) if derived else None
                self._fast = (*state, versions, (weight, A, B, float(scale), bias))
        return lora_linear(x, weight, A, B, scale, bias)

    def _forward_dora(
        self, x: torch.Tensor, name: str, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: nn.Module
    ) -> torch.Tensor:
        """``(m/n) * lora_linear(x, W, A, B, scale) + b`` (see the class notes; PEFT's formula)."""
        dtype = _compute_dtype(x, self.weight)
        factor = self._dora_factor(name).to(dtype)
        weight, bias = self._linear_weight(), self.bias
        if weight.dtype != dtype:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if A.dtype != dtype:
            A, B = A.to(dtype), B.to(dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            dropped = dropout(x)
            base_dropped = F.linear(dropped, weight)
            lora = lora_term(dropped, A, B, scale)
            return torch.addcmul(F.linear(x, weight, bias) - base_dropped, factor, base_dropped + lora)
        out = lora_linear(x, weight, A, B, scale, None)
        return out * factor if bias is None else torch.addcmul(bias, out, factor)


class LoRAMergedLinear(LoRALinear):
    r"""A fused projection (e.g. q/k/v in one ``nn.Linear``) where only some output slices get adapters.

    The output rows are split into ``out_slices`` (e.g. ``[d, d, d]`` for q, k, v); each slice ``i`` with
    ``enable_lora[i]`` gets its own rank-``r`` adapter ``B_i A_i`` (as loralib's ``MergedLinear``). Stored
    as ``lora_A[name]`` (k r, in) for the ``k`` enabled slices stacked, and ``lora_B[name]``
    (sum of enabled slice sizes, r) stacked. The forward assembles the block-structured
    ``B_full`` (out, k r) — zero outside the enabled slices' blocks, an ``out * k * r`` copy — and makes the
    single fused call ``lora_linear(x, W, A, B_full)``; ``B_full A`` equals the per-slice updates exactly.

    Parameters
    ----------
    in_features : int
    out_slices : sequence of int
        Sizes of the output slices; ``out_features = sum(out_slices)``.
    r : int
        Rank of each enabled slice's adapter, ``1 <= r <= min(in_features, size of each enabled slice)``.
    enable_lora : sequence of bool
        One flag per slice; at least one True.
    alpha, dropout, bias, use_rslora, init, device, dtype
        As :class:`LoRALinear` (``init="pissa"`` factors each enabled slice of the weight separately).
    """

    _supports_dora = False

    def __init__(
        self,
        in_features: int,
        out_slices: Sequence[int],
        r: int,
        *,
        enable_lora: Sequence[bool],
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        out_slices = self._check_slices(out_slices, enable_lora)
        base = nn.Linear(
            _check_dim("in_features", in_features), sum(out_slices), bias=bias, device=device, dtype=dtype
        )
        self._setup_merged(base.weight, base.bias, out_slices, enable_lora)
        self.add_adapter("default", r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)

    @staticmethod
    def _check_slices(out_slices: Sequence[int], enable_lora: Sequence[bool]) -> list[int]:
        slices = [
            _check_dim("out_slices entry", int(s) if not isinstance(s, bool) else s) for s in out_slices
        ]
        flags = list(enable_lora)
        if len(slices) != len(flags) or not slices:
            raise ValueError(
                f"out_slices ({len(slices)} entries) and enable_lora ({len(flags)} entries) must have the "
                "same non-zero length"
            )
        if not all(isinstance(f, bool) for f in flags) or not any(flags):
            raise ValueError(f"enable_lora must be bools with at least one True, got {flags}")
        return slices

    def _setup_merged(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        out_slices: list[int],
        enable_lora: Sequence[bool],
    ) -> None:
        self._setup(weight, bias)
        self.out_slices = list(out_slices)
        self.enable_lora = [bool(f) for f in enable_lora]
        starts = [sum(out_slices[:i]) for i in range(len(out_slices))]
        rows = [torch.arange(s, s + n) for s, n, f in zip(starts, out_slices, self.enable_lora) if f]
        self._enabled_sizes = [n for n, f in zip(out_slices, self.enable_lora) if f]
        self._enabled_starts = [s for s, f in zip(starts, self.enable_lora) if f]
        self.register_buffer("lora_rows", torch.cat(rows).to(weight.device), persistent=False)

    @classmethod
    def from_linear(  # type: ignore[override]
        cls,
        linear: nn.Linear,
        r: int,
        *,
        enable_lora: Sequence[bool],
        out_slices: Sequence[int] | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        pissa_triplets: Sequence | None = None,
    ) -> LoRAMergedLinear:
        """Wrap a fused projection ``linear`` without copying; ``out_slices`` defaults to equal slices;
        ``pissa_triplets`` as in :meth:`add_adapter` (one entry per enabled slice)."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, LoRALayer):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        flags = list(enable_lora)
        if out_slices is None:
            if not flags or linear.out_features % len(flags):
                raise ValueError(
                    f"out_features={linear.out_features} does not split into {len(flags)} equal slices; "
                    "pass out_slices"
                )
            out_slices = [linear.out_features // len(flags)] * len(flags)
        slices = cls._check_slices(out_slices, flags)
        if sum(slices) != linear.out_features:
            raise ValueError(
                f"out_slices {slices} sum to {sum(slices)}, not out_features={linear.out_features}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup_merged(linear.weight, linear.bias, slices, flags)
        layer._add_first_adapter(
            r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, pissa_triplets=pissa_triplets
        )
        return layer

    def _shape_text(self) -> str:
        return (
            f"weight {tuple(self.weight.shape)}, out_slices={self.out_slices}, enable_lora={self.enable_lora}"
        )

    def _max_rank(self) -> int:
        return min(self.in_features, *self._enabled_sizes)

    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r * len(self._enabled_sizes), self.in_features), (sum(self._enabled_sizes), r)

    def _reset_factors(
        self, name: str, init: str, triplets: Sequence | None = None, n_iter: int | None = None
    ) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if init not in WEIGHT_INITS:
            reset_lora_factors_(A, B, init)
            return
        r, scale = self.r[name], self.scaling[name]
        factors = _weight_init_factors(init, triplets, len(self._enabled_sizes), n_iter)
        with torch.no_grad():
            offset = 0
            for i, (start, size) in enumerate(zip(self._enabled_starts, self._enabled_sizes)):
                B0, A0, residual = factors(i, self.weight[start : start + size], r, scale)
                A[i * r : (i + 1) * r].copy_(A0)
                B[offset : offset + size].copy_(B0)
                self.weight[start : start + size].copy_(residual)
                offset += size

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.lora_A[name], self.lora_B[name]
        block_diagonal = torch.block_diag(*B.split(self._enabled_sizes, dim=0))  # (enabled out, k r)
        full = block_diagonal.new_zeros(self.out_features, block_diagonal.shape[1])
        return A, full.index_copy(0, self.lora_rows, block_diagonal)


def is_conv1d(module: object) -> bool:
    """True if ``module`` is a transformers ``Conv1D`` (GPT-2's c_attn / c_proj / c_fc; weight (in, out)).

    Checked against ``transformers.pytorch_utils.Conv1D`` only when transformers is already imported (a
    Conv1D instance cannot exist otherwise), so lowrank never imports transformers for this.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return isinstance(conv1d, type) and isinstance(module, conv1d)


class LoRAConv1D(LoRALinear):
    r"""transformers' ``Conv1D`` (GPT-2) with named low-rank adapters, PEFT's ``fan_in_fan_out=True``.

    ``Conv1D`` stores its weight transposed, ``weight`` (in, out), and computes ``y = x W + b``. The
    adapters keep the ``nn.Linear`` layout of :class:`LoRALinear` (and of PEFT): ``lora_A[name]`` (r, in),
    ``lora_B[name]`` (out, r), so ``y = x W + b + scale * dropout(x) A^T B^T`` and the update of the stored
    weight is ``scale * (B A)^T`` (PEFT's ``transpose(B A, fan_in_fan_out)``). The forward passes the
    transposed *view* ``weight.T`` (out, in) to :func:`lowrank.lora_linear`: no copy of the weight per call
    (the CPU op hands the view to BLAS as a transposed operand; the CUDA small-batch kernel, M <= 16 rows,
    makes one contiguous copy of a non-contiguous weight per call). ``merge`` / ``unmerge`` / PiSSA write
    into the (in, out) storage; :func:`lowrank.remove_lora` gives back a ``Conv1D``.

    **DoRA** (``use_dora=True``) works as on :class:`LoRALinear`, with PEFT's ``fan_in_fan_out`` convention
    (PEFT's ``DoraLinearLayer.get_weight_norm`` transposes the stored weight first): the magnitude
    ``lora_magnitude_vector[name]`` has one entry per *output* feature (``out_features``), the norms are
    ``‖W^T_i + scale B_i A‖`` over the output rows of the (out, in) view, i.e. the columns of the stored
    (in, out) weight, computed from the factors through the transposed view (no copy of the weight, never
    ``W + scale (B A)^T``), and merging scales the stored weight's columns.

    Parameters
    ----------
    in_features, out_features : int
        ``nx`` and ``nf`` of the ``Conv1D``; the new weight is (in_features, out_features), drawn from
        ``N(0, 0.02^2)`` as transformers does, the bias zero.
    r, alpha, dropout, bias, use_rslora, init, use_dora, device, dtype
        As :class:`LoRALinear` (``init="pissa"`` / ``"olora"`` factor ``weight.T``, the (out, in) view,
        as for ``nn.Linear``; PEFT's OLoRA code does not transpose a Conv1D weight).

    Examples
    --------
    >>> from transformers.pytorch_utils import Conv1D
    >>> layer = LoRAConv1D.from_conv1d(Conv1D(nf=192, nx=64), r=8)   # GPT-2's c_attn at n_embd=64
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 192])
    """

    _supports_dora = True  # norms over the output rows of the (out, in) view, as PEFT's fan_in_fan_out

    fan_in_fan_out = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        LoRALayer.__init__(self)
        shape = (_check_dim("in_features", in_features), _check_dim("out_features", out_features))
        weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02))
        bias_p = nn.Parameter(torch.zeros(shape[1], device=device, dtype=dtype)) if bias else None
        self._base_class: type | None = None
        self._setup(weight, bias_p)
        self.add_adapter(
            "default", r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora
        )

    def _setup(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super()._setup(weight, bias)
        self.in_features, self.out_features = weight.shape  # Conv1D: (nx, nf)

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        pissa_triplets: Sequence | None = None,
    ) -> LoRAConv1D:
        """Wrap a transformers ``Conv1D`` without copying: the layer holds its weight and bias (frozen);
        ``pissa_triplets`` as in :meth:`add_adapter`."""
        if not is_conv1d(conv1d) or isinstance(conv1d, LoRALayer):
            raise TypeError(f"conv1d must be a transformers Conv1D, got {type(conv1d).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._base_class = type(conv1d)
        layer._setup(conv1d.weight, conv1d.bias)
        layer._add_first_adapter(
            r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            use_dora=use_dora,
            pissa_triplets=pissa_triplets,
        )
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, **options) -> LoRALinear:  # type: ignore[override]
        raise TypeError("LoRAConv1D wraps a transformers Conv1D: use LoRAConv1D.from_conv1d")

    def to_conv1d(self) -> nn.Module:
        """A plain ``Conv1D`` holding this layer's ``weight``/``bias`` Parameters (no copy)."""
        conv1d = self._base_class
        if conv1d is None:
            try:
                from transformers.pytorch_utils import Conv1D as conv1d
            except ImportError as exc:  # pragma: no cover - transformers is a test dependency
                raise RuntimeError(
                    "giving back a Conv1D needs transformers (pip install transformers)"
                ) from exc
        plain = conv1d.__new__(conv1d)
        nn.Module.__init__(plain)
        plain.nf, plain.nx = self.out_features, self.in_features
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def _shape_text(self) -> str:
        return f"weight {tuple(self.weight.shape)} (in, out)"

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.T  # a view: (out, in)

    def _reset_factors(
        self, name: str, init: str, triplets: Sequence | None = None, n_iter: int | None = None
    ) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if init not in WEIGHT_INITS:
            reset_lora_factors_(A, B, init)
            return
        factors = _weight_init_factors(init, triplets, 1, n_iter)
        with torch.no_grad():  # on the (out, in) view, as for nn.Linear; the residual goes back as (in, out)
            B0, A0, residual = factors(0, self.weight.T, self.r[name], self.scaling[name])
            A.copy_(A0)
            B.copy_(B0)
            self.weight.copy_(residual.T)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """The adapter's update of ``weight`` in its (in, out) layout: ``scale * (B A)^T``."""
        return super().delta_weight(name).T


class LoRAEmbedding(LoRALayer):
    r"""``nn.Embedding`` with named low-rank adapters: ``E[x] + scale * dropout(A^T[x]) B^T``.

    ``weight`` (num_embeddings, embedding_dim) is frozen; ``lora_embedding_A[name]`` (r, num_embeddings)
    and ``lora_embedding_B[name]`` (embedding_dim, r) are trainable (PEFT's names and layouts), and the
    update to the table is ``scale * (B A)^T``. Default init (as PEFT): ``A`` zero, ``B ~ N(0, 1)``, so the
    model is unchanged at step 0 and ``A`` — the per-token rows — trains first. Dropout, if any, acts on the
    r-wide looked-up row ``A^T[x]``. Lookups cost ``O(tokens * r * dim)`` extra; ``max_norm`` renormalises
    the base table only.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    r : int
        ``1 <= r <= min(num_embeddings, embedding_dim)``.
    alpha, dropout, use_rslora, init
        See :meth:`LoRALayer.add_adapter`; here ``"default"`` and ``"gaussian"`` both give ``A = 0``,
        ``B ~ N(0, 1)``, and ``"pissa"`` factors the table itself.
    padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, device, dtype
        As ``nn.Embedding``.
    """

    _factor_names = ("lora_embedding_A", "lora_embedding_B")
    _weight_inits = ("pissa",)  # PEFT's OLoRA is for linear layers

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        base = nn.Embedding(
            _check_dim("num_embeddings", num_embeddings),
            _check_dim("embedding_dim", embedding_dim),
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            device=device,
            dtype=dtype,
        )
        self._setup(base)
        self.add_adapter("default", r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)

    def _setup(self, embedding: nn.Embedding) -> None:
        self._init_adapter_state()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        for attr in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self._freeze_base(embedding.weight, None)
        self.weight = embedding.weight
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        r: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        pissa_triplets: Sequence | None = None,
    ) -> LoRAEmbedding:
        """Wrap ``embedding`` without copying: the layer holds the same ``weight`` Parameter (frozen);
        ``pissa_triplets`` as in :meth:`add_adapter`."""
        if not isinstance(embedding, nn.Embedding) or isinstance(embedding, LoRALayer):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(embedding)
        layer._add_first_adapter(
            r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, pissa_triplets=pissa_triplets
        )
        return layer

    def _max_rank(self) -> int:
        return min(self.num_embeddings, self.embedding_dim)

    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.num_embeddings), (self.embedding_dim, r)

    @torch.no_grad()
    def _reset_factors(
        self, name: str, init: str, triplets: Sequence | None = None, n_iter: int | None = None
    ) -> None:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if init == "pissa":
            # table E = U S V^T (num, dim); update is scale * A^T B^T, so A^T = U_r sqrt(S/scale) and
            # B^T = sqrt(S/scale) V_r^T: pissa_factors on E gives (A^T, B^T, residual).
            factors = _weight_init_factors(init, triplets, 1, n_iter)
            left, right, residual = factors(0, self.weight, self.r[name], self.scaling[name])
            A.copy_(left.T)
            B.copy_(right.T)
            self.weight.copy_(residual)
        elif init == "zeros":
            A.zero_()
            B.zero_()
        else:  # "default" and "gaussian": the table-side factor starts at zero
            A.zero_()
            torch.nn.init.normal_(B)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        name = self.active_adapter if name is None else name
        if name is None:
            raise RuntimeError("no active adapter")
        self._check_name(name)
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        work = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (B.to(work) @ A.to(work)).T * self.scaling[name]

    def _shape_text(self) -> str:
        return f"weight {tuple(self.weight.shape)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.weight, floating=False)
        try:
            out = F.embedding(
                x,
                self.weight,
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
        except IndexError as error:  # torch's "index out of range in self" (CPU), named for the caller
            low, high = int(x.min()), int(x.max())
            raise ValueError(
                f"x holds token ids in [{low}, {high}], outside [0, num_embeddings) = "
                f"[0, {self.num_embeddings})"
            ) from error
        if self._row_adapters is not None:
            used, ids = self._row_adapter_ids(x, min_dim=1)
            for j, name in enumerate(used):  # a loop over the adapters present (few), not over rows
                rows = (ids == j).nonzero().flatten()
                A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
                picked = F.embedding(
                    x[rows], A.T, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse
                )
                out = out.index_add(0, rows, (picked @ B.T) * self.scaling[name])
            return out
        name = self._active_unmerged()
        if name is None:
            return out
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = F.embedding(x, A.T, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        return out + (self.lora_dropout[name](rows) @ B.T) * self.scaling[name]
