"""Data-driven LoRA initialisations from calibration batches (PEFT's init_lora_weights "corda" / "eva").

One entry point, :func:`calibrate_lora`: forward hooks on the target linear layers accumulate, in float64 and
without storing any input, the statistics each method needs (``X^T X``, and for EVA ``X^T 1`` and the row
count), the model is run on the calibration data, the hooks are removed (also on error), and the adapters
are injected with factors from :func:`lowrank.lora.init.corda_factors` /
:func:`lowrank.lora.init.eva_components`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lowrank._linop import python_number
from lowrank.lora.init import CALIBRATED_INITS, CORDA_MODES, corda_factors, eva_components
from lowrank.lora.layers import LoRAConv1D, LoRALinear, is_conv1d
from lowrank.lora.model import _as_patterns, _matches, _replace, check_weights_unshared, inject_lora

__all__ = ["calibrate_lora"]

#: PEFT's ``label_mask_value``: label positions with this value are left out of EVA's statistics.
LABEL_MASK_VALUE = -100


class _Stats:
    """Float64 running statistics of one layer's inputs (never the inputs themselves)."""

    def __init__(self, name: str, d: int, device: torch.device, init: str) -> None:
        self.name, self.init = name, init
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.col_sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.rows = 0
        self.calls = 0
        self.mask: torch.Tensor | None = None  # EVA: the current batch's token mask, if any

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if isinstance(args, tuple) and args else args
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"calibrate_lora: layer {self.name!r} got a {type(x).__name__} input, not a Tensor"
            )
        x = x.detach()
        if self.init == "eva" and self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            x = x[self.mask.to(x.device)]  # PEFT: only non-padding (and non-ignored-label) tokens
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibrate_lora: layer {self.name!r} received NaN or Inf inputs")
        if x.shape[0] == 0:
            return
        if self.init == "corda":
            # PEFT's CorDA hook: each call's inputs are divided by |max(X)| before X^T X is added
            peak = float(x.max().abs())
            if peak == 0.0:
                raise ValueError(
                    f"calibrate_lora: layer {self.name!r} received inputs whose maximum is 0 (CorDA divides "
                    "each batch by |max(X)|, as PEFT)"
                )
            x = x / peak
        else:
            self.col_sum += x.sum(dim=0)
        self.gram += x.T @ x
        self.rows += x.shape[0]
        self.calls += 1


def _linear_view(module: nn.Module) -> torch.Tensor:
    """The target's weight in ``nn.Linear`` layout (out, in): a transposed *view* for a GPT-2 ``Conv1D`` /
    :class:`LoRAConv1D` (weight stored (in, out)), so a write into it lands in the stored weight."""
    if isinstance(module, LoRAConv1D) or is_conv1d(module):
        return module.weight.T
    return module.weight


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _token_mask(batch: Any) -> torch.Tensor | None:
    """PEFT's EVA default: ``attention_mask`` (and ``labels != -100``) of a mapping batch, as bool."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if isinstance(mask, torch.Tensor):
        mask = mask.bool()
    else:
        mask = None
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
        keep = labels != LABEL_MASK_VALUE
        mask = keep if mask is None else (mask & keep if mask.shape == keep.shape else mask)
    return mask


def _check_number(name: str, value: object, low: float, *, inclusive: bool = True) -> float:
    value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (not inclusive and value == low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    return float(value)


def _eva_ranks(ratios: dict[str, torch.Tensor], budget: int, order: list[str]) -> dict[str, int]:
    """PEFT's EVA redistribution: the ``budget`` largest explained-variance ratios of all layers, counted
    per layer (ties broken by layer order, then component index)."""
    pooled = [
        (-float(v), i, j, name) for i, name in enumerate(order) for j, v in enumerate(ratios[name].tolist())
    ]
    pooled.sort()
    counts = dict.fromkeys(order, 0)
    for _, _, _, name in pooled[:budget]:
        counts[name] += 1
    return counts


@torch.no_grad()
def calibrate_lora(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...],
    batches: Iterable[Any] | Callable[[], Any],
    r: int = 8,
    *,
    init: str = "corda",
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = "default",
    corda_mode: str = "ipm",
    damping: float = 0.01,
    rho: float = 2.0,
    whiten: bool = False,
    adjust_scaling_factors: bool = True,
    method: str = "rsvd",
    forward: Callable[[nn.Module, Any], Any] | None = None,
    freeze_base: bool = True,
) -> dict[str, int]:
    r"""Inject LoRA adapters initialised from calibration data: CorDA (both modes) or EVA, as PEFT.

    The target ``nn.Linear`` / GPT-2 ``Conv1D`` layers get forward hooks that accumulate float64 statistics
    of their inputs (``d x d`` per layer, ``d = in_features``; the inputs are never stored), the model runs
    on ``batches`` in eval mode under ``no_grad``, the hooks are removed (also when a batch raises), the
    training mode is restored, and the adapters are injected with :func:`lowrank.lora.inject_lora` and set:

    * ``init="corda"`` (Yang et al. 2024, PEFT's ``preprocess_corda`` + ``init_lora_weights="corda"``):
      ``C`` = mean over the forward calls of ``X^T X``, each call's ``X`` divided by ``|max(X)|`` as PEFT
      does; factors from :func:`lowrank.lora.init.corda_factors` (``corda_mode`` "ipm" = top ``r``
      components of ``W C~``, "kpm" = smallest ``r``); the base weight becomes the residual, so the model's
      output is unchanged.
    * ``init="eva"`` (Paischer et al. 2024, PEFT's ``initialize_lora_eva_weights``): the top principal
      directions of each layer's (column-centred) inputs, :func:`lowrank.lora.init.eva_components`; up to
      ``round(r * rho)`` per layer, and the ``r * n_layers`` largest explained-variance ratios over all layers
      decide each layer's rank (PEFT's redistribution; a layer may get 0 and is then left without adapter).
      ``lora_A`` = the components (divided by the square root of their singular values with ``whiten``),
      ``lora_B = 0``; the output is unchanged. With ``adjust_scaling_factors`` a layer of rank ``r_i`` gets
      ``alpha * r_i / r`` (PEFT's rule). For a mapping batch, tokens where ``attention_mask`` is 0 or
      ``labels == -100`` are left out (PEFT's default ``prepare_layer_inputs_fn``).

    Parameters
    ----------
    model : nn.Module
    target_modules : str or sequence of str
        As :func:`lowrank.lora.inject_lora`; every matched module must be an ``nn.Linear`` or a
        transformers ``Conv1D`` (or a :class:`LoRALinear` / :class:`LoRAConv1D`, which gets a new adapter
        ``adapter_name``; none merged). A ``Conv1D`` (weight stored (in, out)) is handled as PEFT does: its
        input ``x`` has the ``in`` features either way, the factors are computed for the (out, in) view and
        come out in the ``nn.Linear`` layout PEFT's ``fan_in_fan_out`` adapters use (``lora_A`` (r, in),
        ``lora_B`` (out, r)), and CorDA's residual is written back into the (in, out) storage.
    batches : iterable of batches, or callable
        An iterable (list, DataLoader, generator) of batches, each run as ``forward(model, batch)``; or a
        callable taking no argument that runs the model itself (PEFT's ``run_model`` for CorDA). Read once.
    r : int, default 8
        Rank (EVA: the mean rank; the budget is ``r`` per target layer).
    alpha, dropout, use_rslora, adapter_name
        As :func:`lowrank.lora.inject_lora` (``alpha`` default ``r``).
    corda_mode : {"ipm", "kpm"}, default "ipm"
    damping : float, default 0.01
        CorDA's relative damping of ``C`` (see :func:`lowrank.lora.init.corda_factors`).
    rho : float, default 2.0
        EVA: a layer gets at most ``round(r * rho)`` components, ``rho >= 1`` (1: no redistribution).
    whiten : bool, default False
        EVA: whiten the components (PEFT's ``EvaConfig.whiten``).
    adjust_scaling_factors : bool, default True
        EVA: ``alpha * r_i / r`` for a layer of rank ``r_i`` (PEFT's ``EvaConfig.adjust_scaling_factors``).
    method : {"rsvd", "svd"}, default "rsvd"
        SVD engine for CorDA "ipm" (``W C~``) and EVA (the ``d x d`` scatter): randomized or exact.
    forward : callable, optional
        ``forward(model, batch)``; default ``model(**batch)`` for a mapping, ``model(*batch)`` for a
        tuple/list, else ``model(batch)``.
    freeze_base : bool, default True
        As :func:`lowrank.lora.inject_lora`.

    Returns
    -------
    dict[str, int]
        The rank given to each target layer (qualified name -> rank; EVA: 0 for a layer left without
        adapter).

    Raises
    ------
    TypeError
        ``model`` not a module; ``batches`` neither iterable nor callable; a target not ``nn.Linear`` /
        ``Conv1D``; a non-tensor layer input.
    ValueError
        Bad ``init``, ``r``, ``corda_mode``, ``damping``, ``rho``, ``method``; a target matching nothing;
        a target that received no input (or, for EVA, fewer than 2 rows); NaN/Inf inputs.

    All or nothing: on any error the hooks are gone and the model keeps its modules, weights and flags.

    Cost: per target layer and calibration row ``2 d^2`` flops and ``d^2`` float64 memory (like PEFT's
    covariance); then CorDA "ipm" one ``out x d x d`` GEMM and a rank-``r`` randomized SVD, "kpm" an exact
    SVD (the smallest singular values need it), EVA one SVD of a ``d x d`` PSD matrix. PEFT's EVA iterates
    an incremental PCA until successive components agree (``tau``); here the statistics are exact for the
    batches given, so there is no convergence loop: pass as many batches as you want used.

    Shipping: CorDA (like PiSSA/OLoRA) rewrites base weights, so a saved adapter needs the residual base
    weights with it (save the model's state dict, or ``lowrank.lora.save_adapter`` plus the residual
    weights), as PEFT documents for these inits. EVA leaves the base weights alone: the adapter loads in
    PEFT on the original model (per-layer ranks/alphas go to ``rank_pattern`` / ``alpha_pattern``).

    Examples
    --------
    >>> ranks = calibrate_lora(model, ["query", "value"], loader, r=16, init="corda")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if init not in CALIBRATED_INITS:
        raise ValueError(f"init must be one of {CALIBRATED_INITS}, got {init!r}")
    patterns = _as_patterns("target_modules", target_modules)
    r, dropout = python_number(r), python_number(dropout)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if corda_mode not in CORDA_MODES:
        raise ValueError(f"corda_mode must be one of {CORDA_MODES}, got {corda_mode!r}")
    _check_number("damping", damping, 0.0, inclusive=False)
    rho = _check_number("rho", rho, 1.0)
    if method not in ("rsvd", "svd"):
        raise ValueError(f"method must be one of ('rsvd', 'svd'), got {method!r}")
    for flag_name, flag in (("whiten", whiten), ("adjust_scaling_factors", adjust_scaling_factors)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if forward is None:
        forward = _default_forward
    elif not callable(forward):
        raise TypeError(f"forward must be a callable (model, batch), got {type(forward).__name__}")
    is_callable = callable(batches) and not isinstance(batches, nn.Module)
    if not is_callable and not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches or a callable, got {type(batches).__name__}")
    if alpha is None:
        alpha = float(r)
    alpha = _check_number("alpha", alpha, 0.0, inclusive=False)

    # -- targets ---------------------------------------------------------------------------------
    targets: dict[str, nn.Module] = {}
    hits = dict.fromkeys(patterns, 0)
    for name, module in model.named_modules():
        matched = [p for p in patterns if name and _matches(p, name)]
        if not matched:
            continue
        for p in matched:
            hits[p] += 1
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) and type(module) not in (
            LoRALinear,
            LoRAConv1D,
        ):
            raise TypeError(
                f"target {matched[0]!r} matches module {name!r} of type {type(module).__name__}; "
                f"init={init!r} takes nn.Linear and transformers Conv1D layers"
            )
        if isinstance(module, LoRALinear) and module.merged_adapters:
            raise ValueError(f"module {name!r} has a merged adapter; unmerge it before calibrate_lora")
        if min(module.weight.shape) < r:
            raise ValueError(
                f"r must be an int in [1, {min(module.weight.shape)}] for module {name!r} (weight "
                f"{tuple(module.weight.shape)}), got {r!r}"
            )
        targets[name] = module
    missing = [p for p, count in hits.items() if count == 0]
    if missing:
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
    if init == "corda":  # CorDA writes its residual into the base weights
        check_weights_unshared(model, list(targets), "calibrate_lora(init='corda')")

    # -- statistics ------------------------------------------------------------------------------
    stats = {
        name: _Stats(name, _linear_view(m).shape[1], m.weight.device, init) for name, m in targets.items()
    }
    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(stats[name]))
        model.eval()
        if is_callable:
            batches()
        else:
            for batch in batches:
                mask = _token_mask(batch) if init == "eva" else None
                for s in stats.values():
                    s.mask = mask
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for s in stats.values():
            s.mask = None
        for m, mode in modes:
            m.training = mode
    for name, s in stats.items():
        if s.calls == 0 or (init == "eva" and s.rows < 2):
            raise ValueError(
                f"calibrate_lora: layer {name!r} received {s.rows} input rows from the calibration batches "
                f"(init={init!r} needs {'2' if init == 'eva' else 'at least 1'})"
            )

    # -- factors (nothing in the model is touched yet) ---------------------------------------------
    scale_of = (lambda a, k: a / math.sqrt(k)) if use_rslora else (lambda a, k: a / k)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    factors: dict[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = {}
    if init == "corda":
        for name, module in targets.items():
            s = stats[name]
            B, A, residual = corda_factors(
                _linear_view(module),
                s.gram / s.calls,
                r,
                scale_of(alpha, r),
                mode=corda_mode,
                damping=damping,
                method=method,
            )
            ranks[name], alphas[name] = r, alpha
            factors[name] = (B, A, residual)
    else:
        if rho > 1000:  # PEFT's cap for a huge rho
            rho = min(rho, max(max(p.shape) for p in model.parameters()) // r)
        comps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, module in targets.items():
            s = stats[name]
            d = _linear_view(module).shape[1]
            k = max(1, min(round(r * rho), d, min(module.weight.shape)))
            comps[name] = eva_components(s.gram, s.col_sum, s.rows, k, method=method)
        ranks = _eva_ranks({n: c[1] for n, c in comps.items()}, r * len(targets), list(targets))
        for name, rank in ranks.items():
            if rank == 0:
                continue
            components, _, singular = comps[name]
            A = components[:rank]
            if whiten:
                A = A / singular[:rank].sqrt().clamp_min(torch.finfo(torch.float64).tiny)[:, None]
            alphas[name] = alpha * rank / r if adjust_scaling_factors else alpha
            factors[name] = (None, A.to(targets[name].weight.dtype), None)

    # -- inject (undone as a whole on error) -------------------------------------------------------
    groups: dict[tuple[int, float], list[str]] = {}
    for name in factors:
        groups.setdefault((ranks[name], alphas[name]), []).append(name)
    saved_weights = {n: targets[n].weight.detach().clone() for n in factors} if init == "corda" else {}
    grads = [(p, p.requires_grad) for p in model.parameters()]
    done: list[str] = []
    try:
        for (rank, layer_alpha), names in groups.items():
            inject_lora(
                model,
                ["^" + re.escape(n) + "$" for n in names],
                rank,
                alpha=layer_alpha,
                dropout=dropout,
                use_rslora=use_rslora,
                init="zeros",
                adapter_name=adapter_name,
                freeze_base=False,
            )
            done.extend(names)
            for n in names:
                layer = model.get_submodule(n)
                B, A, residual = factors[n]
                layer.lora_A[adapter_name].copy_(A)
                if B is not None:
                    layer.lora_B[adapter_name].copy_(B)
                    _linear_view(layer).copy_(residual)  # Conv1D: into the (in, out) storage
                    layer.__dict__.setdefault("weight_init", {})[adapter_name] = "corda"
        if freeze_base:
            from lowrank.lora.model import mark_only_lora_trainable

            mark_only_lora_trainable(model)
    except BaseException:
        for n in done:
            layer = model.get_submodule(n)
            original = targets[n]
            if layer is original:  # an existing LoRALinear: drop the new adapter
                layer.delete_adapter(adapter_name)
            else:
                _replace(model, n, original)
        for n, w in saved_weights.items():
            targets[n].weight.copy_(w)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise
    return ranks
