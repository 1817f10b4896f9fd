"""Adapter checkpoints in the Hugging Face PEFT layout: save, load, size.

A checkpoint is a directory holding

* ``adapter_model.safetensors``: one pair of tensors per adapted layer, named as PEFT names them,
  ``base_model.model.<module path>.lora_A.weight`` of shape ``(r, in_features)`` and
  ``base_model.model.<module path>.lora_B.weight`` of shape ``(out_features, r)`` for linear layers, and
  ``base_model.model.<module path>.lora_embedding_A`` ``(r, num_embeddings)`` /
  ``lora_embedding_B`` ``(embedding_dim, r)`` for embeddings (a GPT-2 ``Conv1D``, weight stored
  ``(in, out)``, has the linear layout and ``fan_in_fan_out: true`` in the config, as PEFT writes it), and
  the full state dict of each ``modules_to_save`` copy under ``base_model.model.<module path>.<key>``
  (PEFT 0.21 drops the wrapper's ``modules_to_save.<adapter>.`` from these keys); DoRA adapters
  (``use_dora: true`` in the config) add ``base_model.model.<module path>.lora_magnitude_vector`` of shape
  ``(out_features,)``;
* ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type="LORA"``, ``r``, ``lora_alpha``,
  ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ...).

Such a directory is read by ``peft.PeftModel.from_pretrained`` and written by PEFT's ``save_pretrained``;
:func:`save_adapter` and :func:`load_adapter` write and read it without importing PEFT. The update of a
layer is ``delta W = scaling * B @ A`` with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rank-stabilised LoRA, Kalajdzievski 2023, arXiv:2312.03732), as in LoRA (Hu et al. 2021, arXiv:2106.09685).

Safety: adapter data is read from safetensors (no pickle); a legacy ``adapter_model.bin`` is read only with
``torch.load(weights_only=True)`` and a warning. Files are written to a temporary file in the target
directory, flushed to disk and moved into place with :func:`os.replace`, so a crash mid-save leaves the
previous checkpoint intact. Loading checks every tensor (shape, rank, dtype, finiteness) against the model
before changing anything, and raises an error naming the offending key; the model is unchanged on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank.io import entries_from_dict as _entries_from_dict
from lowrank.io import (
    folder_for_write,
    fsync_directory,
    write_safetensors_to,
    write_temporary,
)
from lowrank.lora.layers import is_conv1d
from lowrank.lora.model import (
    TRAINED_BIAS_ATTR,
    active_adapter_names,
    check_not_reserved,
    check_weights_unshared,
    keep_running_adapter,
)
from lowrank.lora.peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    LEGACY_WEIGHTS_NAME,
    MEANINGFUL_FIELDS,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    build_peft_config,
    config_from_text,
    key_names,
    matches_targets,
    pattern_value,
    read_config,
)

__all__ = ["AdapterSize", "ResidualBaseWarning", "adapter_size", "load_adapter", "save_adapter"]


class ResidualBaseWarning(UserWarning):
    """An adapter that only fits *residual* base weights is saved or loaded as if it fitted the original ones.

    PiSSA, OLoRA and CorDA initialisations rewrite the base weight ``W`` to ``W - scale B0 A0``; the trained
    factors are relative to that residual. Saved as they are, they reproduce the fine-tuned model only on the
    residual weights (ship them too), so :func:`save_adapter` warns unless ``convert_to_lora_from`` turns
    the adapter into a plain LoRA adapter relative to the original weights (PEFT's
    ``path_initial_model_for_weight_conversion``). Silence it with ``warnings.filterwarnings``.
    """


# Config read from disk, per adapter, kept on the model so that a later save keeps unknown fields.
_CONFIG_ATTR = "_lowrank_adapter_configs"

# ----------------------------------------------------------------------------------------------------
# LoRA modules (duck-typed on the layer attribute contract of lowrank.lora.layers)
# ----------------------------------------------------------------------------------------------------


def _is_lora_linear(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ParameterDict)


def _is_lora_embedding(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_embedding_A", None), nn.ParameterDict)


def _lora_pair(module: nn.Module, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter] | None:
    if _is_lora_linear(module) and adapter_name in module.lora_A:
        return module.lora_A[adapter_name], module.lora_B[adapter_name]
    if _is_lora_embedding(module) and adapter_name in module.lora_embedding_A:
        return module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
    return None


def _lora_modules(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if _lora_pair(m, adapter_name) is not None]


def _stored_config(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    return dict(getattr(model, _CONFIG_ATTR, {}).get(adapter_name, {}))


def _remember_config(model: nn.Module, adapter_name: str, config: dict[str, Any]) -> None:
    store = dict(getattr(model, _CONFIG_ATTR, {}))
    store[adapter_name] = dict(config)
    # object.__setattr__: a plain attribute, not a submodule/parameter, not part of the state dict.
    object.__setattr__(model, _CONFIG_ATTR, store)


def _module_universe(model: nn.Module) -> list[str]:
    """Module paths PEFT would see on ``model``: LoRA layers' own children (lora_A, ...) left out."""
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    names: list[str] = []
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        names.append(name)
        if _is_lora_linear(module) or _is_lora_embedding(module):
            inside = (*inside, name + ".")
        elif isinstance(module, ModulesToSaveWrapper):  # PEFT sees the original module's paths
            names.extend(f"{name}.{sub}" for sub, _ in module.original_module.named_modules() if sub)
            inside = (*inside, name + ".")
    return names


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (the adapter folder), got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("path must be a non-empty folder name, got ''")
    return path


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# ----------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    convert_to_lora_from: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    bias: str | None = None,
) -> None:
    """Save one adapter of a LoRA-injected model as a PEFT checkpoint directory.

    Parameters
    ----------
    model : nn.Module
        A model whose layers were adapted with :func:`lowrank.inject_lora` (or loaded with
        :func:`load_adapter`). Module paths are taken relative to ``model``: pass the same object the
        base model would be given to ``peft.PeftModel.from_pretrained`` (e.g. the ``LlamaForCausalLM``).
    path : str or PathLike
        Directory to write; created if missing. ``adapter_model.safetensors`` and ``adapter_config.json``
        are replaced atomically; other files in it are left alone.
    adapter_name : str, default "default"
        Which adapter to save. PEFT drops the adapter name from the keys, so any name loads as any name.
    base_model_name_or_path : str, optional
        Recorded in the config (PEFT's ``AutoPeftModel`` uses it to find the base model).
    task_type : str, optional
        PEFT task type (e.g. ``"CAUSAL_LM"``); recorded in the config.
    convert_to_lora_from : str, PathLike or mapping of str to Tensor, optional
        For an adapter whose initialisation rewrote the base weights (PiSSA, OLoRA, CorDA: ``W_res = W -
        s B0 A0``): the adapter *as initialised*, before training, either a folder saved by
        :func:`save_adapter` (or PEFT's ``save_pretrained``) right after the init, or a mapping holding its
        factors (e.g. ``{k: v.clone() for k, v in lowrank.lora_state_dict(model).items()}`` taken right
        after the init; keys ``<module path>.lora_A.<adapter>`` or PEFT's ``base_model.model.<module
        path>.lora_A.weight``). The adapter is then saved as a plain LoRA adapter relative to the
        *original* weights, as PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
        does: ``W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]``, a rank-``2r`` adapter with
        ``lora_alpha`` doubled (``alpha / r`` unchanged; with rsLoRA ``alpha * sqrt(2)``, so that
        ``alpha / sqrt(r)`` is unchanged), ``rank_pattern`` / ``alpha_pattern`` likewise per layer, and
        ``init_lora_weights: true``; it loads on the original base model (in PEFT or lowrank) with no
        residual weights to ship. DoRA magnitudes and ``modules_to_save`` copies are kept as they are (the
        adapted weight ``W + s B' A'`` equals ``W_res + s B A``, so the DoRA norms are unchanged; PEFT's
        conversion drops them). Exact up to rounding: ``W_res`` was rounded to the weight's dtype at init.
    bias : {"none", "all", "lora_only"}, optional
        Which biases the file carries, as PEFT's ``LoraConfig.bias`` (and
        :func:`lowrank.mark_only_lora_trainable`'s ``bias``): ``"all"`` every state-dict entry of the model
        whose key contains ``"bias"`` (outside the adapters and the ``modules_to_save`` copies, which are
        saved as such), ``"lora_only"`` the biases of the layers holding ``adapter_name``. Keys as PEFT
        writes them: ``base_model.model.<path>.base_layer.bias`` for a LoRA layer, ``base_model.model.<key>``
        otherwise. Default: the ``bias`` last given to :func:`lowrank.mark_only_lora_trainable` on
        ``model`` if not ``"none"``, else the ``bias`` of the config :func:`load_adapter` read for this
        adapter, else ``"none"``. Biases are shared by all adapters of a model (as in PEFT).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``, ``path`` is not a str / PathLike, or ``convert_to_lora_from``
        is neither a path nor a mapping.
    ValueError
        If ``bias`` is not one of the three modes,
        no layer holds ``adapter_name``, ``path`` is a regular file, the layers use settings one PEFT
        config cannot express (mixed ``use_rslora``), or ``convert_to_lora_from`` lacks a layer of the
        adapter, holds a layer the adapter does not have, or a factor of another shape (the error names the
        key).

    Warns
    -----
    UserWarning
        When ``bias="none"`` is passed for a model whose biases :func:`lowrank.mark_only_lora_trainable`
        made trainable: their trained values will not be in the file.
    ResidualBaseWarning
        When a layer's adapter was initialised by rewriting its base weight (``LoRALayer.weight_init``:
        PiSSA, OLoRA, CorDA) and ``convert_to_lora_from`` is not given: the saved factors reproduce the
        fine-tuned model only on the residual weights. Not for an adapter :func:`load_adapter` read from a
        PEFT config with ``init_lora_weights`` ``"pissa"`` / ``"olora"``: that config is written again, and
        PEFT and :func:`load_adapter` re-run the init on the original base when they read it.

    Notes
    -----
    Per-layer ranks and alphas are written as PEFT's ``rank_pattern`` / ``alpha_pattern`` around the most
    common value, with keys and ``target_modules`` that PEFT's matching rules resolve to exactly the adapted
    modules (see :func:`build_peft_config`). Both files are staged in full and then renamed into place, and
    the weights carry the config they were saved with, so an interrupted save is read as the old or the new
    checkpoint, never a mix (see :func:`write_adapter_dir`). Fields of a config previously read by
    :func:`load_adapter` that lowrank does not interpret are kept. ``fan_in_fan_out`` is true when the
    adapter's layers are GPT-2 ``Conv1D`` (:class:`~lowrank.lora.layers.LoRAConv1D`); ``modules_to_save``
    lists the modules holding a copy for ``adapter_name`` (their state dicts are written under PEFT's keys,
    ``base_model.model.<path>.<key>``). Cost: one copy of the adapter tensors,
    ``O(sum_l r_l (m_l + n_l))``, plus the ``modules_to_save`` copies.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    path = _check_path(path)
    if bias is None:
        trained_bias = getattr(model, TRAINED_BIAS_ATTR, "none")
        stored_bias = _stored_config(model, adapter_name).get("bias")
        if trained_bias in ("all", "lora_only"):
            bias = trained_bias
        else:
            bias = stored_bias if stored_bias in _BIAS_MODES else "none"
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a file, not a directory; pass the adapter folder to write")
    modules = _lora_modules(model, adapter_name)
    if not modules:
        raise ValueError(f"adapter_name: no LoRA layer of the model holds an adapter named {adapter_name!r}")
    if bias == "none" and getattr(model, TRAINED_BIAS_ATTR, "none") != "none":
        warnings.warn(
            f"save_adapter: bias='none', but the model's biases were made trainable "
            f"(mark_only_lora_trainable(bias={getattr(model, TRAINED_BIAS_ATTR)!r})); the file will not "
            "hold them",
            UserWarning,
            stacklevel=2,
        )
    initial = None
    if convert_to_lora_from is not None:
        initial = _initial_factors(convert_to_lora_from, modules, adapter_name)
    else:
        # An adapter loaded from a PEFT config that says init_lora_weights "pissa" / "olora" is written with
        # that config again, which makes PEFT and load_adapter re-derive the residual from the original base:
        # that file is right as it is. Every other rewritten layer makes the file a trap.
        stored = _stored_config(model, adapter_name).get("init_lora_weights")
        rewritten = [
            (p, getattr(m, "weight_init", {})[adapter_name])
            for p, m in modules
            if adapter_name in getattr(m, "weight_init", {})
            and not (stored in ("pissa", "olora") and getattr(m, "weight_init", {})[adapter_name] == stored)
        ]
        if rewritten:
            warnings.warn(
                f"adapter {adapter_name!r} was initialised with init={rewritten[0][1]!r} on "
                f"{rewritten[0][0]!r}"
                + (f" and {len(rewritten) - 1} more layers" if len(rewritten) > 1 else "")
                + ", which rewrote the base weights to a residual: the saved adapter reproduces the "
                "fine-tuned model only together with those residual weights. Pass convert_to_lora_from=<the "
                "adapter as "
                "initialised> to save a plain LoRA adapter for the original weights (PEFT's "
                "path_initial_model_for_weight_conversion), or ship the residual base "
                "(lowrank.remove_lora(copy.deepcopy(model)))",
                ResidualBaseWarning,
                stacklevel=2,
            )

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, int | float] = {}
    rslora: set[bool] = set()
    dora: set[bool] = set()
    dropouts: list[float] = []
    for module_path, module in modules:
        if hasattr(module, "enable_lora"):
            raise ValueError(
                f"{module_path}: merged-projection LoRA layers (per-slice adapters) have no PEFT LoRA layout"
            )
        lora_a, lora_b = _lora_pair(module, adapter_name)
        key_a, key_b = key_names(module_path, embedding=not _is_lora_linear(module))
        lora_a, lora_b = lora_a.detach().to("cpu"), lora_b.detach().to("cpu")
        ranks[module_path] = int(module.r[adapter_name])
        alphas[module_path] = _number(module.lora_alpha[adapter_name])
        if initial is not None:  # s B A - s B0 A0 = s [B, -B0] [A; A0]: rank 2r, the same s
            a0, b0 = initial[module_path]
            lora_a = torch.cat([lora_a, a0.to(lora_a.dtype)], dim=0)
            lora_b = torch.cat([lora_b, -b0.to(lora_b.dtype)], dim=1)
            ranks[module_path] *= 2
            factor = 2.0**0.5 if module.use_rslora[adapter_name] else 2.0
            alphas[module_path] = _number(float(module.lora_alpha[adapter_name]) * factor)
        tensors[key_a] = lora_a.contiguous()
        tensors[key_b] = lora_b.contiguous()
        rslora.add(bool(module.use_rslora[adapter_name]))
        use_dora = bool(getattr(module, "use_dora", {}).get(adapter_name, False))
        dora.add(use_dora)
        if use_dora:
            magnitude = module.lora_magnitude_vector[adapter_name]
            tensors[KEY_PREFIX + module_path + "." + _MAGNITUDE] = magnitude.detach().to("cpu").contiguous()
        dropout = getattr(module, "lora_dropout", {})
        if adapter_name in dropout:
            dropouts.append(float(getattr(dropout[adapter_name], "p", 0.0)))
    if len(rslora) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} mixes use_rslora=True and False across layers; a PEFT config holds one"
        )
    saved_paths = _saved_module_tensors(model, adapter_name, tensors)
    tensors.update(_bias_tensors(model, modules, bias))
    if len(dora) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} mixes use_dora=True and False across layers; a PEFT config holds one"
        )
    if len(set(dropouts)) > 1:
        warnings.warn(
            f"adapter {adapter_name!r} uses different dropout rates per layer; saving the largest "
            f"({max(dropouts)}) as lora_dropout",
            stacklevel=2,
        )

    config = build_peft_config(
        ranks,
        alphas,
        use_rslora=rslora.pop(),
        use_dora=dora.pop(),
        dropout=max(dropouts, default=0.0),
        base=_stored_config(model, adapter_name),
        universe=_module_universe(model),
    )
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    if task_type is not None:
        config["task_type"] = task_type
    if initial is not None:
        config["init_lora_weights"] = True  # a plain LoRA adapter now (as PEFT writes the converted one)
    # PEFT sets fan_in_fan_out per layer (True for Conv1D, False for nn.Linear, with a warning otherwise);
    # the config records whether the adapter's layers are Conv1D-laid-out.
    config["fan_in_fan_out"] = any(getattr(m, "fan_in_fan_out", False) for _, m in modules)
    config["modules_to_save"] = saved_paths or None
    config["bias"] = bias
    write_adapter_dir(path, tensors, config)


_BIAS_MODES = ("none", "all", "lora_only")
_BASE_LAYER_RE = re.compile(r"\.base_layer(?=\.)")


def _bias_tensors(
    model: nn.Module, modules: list[tuple[str, nn.Module]], mode: str
) -> dict[str, torch.Tensor]:
    """The biases PEFT's ``get_peft_model_state_dict`` writes for ``bias=mode``, under PEFT's keys.

    ``"all"``: every state-dict entry whose key contains ``"bias"`` (PEFT 0.21's test), except the adapters'
    own tensors and the ``modules_to_save`` copies (saved as such; the wrapped originals' biases are written
    as ``<path>.original_module.<key>``, as PEFT does); a LoRA layer's
    ``bias`` is written as ``<path>.base_layer.bias``, the name it has in a PEFT model. ``"lora_only"``: the
    biases of ``modules`` (the layers holding the adapter).
    """
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    out: dict[str, torch.Tensor] = {}
    if mode == "lora_only":
        for module_path, module in modules:
            tensor = getattr(module, "bias", None)
            if isinstance(tensor, torch.Tensor):
                out[KEY_PREFIX + module_path + ".base_layer.bias"] = tensor.detach().to("cpu").contiguous()
        return out
    if mode != "all":
        return out
    lora_paths = {n for n, m in model.named_modules() if _is_lora_linear(m) or _is_lora_embedding(m)}
    wrapped = tuple(n + "." for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    originals = tuple(w + "original_module." for w in wrapped)
    for key, tensor in model.state_dict().items():
        if "bias" not in key or "lora_" in key:
            continue
        if wrapped and key.startswith(wrapped) and not key.startswith(originals):
            continue  # the copies are saved as modules_to_save; the originals' biases under PEFT's name
        owner, _, local = key.rpartition(".")
        name = f"{owner}.base_layer.{local}" if owner in lora_paths else key
        out[KEY_PREFIX + name] = tensor.detach().to("cpu").contiguous()
    return out


def _plan_bias(
    model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any], strict: bool, source: str
) -> dict[str, torch.Tensor]:
    """Take the biases of a ``bias: "all"`` / ``"lora_only"`` checkpoint out of ``tensors`` and check them.

    Returns model state-dict key -> tensor. A key ``base_model.model.<key>`` (PEFT's ``.base_layer.`` segment
    dropped) must name an entry of the model's state dict with the same shape, floating, finite.
    """
    if config.get("bias") not in ("all", "lora_only"):
        return {}
    state = model.state_dict(keep_vars=True)
    planned: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        stripped = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        if "bias" not in stripped or "lora_" in stripped:
            continue
        target = _BASE_LAYER_RE.sub("", stripped)
        tensor = tensors.pop(key)
        want = state.get(target)
        if want is None:
            message = f"{source}: key {key!r} names bias {target!r}, which the model does not have"
            if strict:
                raise AdapterCheckpointError(message + " (wrong base model? pass strict=False to skip it)")
            warnings.warn(message + "; skipped", stacklevel=3)
            continue
        if tuple(tensor.shape) != tuple(want.shape):
            raise AdapterCheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model's {target} is "
                f"{tuple(want.shape)} (wrong base model?)"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise AdapterCheckpointError(
                f"{source}: tensor {key!r} (bias {target!r}) must hold finite floating values, got "
                f"dtype {tensor.dtype}"
                + ("" if not tensor.is_floating_point() else " with NaN or infinite values")
            )
        planned[target] = tensor
    return planned


def _apply_bias(model: nn.Module, planned: dict[str, torch.Tensor]) -> list[Callable[[], object]]:
    """Copy the planned biases into the model (shared by all adapters, as in PEFT); returns undo steps."""
    undo: list[Callable[[], object]] = []
    if not planned:
        return undo
    state = model.state_dict(keep_vars=True)
    try:
        for target, tensor in planned.items():
            dest = state[target]
            old = dest.detach().clone()
            undo.append(lambda d=dest, o=old: d.data.copy_(o))
            with torch.no_grad():
                dest.copy_(tensor.to(dtype=dest.dtype, device=dest.device))
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return undo


def _initial_factors(
    source: Any, modules: list[tuple[str, nn.Module]], adapter_name: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module path -> (A0, B0)`` of the adapter as initialised, for ``save_adapter(convert_to_lora_from=)``.

    ``source`` is an adapter folder (PEFT keys) or a mapping with PEFT keys or ``lora_state_dict`` keys
    (``<path>.lora_A.<adapter_name>``). Every layer of the adapter must be there with factors of the same
    shapes, and nothing else.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = _check_path(source)
        if not os.path.isdir(folder):
            raise ValueError(
                f"convert_to_lora_from: {folder!r} is not a folder; pass the adapter folder saved right "
                "after "
                "the initialisation (or a mapping of its factors)"
            )
        tensors, label = _read_tensors(folder)
    elif isinstance(source, Mapping):
        tensors, label = dict(source), "convert_to_lora_from"
        bad = next(
            (k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None
        )
        if bad is not None:
            raise TypeError(f"convert_to_lora_from: entry {bad!r} is not a str key with a Tensor value")
    else:
        raise TypeError(
            "convert_to_lora_from must be an adapter folder (str / PathLike) or a mapping of the initial "
            f"factors, got {type(source).__name__}"
        )
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    for module_path, module in modules:
        embedding = not _is_lora_linear(module)
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        current = _lora_pair(module, adapter_name)
        pair = []
        for name, now in zip(names, current):
            candidates = [
                KEY_PREFIX + module_path + "." + name + ("" if embedding else ".weight"),
                module_path + "." + name + "." + adapter_name,
            ]
            key = next((k for k in candidates if k in tensors), None)
            if key is None:
                raise ValueError(
                    f"convert_to_lora_from ({label}): no initial factor for layer {module_path!r} (looked "
                    f"for {candidates[0]!r} and {candidates[1]!r}); it must be adapter {adapter_name!r} as "
                    "initialised"
                )
            t = tensors[key]
            if tuple(t.shape) != tuple(now.shape) or not t.is_floating_point():
                raise ValueError(
                    f"convert_to_lora_from ({label}): tensor {key!r} has shape {tuple(t.shape)} and dtype "
                    f"{t.dtype}; adapter {adapter_name!r} of {module_path!r} has {tuple(now.shape)} (not the "
                    "same adapter as initialised?)"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"convert_to_lora_from ({label}): tensor {key!r} holds NaN or infinite values"
                )
            used.add(key)
            pair.append(t.detach().to("cpu"))
        found[module_path] = (pair[0], pair[1])
    factor_key = re.compile(r"(^|\.)(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.|$)")
    extra = sorted(k for k in tensors if k not in used and factor_key.search(k))
    if isinstance(source, Mapping):  # a lora_state_dict holds every adapter: only this one's keys count
        extra = [k for k in extra if k.endswith("." + adapter_name) or k.startswith(KEY_PREFIX)]
    if extra:
        raise ValueError(
            f"convert_to_lora_from ({label}): {extra[0]!r} is a LoRA factor of a layer that adapter "
            f"{adapter_name!r} does not have (another adapter or model?)"
        )
    return found


def _saved_module_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Add adapter ``adapter_name``'s ``modules_to_save`` copies to ``tensors`` under PEFT's keys.

    PEFT (0.21) writes a copy's state dict under ``base_model.model.<module path>.<key>``, without the
    wrapper's ``modules_to_save.<adapter>.`` part, and puts it back there on load. Returns the module paths.
    """
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    paths = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.adapters:
            paths.append(name)
            for key, tensor in module.adapter_state(adapter_name).items():
                tensors[f"{KEY_PREFIX}{name}.{key}"] = tensor.to("cpu").contiguous()
    return paths


_CONFIG_METADATA = "lowrank.adapter_config"
_TEMP_PREFIXES = ("." + WEIGHTS_NAME + ".", "." + CONFIG_NAME + ".")


def _remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files an interrupted save into ``path`` left (one writer at a time)."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(path):
            if entry.startswith(_TEMP_PREFIXES) and entry.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, entry))


def write_adapter_dir(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``path`` as one unit.

    Both files are written in full to temporary files in ``path`` and synced, then renamed into place, the
    weights first. The weights file's metadata holds the exact config text it was saved with
    (``lowrank.adapter_config``), so a save interrupted between the two renames (new weights, old config)
    is detected by :func:`load_adapter` (the config file is older than the weights and differs from the
    stored config in a field that gives the weights their meaning), which then uses the stored config: a
    reader sees the old pair or the new pair, never a mix. Temporary files left by a killed save are
    removed by the next save into ``path``. ``metadata`` (str to str) is added to the weights file's
    metadata (the CLI records each layer's achieved error there). Raises ``ValueError`` if ``path`` is an
    existing regular file. Folders the save created are removed again when it fails (an existing folder
    and its files are kept).
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a file, not a directory; pass the adapter folder to write")
    with folder_for_write(path):  # folders this save creates are removed again if it fails
        _write_adapter_files(path, tensors, config, metadata)
    fsync_directory(path)


def _write_adapter_files(
    path: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str] | None
) -> None:
    """The two staged files of :func:`write_adapter_dir`, renamed into place (temporaries removed on
    error)."""
    _remove_stale_temporaries(path)
    text = json.dumps(dict(sorted(config.items())), indent=2) + "\n"
    staged: list[tuple[str, str]] = []
    try:
        for name, write in (
            (
                WEIGHTS_NAME,
                lambda f: write_safetensors_to(
                    f, _entries_from_dict(tensors), {**(metadata or {}), _CONFIG_METADATA: text}
                ),
            ),
            (CONFIG_NAME, lambda f: f.write(text.encode())),
        ):
            staged.append((write_temporary(os.path.join(path, name), write), os.path.join(path, name)))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------


def _read_consistent_config(path: str) -> dict[str, Any]:
    """The config of the checkpoint in ``path``.

    A lowrank-written weights file stores the config it was saved with. If ``adapter_config.json`` differs
    from it in a field that gives the weights their meaning and is *older* than the weights (a save
    interrupted between its two renames: new weights, old config), the stored config is used, with a
    warning. A config edited after the save (newer than the weights) is used as written.
    """
    config = read_config(path)
    weights = os.path.join(path, WEIGHTS_NAME)
    embedded_text = _embedded_config_text(weights)
    if embedded_text is None:
        return config
    label = weights + " (stored config)"
    embedded = config_from_text(embedded_text, label)
    if all(config.get(f) == embedded.get(f) for f in MEANINGFUL_FIELDS):
        return config
    if os.stat(os.path.join(path, CONFIG_NAME)).st_mtime_ns >= os.stat(weights).st_mtime_ns:
        return config  # edited after the save
    warnings.warn(
        f"{path}: {CONFIG_NAME} is older than {WEIGHTS_NAME} and not the config it was saved with (an "
        "interrupted save); using the config stored in the weights file. Save again to repair the folder.",
        UserWarning,
        stacklevel=3,
    )
    return embedded


def _embedded_config_text(weights: str) -> str | None:
    """The ``lowrank.adapter_config`` metadata of a safetensors file written by lowrank, else None."""
    if not os.path.isfile(weights):
        return None
    try:
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
        value = header.get("__metadata__", {}).get(_CONFIG_METADATA)
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable file is reported by _read_tensors
    return value if isinstance(value, str) else None


def _read_tensors(path: str) -> tuple[dict[str, torch.Tensor], str]:
    weights = os.path.join(path, WEIGHTS_NAME)
    legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors import SafetensorError, safe_open

        tensors: dict[str, torch.Tensor] = {}
        try:
            handle = safe_open(weights, framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterCheckpointError(
                f"{weights}: corrupt or truncated safetensors file ({exc})"
            ) from None
        with handle as f:
            for key in f.keys():
                try:
                    tensors[key] = f.get_tensor(key)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise AdapterCheckpointError(f"{weights}: cannot read tensor {key!r} ({exc})") from None
        return tensors, weights
    if os.path.isfile(legacy):
        warnings.warn(
            f"{legacy}: reading a pickle-based .bin adapter with torch.load(weights_only=True); "
            "re-save it with lowrank.save_adapter to get safetensors",
            UserWarning,
            stacklevel=3,
        )
        try:
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterCheckpointError(
                f"{legacy}: cannot be read safely ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise AdapterCheckpointError(f"{legacy}: expected a dict of tensors")
        return dict(loaded), legacy
    raise FileNotFoundError(f"path: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path!r}")


@dataclass
class _Planned:
    module_path: str
    embedding: bool
    key_a: str
    key_b: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    alpha: float
    base_weight: torch.Tensor | None = None  # PEFT saves embedding base weights when embeddings are targeted
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector (out,), when the config has use_dora


# PEFT's checkpoint key (and lowrank's ParameterDict name) of DoRA's magnitude vector.
_MAGNITUDE = "lora_magnitude_vector"


_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)$"
)
_BASE_KEY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")


def _dims(module: nn.Module) -> tuple[bool, int, int] | None:
    """(is_embedding, rows of A's input side, rows of B's output side) for an adaptable module, else None."""
    if _is_lora_linear(module) or isinstance(module, nn.Linear):
        return False, int(module.in_features), int(module.out_features)
    if is_conv1d(module):  # transformers Conv1D: weight (in, out); the adapters keep nn.Linear's layout
        fan_in, fan_out = module.weight.shape
        return False, int(fan_in), int(fan_out)
    if _is_lora_embedding(module) or isinstance(module, nn.Embedding):
        num, dim = module.weight.shape
        return True, int(num), int(dim)
    return None


def _plan(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    adapter_name: str,
    inject: bool,
    strict: bool,
    source: str,
) -> list[_Planned]:
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    base_weights: dict[str, tuple[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        stripped = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else None
        match = _KEY_RE.match(stripped) if stripped else None
        base_match = _BASE_KEY_RE.match(stripped) if stripped else None
        if match:
            grouped.setdefault(match["module"], {})[match["kind"]] = (key, tensor)
        elif base_match:
            base_weights[base_match["module"]] = (key, tensor)
        else:
            unexpected.append(key)
    if unexpected:
        message = f"{source}: unexpected key {unexpected[0]!r}" + (
            f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        )
        if strict:
            raise AdapterCheckpointError(
                message + "; not a LoRA tensor lowrank can load (pass strict=False to skip)"
            )
        warnings.warn(message + "; skipped", stacklevel=3)
    if not grouped:
        raise AdapterCheckpointError(f"{source}: no LoRA tensors found")

    default_r = config.get("r", 8)
    default_alpha = config.get("lora_alpha", 8)
    use_dora = bool(config.get("use_dora", False))
    modules = dict(model.named_modules())
    plans: list[_Planned] = []
    for module_path in sorted(grouped):
        kinds = grouped[module_path]
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        key_a, key_b = (KEY_PREFIX + module_path + "." + n for n in names)
        for kind in kinds:
            if kind not in names and kind != _MAGNITUDE:
                raise AdapterCheckpointError(
                    f"{source}: key {KEY_PREFIX + module_path + '.' + kind!r} mixes "
                    "linear and embedding LoRA names for one module"
                )
        for key, kind in ((key_a, names[0]), (key_b, names[1])):
            if kind not in kinds:
                raise AdapterCheckpointError(f"{source}: missing key {key!r}")
        key_m = KEY_PREFIX + module_path + "." + _MAGNITUDE
        if use_dora and embedding:
            raise AdapterCheckpointError(
                f"{source}: key {key_a!r}: DoRA (use_dora=true) on embedding {module_path!r} is not "
                "supported by lowrank (DoRA is available on linear layers only)"
            )
        if use_dora and _MAGNITUDE not in kinds:
            raise AdapterCheckpointError(f"{source}: missing key {key_m!r} (the config has use_dora=true)")
        if not use_dora and _MAGNITUDE in kinds:
            raise AdapterCheckpointError(
                f"{source}: key {key_m!r} is a DoRA magnitude but the config has use_dora=false"
            )
        (_, lora_a), (_, lora_b) = kinds[names[0]], kinds[names[1]]
        module = modules.get(module_path)
        if module is None:
            raise AdapterCheckpointError(
                f"{source}: key {key_a!r} names module {module_path!r}, which the model does not have "
                "(wrong base model?)"
            )
        if hasattr(module, "enable_lora"):
            raise AdapterCheckpointError(
                f"{source}: key {key_a!r} names {module_path!r}, a merged-projection LoRA layer, which has "
                "no PEFT LoRA layout"
            )
        dims = _dims(module)
        if dims is None or dims[0] != embedding:
            expected = "an embedding" if embedding else "a linear layer"
            raise AdapterCheckpointError(
                f"{source}: key {key_a!r} expects {expected} at {module_path!r}, the model has "
                f"{type(module).__name__} (wrong base model?)"
            )
        _, fan_in, fan_out = dims
        for key, t in ((key_a, lora_a), (key_b, lora_b)):
            if not t.is_floating_point():
                raise AdapterCheckpointError(
                    f"{source}: tensor {key!r} has dtype {t.dtype}, expected floating point"
                )
            if t.dim() != 2:
                raise AdapterCheckpointError(
                    f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected 2-D"
                )
        magnitude = kinds[_MAGNITUDE][1] if use_dora else None
        if magnitude is not None and (
            not magnitude.is_floating_point()
            or tuple(magnitude.shape) != (fan_out,)
            or not bool(torch.isfinite(magnitude).all())
        ):
            raise AdapterCheckpointError(
                f"{source}: tensor {key_m!r} has dtype {magnitude.dtype} and shape {tuple(magnitude.shape)}; "
                f"the model needs finite floating values of shape ({fan_out},) for {module_path!r}"
            )
        rank = int(lora_a.shape[0])
        if tuple(lora_a.shape) != (rank, fan_in) or tuple(lora_b.shape) != (fan_out, rank) or rank == 0:
            bad_key, bad, want = (
                (key_a, lora_a, (rank, fan_in))
                if lora_a.shape[1] != fan_in or rank == 0
                else (key_b, lora_b, (fan_out, rank))
            )
            raise AdapterCheckpointError(
                f"{source}: tensor {bad_key!r} has shape {tuple(bad.shape)}, the model needs {want} "
                f"for {module_path!r} (wrong base model?)"
            )
        expected_rank = pattern_value(config.get("rank_pattern"), module_path, default_r)
        if rank != expected_rank:
            raise AdapterCheckpointError(
                f"{source}: tensor {key_a!r} has rank {rank}, the config says r={expected_rank} "
                f"for {module_path!r}"
            )
        for key, t in ((key_a, lora_a), (key_b, lora_b)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterCheckpointError(
                    f"{source}: tensor {key!r} holds NaN or infinite values (corrupt file?)"
                )
        alpha = float(pattern_value(config.get("alpha_pattern"), module_path, default_alpha))
        use_rslora = bool(config.get("use_rslora", False))
        existing = _lora_pair(module, adapter_name)
        if existing is not None:
            if inject:
                raise AdapterCheckpointError(
                    f"adapter_name: module {module_path!r} already holds an adapter named {adapter_name!r}; "
                    "pass inject=False to overwrite its weights or choose another adapter_name"
                )
            if existing[0].shape != lora_a.shape:
                raise AdapterCheckpointError(
                    f"{source}: tensor {key_a!r} has rank {rank}, adapter {adapter_name!r} of "
                    f"{module_path!r} has rank {existing[0].shape[0]}"
                )
            if adapter_name in getattr(module, "merged_adapters", ()):
                raise AdapterCheckpointError(
                    f"adapter {adapter_name!r} is merged into {module_path!r}; unmerge it before loading"
                )
            if bool(getattr(module, "use_dora", {}).get(adapter_name, False)) != use_dora:
                raise AdapterCheckpointError(
                    f"{source}: the config has use_dora={str(use_dora).lower()} but adapter "
                    f"{adapter_name!r} of {module_path!r} was made with use_dora={not use_dora}"
                )
            # only the factors are overwritten: a scaling of the adapter other than the file's would turn
            # them into another update, s' B A instead of s B A, without a word
            held_alpha = float(module.lora_alpha[adapter_name])
            held_rslora = bool(module.use_rslora[adapter_name])
            if held_rslora != use_rslora or not math.isclose(held_alpha, alpha, rel_tol=1e-9):
                raise AdapterCheckpointError(
                    f"{source}: {module_path!r} has lora_alpha={_number(alpha)}, use_rslora="
                    f"{str(use_rslora).lower()} in the config, but adapter {adapter_name!r} was made with "
                    f"alpha={_number(held_alpha)}, use_rslora={held_rslora}: overwriting only its factors "
                    "would change the update's scaling; load it under a new adapter_name (inject=True)"
                )
        elif use_dora and not getattr(
            module, "_supports_dora", isinstance(module, nn.Linear) or is_conv1d(module)
        ):
            raise AdapterCheckpointError(
                f"{source}: key {key_m!r}: module {module_path!r} ({type(module).__name__}) cannot take a "
                "DoRA adapter (use_dora=true)"
            )
        elif not inject:
            raise AdapterCheckpointError(
                f"{source}: module {module_path!r} has no adapter named {adapter_name!r} "
                "(pass inject=True to add it)"
            )
        base_weight = None
        if module_path in base_weights:
            bkey, bw = base_weights.pop(module_path)
            if tuple(bw.shape) != tuple(module.weight.shape) or not bw.is_floating_point():
                raise AdapterCheckpointError(
                    f"{source}: tensor {bkey!r} has shape {tuple(bw.shape)}, the model's weight is "
                    f"{tuple(module.weight.shape)} (wrong base model?)"
                )
            base_weight = bw
        plans.append(
            _Planned(
                module_path, embedding, key_a, key_b, lora_a, lora_b, rank, alpha, base_weight, magnitude
            )
        )
    if base_weights:
        key = next(iter(base_weights.values()))[0]
        if strict:
            raise AdapterCheckpointError(
                f"{source}: unexpected key {key!r} (a base weight of an unadapted module)"
            )
    if config.get("target_modules"):
        unselected = [p.module_path for p in plans if not matches_targets(config, p.module_path)]
        if unselected:
            message = (
                f"{source}: key {KEY_PREFIX + unselected[0]!r}: the config's target_modules / "
                f"exclude_modules / layers_to_transform do not select module {unselected[0]!r}, so PEFT "
                "would not adapt it"
            )
            if strict:
                raise AdapterCheckpointError(message + " (pass strict=False to load it anyway)")
            warnings.warn(message + "; loaded anyway (strict=False)", stacklevel=3)
    if strict and config.get("target_modules"):
        planned = {p.module_path for p in plans}
        for name, module in model.named_modules():
            if name in planned or _dims(module) is None or not matches_targets(config, name):
                continue
            if isinstance(module, nn.Embedding) or _is_lora_embedding(module):
                key = KEY_PREFIX + name + ".lora_embedding_A"
            else:
                key = KEY_PREFIX + name + ".lora_A.weight"
            raise AdapterCheckpointError(
                f"{source}: missing key {key!r}: target_modules matches model module {name!r} but the "
                "file has no weights for it (wrong base model?)"
            )
    return plans


def _base_rewrite(
    model: nn.Module,
    plans: list[_Planned],
    config: dict[str, Any],
    adapter_name: str,
    strict: bool,
    source: str,
) -> str | None:
    """What PEFT does to the base weights when it loads this config: ``"pissa"`` / ``"olora"`` (re-run that
    initialisation on each newly adapted linear layer, whose weight becomes the residual), or None.

    PEFT (0.21) builds the layers with the config's ``init_lora_weights`` before it loads the factors, so a
    PiSSA / OLoRA adapter saved without conversion is meant for the ORIGINAL base: the init rewrites it to
    the residual again. ``"pissa_niter_K"`` (randomized in PEFT, not reproducible even there) is re-derived
    with the exact SVD, with a :class:`ResidualBaseWarning`. ``"corda"`` (needs the calibration data) and
    ``"loftq"`` (needs LoftQ's quantized base) cannot be reproduced: refused, or with ``strict=False`` loaded
    as they are (right on the residual base weights they were trained with) with a warning.
    """
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):
        return None
    name = init.lower()
    if name.startswith(("corda", "loftq")):
        message = (
            f"{source}: init_lora_weights={init!r}: the factors are relative to base weights that "
            + ("CorDA derived from calibration data" if name.startswith("corda") else "LoftQ quantized")
            + ", which "
            "loading cannot reproduce; convert the adapter to a plain LoRA (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...); lowrank: save_adapter(..., "
            "convert_to_lora_from=...))"
        )
        if strict:
            raise AdapterCheckpointError(message + ", or pass strict=False to load it onto its residual base")
        warnings.warn(
            message + "; loaded as is (right only on its residual base)", ResidualBaseWarning, stacklevel=3
        )
        return None
    if name == "olora":
        kind = "olora"
    elif name == "pissa" or name.startswith("pissa_niter_"):
        kind = "pissa"
    else:
        return None
    rewritten = []
    for plan in plans:
        module = model.get_submodule(plan.module_path)
        if plan.embedding or _lora_pair(module, adapter_name) is not None:
            continue  # PEFT's embeddings take no PiSSA/OLoRA; an existing adapter is only overwritten
        if kind == "olora" and (is_conv1d(module) or getattr(module, "fan_in_fan_out", False)):
            raise AdapterCheckpointError(
                f"{source}: key {plan.key_a!r}: init_lora_weights='olora' on the Conv1D "
                f"{plan.module_path!r}: PEFT's OLoRA factors the (in, out) storage untransposed, which does "
                "not fit its own (out, r) lora_B; convert the adapter to a plain LoRA adapter before "
                "loading it"
            )
        from lowrank.lora.quantized import QuantizedLoRALinear

        if isinstance(module, QuantizedLoRALinear):
            raise AdapterCheckpointError(
                f"{source}: key {plan.key_a!r}: init_lora_weights={init!r} makes the loader rewrite the base "
                f"weight of {plan.module_path!r} (as PEFT does), which is quantized here; load the adapter "
                "before lowrank.quantize_base"
            )
        rewritten.append(plan.module_path)
    if rewritten and name.startswith("pissa_niter_"):
        warnings.warn(
            f"{source}: init_lora_weights={init!r} is randomized in PEFT: the residual base weights the "
            "adapter was trained on cannot be reproduced exactly (PEFT's own reload draws new ones); "
            "re-derived with the exact SVD, so outputs differ from the fine-tuned model by about the "
            "randomized SVD's error. Convert such adapters to plain LoRA when saving "
            "(path_initial_model_for_weight_conversion)",
            ResidualBaseWarning,
            stacklevel=3,
        )
    return kind if rewritten else None


def _parent_and_child(model: nn.Module, module_path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = module_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def _wrap(
    module: nn.Module, plan: _Planned, adapter_name: str, dropout: float, use_rslora: bool
) -> nn.Module:
    """A LoRA layer around a plain ``nn.Linear`` / ``nn.Embedding`` with one adapter, ``adapter_name``."""
    from lowrank.lora.layers import LoRAConv1D, LoRAEmbedding, LoRALinear

    kwargs: dict[str, Any] = {
        "alpha": plan.alpha,
        "dropout": dropout,
        "use_rslora": use_rslora,
        "init": "zeros",
    }
    if plan.magnitude is not None:
        kwargs["use_dora"] = True
    if plan.embedding:
        layer = LoRAEmbedding.from_embedding(module, plan.rank, **kwargs)
    elif is_conv1d(module):
        layer = LoRAConv1D.from_conv1d(module, plan.rank, **kwargs)
    else:
        layer = LoRALinear.from_linear(module, plan.rank, **kwargs)
    if adapter_name != "default":  # the constructors name their first adapter "default"
        layer.add_adapter(adapter_name, plan.rank, **kwargs)
        layer.delete_adapter("default")
    return layer


def _apply(
    model: nn.Module,
    plans: list[_Planned],
    config: dict[str, Any],
    adapter_name: str,
    rewrite: str | None = None,
) -> None:
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_rslora = bool(config.get("use_rslora", False))
    undo: list[Callable[[], None]] = []
    if rewrite is not None:  # PEFT's load-time PiSSA/OLoRA rewrites the base weights
        rewritten = [plan.module_path for plan in plans if not plan.embedding]
        check_weights_unshared(model, rewritten, f"load_adapter (init_lora_weights={rewrite!r})")
    try:
        for plan in plans:
            module = model.get_submodule(plan.module_path)
            if _lora_pair(module, adapter_name) is None:
                if _is_lora_linear(module) or _is_lora_embedding(module):
                    extra = {"use_dora": True} if plan.magnitude is not None else {}
                    module.add_adapter(
                        adapter_name,
                        plan.rank,
                        alpha=plan.alpha,
                        dropout=dropout,
                        use_rslora=use_rslora,
                        **extra,
                    )
                    undo.append(lambda m=module: m.delete_adapter(adapter_name))
                else:
                    parent, child = _parent_and_child(model, plan.module_path)
                    requires_grad = [(p, p.requires_grad) for p in module.parameters(recurse=False)]
                    undo.append(lambda rg=requires_grad: [p.requires_grad_(g) for p, g in rg])
                    layer = _wrap(module, plan, adapter_name, dropout, use_rslora)
                    setattr(parent, child, layer)
                    undo.append(lambda p=parent, c=child, m=module: setattr(p, c, m))
                    module = layer
                if rewrite is not None and not plan.embedding:
                    _rewrite_base(module, plan, adapter_name, rewrite, use_rslora, undo)
            lora_a, lora_b = _lora_pair(module, adapter_name)
            old = (lora_a.detach().clone(), lora_b.detach().clone())
            undo.append(lambda a=lora_a, b=lora_b, o=old: (a.data.copy_(o[0]), b.data.copy_(o[1])))
            with torch.no_grad():
                lora_a.copy_(plan.lora_a.to(dtype=lora_a.dtype, device=lora_a.device))
                lora_b.copy_(plan.lora_b.to(dtype=lora_b.dtype, device=lora_b.device))
            if plan.magnitude is not None:
                magnitude = module.lora_magnitude_vector[adapter_name]
                old_m = magnitude.detach().clone()
                undo.append(lambda p=magnitude, o=old_m: p.data.copy_(o))
                with torch.no_grad():
                    magnitude.copy_(plan.magnitude.to(dtype=magnitude.dtype, device=magnitude.device))
            if plan.base_weight is not None:
                weight = module.weight
                old_weight = weight.detach().clone()
                undo.append(lambda w=weight, o=old_weight: w.data.copy_(o))
                with torch.no_grad():
                    weight.copy_(plan.base_weight.to(dtype=weight.dtype, device=weight.device))
    except BaseException:
        for step in reversed(undo):
            step()
        raise


def _rewrite_base(
    module: nn.Module, plan: _Planned, adapter_name: str, kind: str, use_rslora: bool, undo: list
) -> None:
    """PEFT's load-time PiSSA / OLoRA: the base weight becomes ``W - scale B0 A0`` (:func:`_base_rewrite`).

    PiSSA by the exact SVD (PEFT: ``torch.linalg.svd``), OLoRA by the QR of the (out, in) weight, both on
    the ``nn.Linear``-layout view (a ``Conv1D``'s residual goes back into its (in, out) storage).
    """
    from lowrank.lora.init import olora_factors, pissa_factors

    scale = plan.alpha / (plan.rank**0.5 if use_rslora else plan.rank)
    view = module._linear_weight()
    weight = module.weight
    old = weight.detach().clone()
    undo.append(lambda w=weight, o=old: w.data.copy_(o))
    with torch.no_grad():
        if kind == "pissa":
            _, _, residual = pissa_factors(view, plan.rank, scale, method="svd")
        else:
            _, _, residual = olora_factors(view, plan.rank, scale)
        view.copy_(residual)
    module.clear_dora_cache()
    inits = module.__dict__.setdefault("weight_init", {})
    inits[adapter_name] = kind
    undo.append(lambda d=inits: d.pop(adapter_name, None))


@dataclass
class _SavedPlan:
    module_path: str
    tensors: dict[str, torch.Tensor]  # keys local to the module (its state-dict keys)
    # PEFT's bias="all" also writes the wrapped original's biases (<path>.original_module.<key>)
    original: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _saved_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Module path -> module for PEFT's ``modules_to_save`` rule (the qualified name ends with an entry),
    outermost matches only, not inside LoRA layers; a wrapper already in the model counts as its module."""
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    found: dict[str, nn.Module] = {}
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (skip and name.startswith(skip)):
            continue
        if isinstance(module, ModulesToSaveWrapper) or any(name.endswith(n) for n in names):
            if not (_is_lora_linear(module) or _is_lora_embedding(module)):
                found[name] = module
            skip = (*skip, name + ".")
        elif _is_lora_linear(module) or _is_lora_embedding(module):
            skip = (*skip, name + ".")
    return found


def _plan_saved(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    adapter_name: str,
    inject: bool,
    strict: bool,
    source: str,
) -> list[_SavedPlan]:
    """Take the ``modules_to_save`` tensors out of ``tensors`` and check them against the model.

    A key ``base_model.model.<path>.<key>`` (PEFT 0.21) or ``base_model.model.<path>.modules_to_save.<any
    adapter>.<key>`` (older PEFT) belongs to module ``<path>`` when the config's ``modules_to_save`` names
    it; ``<key>`` must be one of the module's state-dict keys, with the same shape. Every module the config
    names gets a copy (PEFT copies the original for a module the file has no tensors for).
    """
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    names = config.get("modules_to_save") or []
    if not names:
        return []
    modules = _saved_modules(model, names)
    plans = {
        path: _SavedPlan(path, {}) for path, m in modules.items() if any(path.endswith(n) for n in names)
    }
    biases = config.get("bias") in ("all", "lora_only")
    for key in list(tensors):
        stripped = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else ""
        path = next((p for p in plans if stripped.startswith(p + ".")), None)
        if path is None:
            continue
        local = stripped[len(path) + 1 :]
        module = modules[path]
        expected = (
            module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        ).state_dict()
        if biases and local.startswith("original_module.") and local[len("original_module.") :] in expected:
            # bias="all": PEFT trains (and writes) the wrapped original's biases too
            plans[path].original[local[len("original_module.") :]] = tensors.pop(key)
            continue
        # the copy's keys: PEFT 0.21 writes <key>; older PEFT modules_to_save.<adapter>.<key>; bias="all"
        # adds its bias once more as modules_to_save.<key> (the adapter name dropped)
        candidates = [
            local,
            re.sub(r"^modules_to_save\.[^.]+\.", "", local),
            re.sub(r"^modules_to_save\.", "", local),
        ]
        local = next((c for c in candidates if c in expected), candidates[1])
        plans[path].tensors[local] = tensors.pop(key)
    for path, plan in plans.items():
        module = modules[path]
        if isinstance(module, ModulesToSaveWrapper):
            if adapter_name in module.adapters and inject:
                raise AdapterCheckpointError(
                    f"adapter_name: module {path!r} already holds a modules_to_save copy named "
                    f"{adapter_name!r}; pass inject=False to overwrite it or choose another adapter_name"
                )
            module = module.original_module
        elif not inject:
            raise AdapterCheckpointError(
                f"{source}: module {path!r} has no modules_to_save copy named {adapter_name!r} "
                "(pass inject=True to add it)"
            )
        expected = module.state_dict()
        for local, tensor in plan.tensors.items():
            key = f"{KEY_PREFIX}{path}.{local}"
            if local not in expected:
                raise AdapterCheckpointError(
                    f"{source}: unexpected key {key!r}: module {path!r} (modules_to_save) has no "
                    f"{local!r} (its keys: {sorted(expected)})"
                )
            want = expected[local]
            if tuple(tensor.shape) != tuple(want.shape):
                raise AdapterCheckpointError(
                    f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model's "
                    f"{path}.{local} is {tuple(want.shape)} (wrong base model?)"
                )
            if tensor.is_floating_point() != want.is_floating_point() or (
                tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
            ):
                raise AdapterCheckpointError(
                    f"{source}: tensor {key!r} has dtype {tensor.dtype} or non-finite values; the model's "
                    f"{path}.{local} is {want.dtype}"
                )
        for local, tensor in plan.original.items():
            key = f"{KEY_PREFIX}{path}.original_module.{local}"
            want = expected[local]
            if (
                tuple(tensor.shape) != tuple(want.shape)
                or not tensor.is_floating_point()
                or not bool(torch.isfinite(tensor).all())
            ):
                raise AdapterCheckpointError(
                    f"{source}: tensor {key!r} has dtype {tensor.dtype}, shape {tuple(tensor.shape)} or "
                    f"non-finite values; the model's {path}.{local} is {want.dtype} {tuple(want.shape)}"
                )
        missing = sorted(set(expected) - set(plan.tensors))
        if plan.tensors and missing:
            message = f"{source}: missing key {KEY_PREFIX}{path}.{missing[0]!r} of modules_to_save {path!r}"
            if strict:
                raise AdapterCheckpointError(message + " (pass strict=False to keep the original's values)")
            warnings.warn(message + "; the copy keeps the original's values", stacklevel=3)
    return list(plans.values())


def _apply_saved(model: nn.Module, plans: list[_SavedPlan], adapter_name: str) -> list[Callable[[], object]]:
    """Wrap (or add a copy to) each planned module and load its tensors; returns the undo steps."""
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    undo: list[Callable[[], object]] = []
    try:
        for plan in plans:
            module = model.get_submodule(plan.module_path)
            if isinstance(module, ModulesToSaveWrapper):
                if adapter_name not in module.adapters:
                    module.add_adapter(adapter_name)
                    undo.append(lambda m=module: m.delete_adapter(adapter_name))
                wrapper = module
            else:
                parent, child = _parent_and_child(model, plan.module_path)
                grads = [(p, p.requires_grad) for p in module.parameters()]
                undo.append(lambda g=grads: [p.requires_grad_(f) for p, f in g])
                wrapper = ModulesToSaveWrapper(module, adapter_name)
                setattr(parent, child, wrapper)
                undo.append(lambda p=parent, c=child, m=module: setattr(p, c, m))
            held = wrapper.modules_to_save[adapter_name]
            old = {k: v.detach().clone() for k, v in held.state_dict().items()}
            undo.append(lambda c=held, o=old: c.load_state_dict(o))
            held.load_state_dict(plan.tensors, strict=False)
            if plan.original:
                original = wrapper.original_module
                old_original = {k: v.detach().clone() for k, v in original.state_dict().items()}
                undo.append(lambda c=original, o=old_original: c.load_state_dict(o))
                original.load_state_dict(plan.original, strict=False)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return undo


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    inject: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Load a PEFT-layout LoRA checkpoint (written by lowrank or by PEFT's ``save_pretrained``) into a model.

    Parameters
    ----------
    model : nn.Module
        The base model, or a model that already holds LoRA layers. Module paths in the checkpoint
        (``base_model.model.<path>``) are resolved relative to it.
    path : str or PathLike
        Checkpoint directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (a legacy
        ``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` and a warning).
    adapter_name : str, default "default"
        Name under which the adapter is loaded.
    inject : bool, default True
        Replace plain ``nn.Linear`` / ``nn.Embedding`` modules named in the file by LoRA layers, or add the
        adapter to layers that are already LoRA layers. With ``inject=False`` the adapter must already exist
        on every module the file names, with the same rank, and only its weights are overwritten.
    strict : bool, default True
        Refuse keys lowrank cannot place and modules that the config's ``target_modules`` matches in the model
        but the file lacks. With ``strict=False`` such keys are skipped with a warning.

    Returns
    -------
    nn.Module
        ``model``, modified in place.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``path`` is not a str / PathLike.
    FileNotFoundError
        If the directory, its config or its weights are missing.
    ValueError
        ``adapter_name`` empty, with a ``"."`` or ``"__base__"`` (reserved for mixed-adapter batches).
        (:class:`AdapterCheckpointError`) naming the key or config field: ``path`` is a regular file, a config
        field without PEFT's type (e.g. ``use_rslora: "no"``, a pattern that is not a valid regular
        expression), a module the file adapts that the config's ``target_modules`` does not select (or the
        reverse), a wrong base model (missing module, shape mismatch), ``init_lora_weights`` ``"corda"`` /
        ``"loftq"`` with ``strict`` (see the notes),
        a rank that disagrees with the config, (``inject=False``) an existing adapter with another rank,
        ``lora_alpha``, ``use_rslora`` or ``use_dora`` than the file's (its scaling would silently differ),
        a missing ``lora_A``/``lora_B`` partner, a truncated or corrupt file, non-finite values. Every tensor
        is checked before the model is touched, so on error the model is
        unchanged.

    Notes
    -----
    Ranks come from the tensor shapes and are checked against ``r`` / ``rank_pattern``; alphas come from
    ``lora_alpha`` / ``alpha_pattern``. Every pattern field is read with PEFT's rules (PEFT 0.21:
    ``get_pattern_key`` for the patterns, ``check_target_module_exists`` for ``target_modules``,
    ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``/``layers_pattern``), so lowrank adapts
    the modules PEFT would. A folder whose config is not the one its weights were saved with (a save
    interrupted between its two renames) is read with the weights' own config, with a warning. The whole
    config, including fields lowrank does not use, is kept on the model and written back by
    :func:`save_adapter`. An adapter added to layers that already hold other adapters is not activated (as in
    PEFT); use :func:`lowrank.set_adapter`.

    GPT-2's ``Conv1D`` modules become :class:`~lowrank.lora.layers.LoRAConv1D` whatever ``fan_in_fan_out``
    says (PEFT, too, decides the layout by module type, warning when the flag disagrees). The modules the
    config's ``modules_to_save`` names (PEFT's rule: the module path ends with the entry) are wrapped in a
    :class:`~lowrank.lora.modules_to_save.ModulesToSaveWrapper` whose copy for ``adapter_name`` gets the
    file's ``base_model.model.<path>.<key>`` tensors (the older ``<path>.modules_to_save.<name>.<key>``
    form is read too); each key must be one of the module's state-dict keys with the same shape, and with
    ``strict`` every one must be present.

    A config with ``bias`` ``"all"`` or ``"lora_only"`` (PEFT trained the base biases) carries those biases
    (``base_model.model.<path>.base_layer.bias`` for an adapted layer, ``base_model.model.<key>`` for any
    other entry): they are copied into the model's own biases, which all adapters share (as in PEFT, they
    stay when the adapter is switched off or deleted); each must name an entry of the model's state dict
    with the same shape (with ``strict=False`` an unknown one is skipped with a warning).

    A config with ``init_lora_weights`` ``"pissa"`` or ``"olora"`` (an adapter PEFT saved without
    ``path_initial_model_for_weight_conversion``) is loaded as PEFT loads it: PEFT builds each new layer
    with that initialisation before it loads the factors, so the base weight becomes the residual ``W - s B0
    A0`` again (exact SVD / QR of the (out, in) weight, here as there) and the adapter reproduces the
    fine-tuned model on the *original* base (checked against PEFT to 1e-5); the layer then records it in
    ``weight_init``. ``"pissa_niter_K"`` is re-derived with the exact SVD and a
    :class:`ResidualBaseWarning` (PEFT's randomized init cannot be reproduced, not even by PEFT).
    ``"corda"`` and ``"loftq"`` adapters need base weights that loading cannot rebuild (calibration data,
    LoftQ's quantization): refused, or with ``strict=False`` loaded as they are, with a warning (right on
    the residual base they were trained with). An adapter that already exists (``inject=False``) only gets
    the file's tensors, as in PEFT; unlike PEFT (which then keeps its own scaling), its ``lora_alpha`` and
    ``use_rslora`` must equal the file's, so that the loaded update is the saved one.
    """
    return prepare_load(model, path, adapter_name=adapter_name, inject=inject, strict=strict)()


def prepare_load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    inject: bool = True,
    strict: bool = True,
) -> Callable[[], nn.Module]:
    """Every check and read of :func:`load_adapter`, without touching ``model``; returns the step that
    changes it (and returns ``model``). Raises what :func:`load_adapter` raises for a bad folder or a
    mismatch. :func:`lowrank.distributed.load_adapter` prepares on every rank and applies only when every
    rank could prepare, so that a failure on one rank leaves all models as they were."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r}")
    check_not_reserved("adapter_name", adapter_name)
    path = _check_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: adapter directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise AdapterCheckpointError(
            f"path: {path!r} is a file, not an adapter folder; pass the folder that holds {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}"
        )
    config = _read_consistent_config(path)
    tensors, source = _read_tensors(path)
    saved = _plan_saved(model, tensors, config, adapter_name, inject, strict, source)
    biases = _plan_bias(model, tensors, config, strict, source)
    plans = _plan(model, tensors, config, adapter_name, inject, strict, source)
    rewrite = _base_rewrite(model, plans, config, adapter_name, strict, source)

    def apply() -> nn.Module:
        running = active_adapter_names(model)
        undo_saved = _apply_saved(model, saved, adapter_name)
        try:
            _apply(model, plans, config, adapter_name, rewrite)
            _apply_bias(model, biases)
            keep_running_adapter(model, adapter_name, running)
        except BaseException:
            for step in reversed(undo_saved):
                step()
            raise
        _remember_config(model, adapter_name, config)
        return model

    return apply


# ----------------------------------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSize:
    """Parameter and byte counts of a model's LoRA adapters against its base (non-adapter) parameters."""

    adapter_params: int
    adapter_bytes: int
    base_params: int
    base_bytes: int

    @property
    def ratio(self) -> float:
        """Adapter bytes over base bytes."""
        return self.adapter_bytes / self.base_bytes if self.base_bytes else float("inf")

    def __str__(self) -> str:
        return (
            f"adapter {self.adapter_params:,} params ({_human_bytes(self.adapter_bytes)}) vs base "
            f"{self.base_params:,} params ({_human_bytes(self.base_bytes)}): {100 * self.ratio:.3g}%"
        )


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


_ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", _MAGNITUDE)


def adapter_size(model: nn.Module, adapter_name: str | None = None) -> AdapterSize:
    """Storage of a model's LoRA adapters compared with its base model.

    Parameters
    ----------
    model : nn.Module
        A model holding LoRA layers.
    adapter_name : str, optional
        Count only this adapter; by default all adapters count.

    Returns
    -------
    AdapterSize
        ``adapter_params``/``adapter_bytes`` (the ``lora_A``/``lora_B`` factors, DoRA magnitudes and the
        ``modules_to_save`` copies, what
        :func:`save_adapter` writes) and ``base_params``/``base_bytes`` (every other parameter, shared ones
        counted once), with ``ratio`` = adapter bytes / base bytes. A rank-``r`` adapter of an ``m x n``
        layer stores ``r (m + n)`` numbers instead of ``m n`` (DoRA: ``m`` more).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from lowrank.lora.modules_to_save import ModulesToSaveWrapper

    adapter_ids: set[int] = set()
    all_copy_ids: set[int] = set()
    found = False
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):  # modules_to_save copies are saved with the adapter
            for key, p in module.adapter_parameters():
                all_copy_ids.add(id(p))
                if adapter_name is None or key.split(".")[1] == adapter_name:
                    adapter_ids.add(id(p))
                    found = True
        for attr in _ADAPTER_ATTRS:
            params = getattr(module, attr, None)
            if isinstance(params, nn.ParameterDict):
                for name, p in params.items():
                    if adapter_name is None or name == adapter_name:
                        adapter_ids.add(id(p))
                        found = True
    if adapter_name is not None and not found:
        raise ValueError(f"adapter_name: no LoRA layer holds an adapter named {adapter_name!r}")
    adapter_params = adapter_bytes = base_params = base_bytes = 0
    all_adapter_ids = {
        id(p)
        for m in model.modules()
        for attr in _ADAPTER_ATTRS
        if isinstance(getattr(m, attr, None), nn.ParameterDict)
        for p in getattr(m, attr).values()
    } | all_copy_ids
    for p in model.parameters():  # parameters() yields shared parameters once
        if id(p) in adapter_ids:
            adapter_params += p.numel()
            adapter_bytes += p.numel() * p.element_size()
        elif id(p) not in all_adapter_ids:
            base_params += p.numel()
            base_bytes += p.numel() * p.element_size()
    return AdapterSize(adapter_params, adapter_bytes, base_params, base_bytes)
