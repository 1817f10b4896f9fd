"""Model-level LoRA: inject adapters into any ``nn.Module`` (plain or Hugging Face transformers), freeze the
rest, collect the adapter state, merge / unmerge, and take the adapters out again."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lowrank._linop import python_number
from lowrank.lora.init import WEIGHT_INITS, all_finite, check_init, pissa_budget, pissa_triplets
from lowrank.lora.layers import (
    BASE_ADAPTER,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRAMergedLinear,
    is_conv1d,
)
from lowrank.lora.modules_to_save import ModulesToSaveWrapper

__all__ = [
    "inject_lora",
    "mark_only_lora_trainable",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "remove_lora",
    "lora_layers",
    "mixed_adapter_batch",
    "set_adapter",
    "delete_adapter",
]

_BIAS_MODES = ("none", "all", "lora_only")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(qualified name, layer)`` of every LoRA layer in ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _memory_key(tensor: torch.Tensor) -> tuple:
    """Identity of the memory a weight occupies (same Parameter, or the same region of one storage)."""
    if tensor.device.type == "meta":
        return ("id", id(tensor))
    return ("mem", tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))


def check_weights_unshared(model: nn.Module, names: Sequence[str], action: str, hint: str = "") -> None:
    """ValueError when the weight of a module in ``names`` is shared (tied) with another module of ``model``.

    ``action`` (e.g. ``"merge_lora"``, ``"init='pissa'"``) writes into those weights in place; with a tied
    weight (a causal LM's ``lm_head`` and ``embed_tokens`` under ``tie_word_embeddings``) the write would
    change every module holding it: merging ``lm_head``'s adapter would also shift the input embeddings, and
    two adapted modules on one weight would add both updates to both. PEFT warns and writes anyway
    (huggingface/peft#2025, #2972); here nothing is changed and the message says how to untie.
    """
    owners: dict[tuple, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            if isinstance(param, torch.Tensor) and param_name == "weight":
                owners.setdefault(_memory_key(param), []).append(module_name)
    for name in names:
        weight = model.get_submodule(name).weight if name else getattr(model, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        others = sorted({n for n in owners.get(_memory_key(weight), []) if n != name})
        if others:
            target = f"model.{name}" if name else "model"
            raise ValueError(
                f"{action}: the weight of module {name!r} is shared (tied) with {others}; writing into it "
                "would change those modules too. Untie it first, e.g. "
                f"`{target}.weight = nn.Parameter({target}.weight.detach().clone())` (and set the config's "
                "tie_word_embeddings=False)" + (f", or {hint}" if hint else "")
            )


def active_adapter_names(model: nn.Module) -> set[str]:
    """The adapters that LoRA layers and ``modules_to_save`` wrappers of ``model`` run now (None left out)."""
    names = {layer.active_adapter for _, layer in lora_layers(model)}
    names |= {m.active_adapter for m in model.modules() if isinstance(m, ModulesToSaveWrapper)}
    names.discard(None)
    return names  # type: ignore[return-value]


def keep_running_adapter(model: nn.Module, adapter_name: str, before: set[str]) -> None:
    """After ``adapter_name`` was added to ``model``: if the model ran other adapters (``before``), the
    modules created for it (where it became active as their first adapter) run their base module, so that
    the model keeps running what it ran, as in PEFT (``set_adapter`` switches). Without this, a model
    running ``"default"`` ran the new adapter in its new layers and ``"default"`` in the old ones."""
    if not before or adapter_name in before:
        return
    for _, layer in lora_layers(model):
        if layer.active_adapter == adapter_name:
            layer.set_adapter(None)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and module.active_adapter == adapter_name:
            module.set_adapter(None)


def _as_patterns(arg: str, value: str | Sequence[str]) -> list[str]:
    if not isinstance(value, (str, Sequence)) and not isinstance(value, (set, frozenset)):
        raise TypeError(
            f"{arg} must be a module name, a regex or a sequence of them (e.g. ['q_proj', 'v_proj']), "
            f"got {type(value).__name__}"
        )
    patterns = [value] if isinstance(value, str) else list(value)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{arg} must be a non-empty str or sequence of non-empty str, got {value!r}")
    return patterns


def _matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` is ``name``, a dotted suffix of it, or a regex matching it fully."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int = 8,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "default",
    use_dora: bool = False,
    adapter_name: str = "default",
    merged_modules: Mapping[str, Sequence[bool]] | None = None,
    freeze_base: bool = True,
    modules_to_save: str | Sequence[str] | None = None,
) -> nn.Module:
    r"""Replace matching ``nn.Linear`` / ``nn.Embedding`` / ``Conv1D`` modules of ``model`` by LoRA layers, in
    place.

    Parameters
    ----------
    model : nn.Module
        Any module tree (plain PyTorch or a Hugging Face transformers model).
    target_modules : str or sequence of str
        Each entry matches a module whose qualified name equals it, ends with ``"." + entry`` (so ``"q_proj"``
        matches every ``layers.N.self_attn.q_proj``), or fully matches it as a regular expression. Every
        entry must match at least one module (else ValueError listing the candidates). Matched modules
        that are already LoRA layers get a new adapter ``adapter_name``. transformers' ``Conv1D`` (GPT-2's
        ``c_attn``, ``c_proj``, ``c_fc``; weight stored (in, out)) becomes :class:`LoRAConv1D`, PEFT's
        ``fan_in_fan_out=True`` layout.
    r : int, default 8
        Rank (see :meth:`LoRALayer.add_adapter` for ``alpha``, ``dropout``, ``use_rslora``, ``init``).
    use_dora : bool, default False
        DoRA adapters (Liu et al. 2024, arXiv:2402.09353; see :class:`LoRALinear`) on the ``nn.Linear``
        and ``Conv1D`` targets. Targets that cannot take DoRA (``nn.Embedding``, ``merged_modules``) raise
        ValueError naming ``use_dora`` before anything changes.
    adapter_name : str, default "default"
        The new adapter becomes active only in a model that runs no adapter yet; a model that runs another
        one keeps running it, in its new LoRA layers and ``modules_to_save`` copies too (as PEFT's
        ``add_adapter``); :func:`set_adapter` switches.
    merged_modules : mapping of pattern -> sequence of bool, optional
        Fused projections (e.g. ``{"qkv": [True, False, True]}``): matching ``nn.Linear`` modules become
        :class:`LoRAMergedLinear` with equal output slices and adapters on the flagged slices. Patterns
        match like ``target_modules`` and are targets themselves.
    freeze_base : bool, default True
        Call :func:`mark_only_lora_trainable` afterwards, so only adapter parameters train.
    modules_to_save : str or sequence of str, optional
        Modules (e.g. ``["classifier"]``, ``["score"]``, ``["lm_head"]``) that get a full trainable copy
        for this adapter, as PEFT's ``modules_to_save``: each module whose qualified name ends with an entry
        (PEFT's rule, ``str.endswith``) is replaced by a
        :class:`~lowrank.lora.modules_to_save.ModulesToSaveWrapper` holding the original (frozen) and one copy
        per adapter (a module already wrapped gets a copy for ``adapter_name``). The copies are switched by
        :func:`set_adapter`, trained under :func:`mark_only_lora_trainable`, and included in
        :func:`lora_state_dict` and :func:`lowrank.save_adapter`. Memory: one copy of each module's
        parameters per adapter.

    Returns
    -------
    nn.Module
        ``model`` itself (modified in place); the LoRA layers share the base Parameters (no copy).

    Raises
    ------
    TypeError
        ``model`` not an ``nn.Module``; ``target_modules`` not a str / sequence of str (e.g. ``None``); a
        target matching a module that is not ``nn.Linear`` / ``nn.Embedding`` / ``Conv1D``; bad
        ``merged_modules`` / ``modules_to_save``.
    ValueError
        A target matching nothing; a ``modules_to_save`` entry matching nothing; a LoRA target that is (or
        lies inside) a module of ``modules_to_save`` (a module is either adapted or copied, not both);
        ``r`` out of range for a module; ``adapter_name`` already held by a
        matched LoRA layer, or ``"__base__"`` (``BASE_ADAPTER``, reserved for :func:`mixed_adapter_batch`);
        bad merged-module flags; ``init="pissa"`` on a weight with NaN/inf; bad
        ``alpha`` / ``dropout`` / ``init``.

    All or nothing: every target is checked before the model is touched, and a failure while building the
    layers (any target) undoes the earlier ones, so on error the model keeps its modules, its
    ``requires_grad`` flags and (for PiSSA) its weights.

    Notes
    -----
    Works under ``torch.compile(fullgraph=True)``, activation checkpointing, ``torch.autocast`` and
    ``DistributedDataParallel``. With several adapters per layer only the active one receives gradients, so
    wrap such a model in DDP with ``find_unused_parameters=True`` (or delete the idle adapters).

    Examples
    --------
    >>> model = inject_lora(model, ["q_proj", "v_proj"], r=16, alpha=32)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patterns = _as_patterns("target_modules", target_modules)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r}")
    check_not_reserved("adapter_name", adapter_name)
    if merged_modules is not None and not isinstance(merged_modules, Mapping):
        raise TypeError(
            f"merged_modules must be a mapping of pattern -> flags, got {type(merged_modules).__name__}"
        )
    merged = dict(merged_modules or {})
    for pattern in merged:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"merged_modules keys must be non-empty str, got {pattern!r}")
    all_patterns = patterns + [p for p in merged if p not in patterns]
    saved_patterns = [] if modules_to_save is None else _as_patterns("modules_to_save", modules_to_save)
    use_dora, use_rslora = python_number(use_dora), python_number(use_rslora)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
    # NumPy scalars are numbers to users (r=np.int64(8), alpha=np.float32(16)); the layers check plain ones
    r, alpha, dropout = python_number(r), python_number(alpha), python_number(dropout)
    n_iter = pissa_budget(init)  # "pissa_niter_N": PiSSA at PEFT's product budget
    init = check_init(init)  # PEFT's spellings (True, "pissa_niter_N") as ours; bad names refused up front
    options = {"alpha": alpha, "dropout": dropout, "use_rslora": use_rslora, "init": init}
    if use_dora:
        options["use_dora"] = True

    hits: dict[str, int] = dict.fromkeys(all_patterns, 0)
    plan: list[tuple[str, nn.Module, Sequence[bool] | None]] = []
    inside_lora: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (inside_lora and name.startswith(inside_lora)):
            continue
        matched = [p for p in all_patterns if _matches(p, name)]
        if isinstance(module, (LoRALayer, ModulesToSaveWrapper)):
            inside_lora = (*inside_lora, name + ".")
        if not matched:
            continue
        for p in matched:
            hits[p] += 1
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"target {matched[0]!r} matches module {name!r}, which is in modules_to_save (full copies per"
                " adapter); a module is either adapted or copied, not both"
            )
        if not isinstance(module, (nn.Linear, nn.Embedding, LoRALayer)) and not is_conv1d(module):
            raise TypeError(
                f"target {matched[0]!r} matches module {name!r} of type {type(module).__name__}; "
                "only nn.Linear, nn.Embedding and transformers Conv1D modules can take LoRA adapters"
            )
        flags = next((merged[p] for p in matched if p in merged), None)
        plan.append((name, module, flags))

    missing = [p for p, count in hits.items() if count == 0]
    if missing:
        candidates = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m)
            }
        )
        raise ValueError(
            f"target_modules {missing} match no module of {type(model).__name__}; the nn.Linear/nn.Embedding "
            f"modules are named (last component): {candidates}"
        )

    saved_plan = _plan_modules_to_save(model, saved_patterns, [name for name, _, _ in plan], adapter_name)

    # Check everything that can be checked first, so that bad input changes nothing ...
    for name, module, flags in plan:
        if use_dora and (
            flags is not None
            or isinstance(module, nn.Embedding)
            or (isinstance(module, LoRALayer) and not module._supports_dora)
        ):
            raise ValueError(
                f"use_dora=True: module {name!r} ({type(module).__name__}"
                f"{', merged_modules' if flags is not None else ''}) cannot take a DoRA adapter; DoRA is "
                "available on nn.Linear and Conv1D targets only"
            )
        if isinstance(module, LoRALayer):
            if isinstance(adapter_name, str) and adapter_name in module.r:
                raise ValueError(
                    f"adapter_name: module {name!r} already holds an adapter named {adapter_name!r} "
                    f"(adapters: {list(module.r)}); choose another adapter_name"
                )
            continue
        if flags is not None:
            _check_merged_flags(name, module, flags)
            dims: tuple[int, ...] = (module.in_features, module.out_features // len(flags))
        else:
            dims = tuple(module.weight.shape)
        if init in WEIGHT_INITS and isinstance(r, int) and not isinstance(r, bool) and r > min(dims):
            raise ValueError(
                f"r must be an int in [1, {min(dims)}] for init={init!r} on module {name!r} (weight "
                f"{tuple(module.weight.shape)}), got {r!r}"
            )
    if init in WEIGHT_INITS:
        check_weights_unshared(model, [name for name, _, _ in plan], f"init={init!r}", "use init='default'")
        for name, module, _ in plan:
            if module.weight.device.type != "meta" and not all_finite(module.weight.detach()):
                raise ValueError(
                    f"init={init!r}: the weight of module {name!r} holds NaN or infinite values; this "
                    "initialisation factors the weight itself"
                )
    # ... then change the model with an undo log: a failure in a later target restores every earlier one.
    undo: list[Callable[[], object]] = []
    # PiSSA: the weights' triplets are computed up front, same-shape ones in one batched SVD call each,
    # and handed to each layer (pissa_triplets=, one entry per matrix it factors)
    triplets: dict[str, list] = {}
    if init == "pissa" and isinstance(r, int) and not isinstance(r, bool) and r >= 1:
        views = [(name, view) for name, module, flags in plan for view in _pissa_views(module, flags)]
        for (name, _), entry in zip(views, pissa_triplets([view for _, view in views], r, n_iter=n_iter)):
            triplets.setdefault(name, []).append(entry)
    running = active_adapter_names(model)
    try:
        _build(model, plan, saved_plan, r, options, adapter_name, undo, triplets)
        keep_running_adapter(model, adapter_name, running)
        if freeze_base:
            grads = [(p, p.requires_grad) for p in model.parameters()]
            undo.append(lambda g=grads: [p.requires_grad_(flag) for p, flag in g])
            mark_only_lora_trainable(model)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return model


def _pissa_views(module: nn.Module, flags: Sequence[bool] | None) -> list[torch.Tensor]:
    """The (out, in) matrices PiSSA will factor for ``module`` (as its LoRA layer does), for batching."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return []
    if isinstance(module, LoRAMergedLinear):
        starts, sizes = module._enabled_starts, module._enabled_sizes
        return [weight[start : start + size] for start, size in zip(starts, sizes)]
    if isinstance(module, LoRALinear):  # LoRAConv1D included: its (out, in) view
        return [module._linear_weight()]
    if flags is not None:
        size = weight.shape[0] // max(len(flags), 1)
        return [weight[i * size : (i + 1) * size] for i, flag in enumerate(flags) if flag]
    if is_conv1d(module):
        return [weight.T]
    return [weight]


def _build(
    model: nn.Module,
    plan: list[tuple[str, nn.Module, Sequence[bool] | None]],
    saved_plan: list,
    r: int,
    options: dict,
    adapter_name: str,
    undo: list[Callable[[], object]],
    triplets: dict[str, list],
) -> None:
    """Create the LoRA layers of ``plan`` and the wrappers of ``saved_plan``, logging undo steps;
    ``triplets``: module name -> the PiSSA triplets computed ahead for it (``pissa_triplets=``)."""
    init = options["init"]
    for name, module, flags in plan:
        if name in triplets:
            options = {**options, "pissa_triplets": triplets[name]}
        else:
            options = {k: v for k, v in options.items() if k != "pissa_triplets"}
        if init in WEIGHT_INITS:
            saved = module.weight.detach().clone()
            undo.append(lambda w=module.weight, o=saved: w.data.copy_(o))
        if isinstance(module, LoRALayer):
            module.add_adapter(adapter_name, r, **options)
            undo.append(lambda m=module: _drop_adapter(m, adapter_name))
            continue
        grads = [(p, p.requires_grad) for p in module.parameters(recurse=False)]
        undo.append(lambda g=grads: [p.requires_grad_(flag) for p, flag in g])
        if isinstance(module, nn.Embedding):
            new: LoRALayer = LoRAEmbedding.from_embedding(module, r, **options)
        elif is_conv1d(module):
            new = LoRAConv1D.from_conv1d(module, r, **options)
        elif flags is not None:
            new = LoRAMergedLinear.from_linear(module, r, enable_lora=flags, **options)
        else:
            new = LoRALinear.from_linear(module, r, **options)
        if adapter_name != "default":
            _rename_adapter(new, "default", adapter_name)
        _replace(model, name, new)
        undo.append(lambda n=name, m=module: _replace(model, n, m))
    for name, module in saved_plan:
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
            undo.append(lambda m=module: m.delete_adapter(adapter_name))
            continue
        grads = [(p, p.requires_grad) for p in module.parameters()]
        undo.append(lambda g=grads: [p.requires_grad_(flag) for p, flag in g])
        _replace(model, name, ModulesToSaveWrapper(module, adapter_name))
        undo.append(lambda n=name, m=module: _replace(model, n, m))


def _plan_modules_to_save(
    model: nn.Module, patterns: list[str], targets: list[str], adapter_name: str
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module ``modules_to_save`` names (PEFT's rule: the qualified name ends
    with the entry), outermost only; modules inside LoRA layers or wrappers are not candidates."""
    if not patterns:
        return []
    hits = dict.fromkeys(patterns, 0)
    chosen: list[tuple[str, nn.Module]] = []
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (skip and name.startswith(skip)):
            continue
        matched = [p for p in patterns if name.endswith(p)]
        if isinstance(module, LoRALayer) and not matched:
            skip = (*skip, name + ".")
            continue
        if not matched:
            continue
        for p in matched:
            hits[p] += 1
        if isinstance(module, LoRALayer):
            raise ValueError(
                f"modules_to_save {matched[0]!r} matches {name!r}, a LoRA layer; a module is either adapted "
                "(target_modules) or copied (modules_to_save), not both"
            )
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            raise ValueError(
                f"adapter_name: module {name!r} already holds a modules_to_save copy named {adapter_name!r}; "
                "choose another adapter_name"
            )
        chosen.append((name, module))
        skip = (*skip, name + ".")
    missing = [p for p, count in hits.items() if count == 0]
    if missing:
        raise ValueError(
            f"modules_to_save {missing} match no module of {type(model).__name__} (a module matches when its "
            "qualified name ends with the entry, e.g. 'classifier' or 'bert.pooler')"
        )
    for target in targets:
        for name, _ in chosen:
            if target == name or target.startswith(name + "."):
                raise ValueError(
                    f"module {target!r} is a LoRA target (target_modules) and "
                    + ("is" if target == name else f"lies inside {name!r}, which is")
                    + " in modules_to_save; a module is either adapted or copied, not both: remove it from "
                    "one of the two"
                )
    return chosen


def _drop_adapter(layer: LoRALayer, name: str) -> None:
    if name in layer.merged_adapters:
        layer.merged_adapters.remove(name)
    layer.delete_adapter(name)


def _check_merged_flags(name: str, module: nn.Module, flags: Sequence[bool]) -> None:
    if isinstance(flags, (str, bytes)) or not isinstance(flags, Sequence):
        raise TypeError(
            f"merged_modules: flags for module {name!r} must be a sequence of bool (one per output slice), "
            f"got {type(flags).__name__}"
        )
    if not isinstance(module, nn.Linear):
        raise TypeError(f"merged_modules: module {name!r} is a {type(module).__name__}, not an nn.Linear")
    if not flags or not all(isinstance(f, bool) for f in flags) or not any(flags):
        raise ValueError(
            f"merged_modules: flags for module {name!r} must be bools with at least one True, "
            f"got {list(flags)}"
        )
    if module.out_features % len(flags):
        raise ValueError(
            f"merged_modules: module {name!r} has out_features={module.out_features}, which does not split "
            f"into {len(flags)} equal slices"
        )


def check_not_reserved(arg: str, name: str) -> None:
    """Refuse the name :func:`mixed_adapter_batch` gives rows without an adapter as a new adapter's name."""
    if name == BASE_ADAPTER:
        raise ValueError(
            f"{arg}: {BASE_ADAPTER!r} is reserved (mixed_adapter_batch reads it as 'no adapter' for a row); "
            "choose another name"
        )


def _rename_adapter(layer: LoRALayer, old: str, new: str) -> None:
    if not isinstance(new, str) or not new or "." in new:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {new!r}")
    for attr in (*layer._factor_names, "lora_dropout"):
        table = getattr(layer, attr)
        table[new] = table[old]
        del table[old]
    for table in (layer.r, layer.lora_alpha, layer.scaling, layer.use_rslora, layer.use_dora):
        table[new] = table.pop(old)
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    if magnitudes is not None and old in magnitudes:
        magnitudes[new] = magnitudes[old]
        del magnitudes[old]
        layer.clear_dora_cache()
    inits = getattr(layer, "weight_init", None)
    if inits is not None and old in inits:
        inits[new] = inits.pop(old)
    if layer.active_adapter == old:
        layer.active_adapter = new


TRAINED_BIAS_ATTR = "_lowrank_trained_bias"


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA factors, the ``modules_to_save`` copies (every
    adapter's; only the active one gets gradients) and, optionally, biases.

    Parameters
    ----------
    model : nn.Module
    bias : {"none", "all", "lora_only"}, default "none"
        ``"all"``: every parameter named ``bias`` also trains; ``"lora_only"``: the biases of LoRA layers.
        Recorded on ``model``: :func:`lowrank.save_adapter` then saves those biases by default (PEFT's
        ``LoraConfig.bias`` governs both, too).

    Returns
    -------
    nn.Module
        ``model``.
    """
    _check_bias(bias)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers; call inject_lora first")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in layers:
        for _, param in layer.lora_parameters():
            param.requires_grad_(True)
        if bias == "lora_only" and getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(True)
    for _, wrapper in _wrappers(model):
        for _, param in wrapper.adapter_parameters():
            param.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    # a plain attribute (not state), read by save_adapter's default bias
    object.__setattr__(model, TRAINED_BIAS_ATTR, bias)
    return model


def lora_state_dict(
    model: nn.Module, bias: str = "none", adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """The adapter part of ``model.state_dict()``: keys like ``"layers.0.q_proj.lora_A.default"``, and the
    ``modules_to_save`` copies' keys (``"classifier.modules_to_save.default.weight"``).

    Parameters
    ----------
    model : nn.Module
    bias : {"none", "all", "lora_only"}, default "none"
        Also include every ``bias`` (``"all"``) or the LoRA layers' biases (``"lora_only"``).
    adapter_name : str, optional
        Only this adapter's factors and copies (default: all adapters).

    Returns
    -------
    dict[str, Tensor]
        Detached tensors sharing storage with the parameters (as ``state_dict``), DoRA magnitudes included
        (``"<path>.lora_magnitude_vector.<adapter>"``); loads back with
        ``model.load_state_dict(sd, strict=False)``.
    """
    _check_bias(bias)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers; call inject_lora first")
    wrappers = list(_wrappers(model))
    _check_adapter_arg(adapter_name, allow_none=True)
    if adapter_name is not None and adapter_name not in _adapter_names(model):
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(_adapter_names(model))}")
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        for key, param in layer.lora_parameters(adapter_name):
            state[prefix + key] = param.detach()
    for name, wrapper in wrappers:
        for adapter in wrapper.adapters:
            if adapter_name is None or adapter == adapter_name:
                for key, tensor in wrapper.adapter_state(adapter).items():
                    state[f"{name}.modules_to_save.{adapter}.{key}"] = tensor
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        if bias == "lora_only" and getattr(layer, "bias", None) is not None:
            state[prefix + "bias"] = layer.bias.detach()
    if bias == "all":
        for key, tensor in model.state_dict().items():
            if key.rsplit(".", 1)[-1] == "bias":
                state[key] = tensor
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each LoRA layer's active adapter into its weight: forward then costs exactly the base model.

    Raises RuntimeError if an adapter is already merged (merging twice would add it twice).
    """
    layers = [layer for _, layer in lora_layers(model) if layer.active_adapter is not None]
    if not layers:
        raise ValueError("model has no LoRA layers with an active adapter to merge")
    already = [name for name, layer in lora_layers(model) if layer.merged_adapters]
    if already:
        raise RuntimeError(f"adapters are already merged in {already[:5]}; call unmerge_lora first")
    check_weights_unshared(
        model, [n for n, layer in lora_layers(model) if layer.active_adapter is not None], "merge_lora"
    )
    _merge_all(layers)
    return model


def _merge_all(layers: Sequence[LoRALayer]) -> None:
    """Merge every layer, or none: a layer that refuses (e.g. a non-finite merged weight) unmerges the
    layers merged before it, so the model is left as it was."""
    done: list[LoRALayer] = []
    try:
        for layer in layers:
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged adapters out of the weights again (see :meth:`LoRALayer.unmerge` for the accuracy)."""
    layers = [layer for _, layer in lora_layers(model) if layer.merged_adapters]
    if not layers:
        raise RuntimeError("no LoRA layer of the model is merged; nothing to unmerge")
    for layer in layers:
        layer.unmerge()
    return model


def _plain_module(layer: LoRALayer) -> nn.Module:
    if isinstance(layer, LoRAEmbedding):
        plain: nn.Module = nn.Embedding(
            layer.num_embeddings,
            layer.embedding_dim,
            padding_idx=layer.padding_idx,
            max_norm=layer.max_norm,
            norm_type=layer.norm_type,
            scale_grad_by_freq=layer.scale_grad_by_freq,
            sparse=layer.sparse,
            device="meta",
        )
    elif isinstance(layer, LoRAConv1D):
        plain = layer.to_conv1d()
        if layer.bias is not None:
            layer.bias.requires_grad_(layer._base_requires_grad)
    else:
        assert isinstance(layer, LoRALinear)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if layer.bias is not None:
            plain.bias = layer.bias
            layer.bias.requires_grad_(layer._base_requires_grad)
    plain.weight = layer.weight
    layer.weight.requires_grad_(layer._base_requires_grad)
    return plain


def remove_lora(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Replace every LoRA layer by the plain ``nn.Linear`` / ``nn.Embedding`` / ``Conv1D`` holding its base
    Parameters, and every ``modules_to_save`` wrapper by a plain module.

    Parameters
    ----------
    model : nn.Module
    merge : bool, default False
        Fold the active adapter in first (layers already merged keep their merged weight either way), and
        keep the active adapter's ``modules_to_save`` copy in place of each wrapped module. With False,
        unmerged adapters and the copies are dropped and the original model comes back (PEFT's ``unload``
        keeps the active copy either way; pass ``merge=True`` for that).

    Returns
    -------
    nn.Module
        ``model`` (modified in place; a LoRA layer that is ``model`` itself is returned as its plain module).
        The base Parameters get back the ``requires_grad`` they had before injection.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers to remove")
    if merge:
        to_merge = [
            n for n, layer in layers if not layer.merged_adapters and layer.active_adapter is not None
        ]
        check_weights_unshared(model, to_merge, "remove_lora(merge=True)", "remove it with merge=False")
        _merge_all([layer for n, layer in layers if n in set(to_merge)])  # all or none, before any change
    for name, wrapper in list(_wrappers(model)):
        if not merge:
            wrapper.set_adapter(None)
        _replace(model, name, wrapper.unwrap())
    for name, layer in layers:
        if merge and not layer.merged_adapters and layer.active_adapter is not None:
            layer.merge()
        plain = _plain_module(layer)
        if not name:
            return plain
        _replace(model, name, plain)
    return model


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """``(qualified name, wrapper)`` of every ``modules_to_save`` wrapper in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def _check_adapter_arg(value: object, *, allow_none: bool = False) -> None:
    """TypeError naming ``adapter_name`` for anything but one adapter name (PEFT also takes lists there)."""
    if not isinstance(value, str) and not (allow_none and value is None):
        raise TypeError(
            f"adapter_name must be one adapter name (str){' or None' if allow_none else ''}, got "
            f"{type(value).__name__}"
            + ("; lowrank runs one active adapter at a time" if isinstance(value, (list, tuple)) else "")
        )


def _adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for _, layer in lora_layers(model):
        names.update(layer.r)
    for _, wrapper in _wrappers(model):
        names.update(wrapper.adapters)
    return names


def set_adapter(model: nn.Module, adapter_name: str | None) -> nn.Module:
    """Make ``adapter_name`` active in every LoRA layer and ``modules_to_save`` wrapper of ``model``.

    Layers and wrappers that do not hold it run their base module (as PEFT does); ``None`` runs the base
    model everywhere. No weight is copied. Returns ``model``.

    Raises
    ------
    TypeError
        ``adapter_name`` neither a str nor None (e.g. PEFT's list of several active adapters: lowrank runs
        one at a time; :func:`lowrank.combine_adapters` builds their sum).
    ValueError
        ``adapter_name`` held by no layer or wrapper.
    RuntimeError
        A layer has another adapter merged (unmerge first); nothing is changed then.
    """
    _check_adapter_arg(adapter_name, allow_none=True)
    if adapter_name is not None and adapter_name not in _adapter_names(model):
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(_adapter_names(model))}")
    layers = list(lora_layers(model))
    merged = [n for n, layer in layers if layer.merged_adapters and adapter_name not in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"another adapter is merged in {merged[:5]}; call unmerge_lora first")
    for _, layer in layers:
        layer.set_adapter(adapter_name if adapter_name in layer.r else None)
    for _, wrapper in _wrappers(model):
        wrapper.set_adapter(adapter_name if adapter_name in wrapper.adapters else None)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Delete adapter ``adapter_name`` from every LoRA layer and ``modules_to_save`` wrapper (its copies).

    If the model ran it, the model then runs one remaining adapter, the first in module order (layers and
    wrappers without it run their base module, as after :func:`set_adapter`); PEFT likewise keeps the new
    active adapter consistent across layers (huggingface/peft#1105). Returns ``model``. Raises TypeError
    for a name that is not a str, ValueError for an unknown name and RuntimeError (changing nothing) if it
    is merged somewhere.
    """
    _check_adapter_arg(adapter_name)
    if adapter_name not in _adapter_names(model):
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(_adapter_names(model))}")
    layers = [layer for _, layer in lora_layers(model) if adapter_name in layer.r]
    merged = [layer for layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged; call unmerge_lora before deleting it")
    running = active_adapter_names(model)
    for layer in layers:
        layer.delete_adapter(adapter_name)
    for _, wrapper in _wrappers(model):
        if adapter_name in wrapper.adapters:
            wrapper.delete_adapter(adapter_name)
    if running == {adapter_name}:
        # The model ran the deleted adapter: every layer and wrapper now runs ONE replacement (the first
        # remaining adapter, in module order), not each its own first remaining adapter (a mixture).
        remaining = [n for _, layer in lora_layers(model) for n in layer.r]
        remaining += [n for _, wrapper in _wrappers(model) for n in wrapper.adapters]
        new = remaining[0] if remaining else None
        for _, layer in lora_layers(model):
            if not layer.merged_adapters:
                layer.set_adapter(new if new in layer.r else None)
        for _, wrapper in _wrappers(model):
            wrapper.set_adapter(new if new in wrapper.adapters else None)
    return model


@contextlib.contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Run batches whose rows use different adapters: row ``i`` of every LoRA layer's input uses
    ``adapter_names[i]`` (``"__base__"``: the base model alone).

    Inside the ``with`` block each LoRA linear layer makes one :func:`lowrank.lora_linear_multi` call for
    the whole batch (one base GEMM, and each adapter present adds its low-rank term on its rows), instead
    of one forward per adapter; the active adapter is ignored. The batch dimension is the first dimension
    of each layer's input (``(batch, seq, features)`` in transformers). A layer that lacks one of the
    adapters runs the base layer for those rows. Gradients reach every adapter used (training several
    adapters in one batch), provided they have no dropout; merged layers are refused. ``modules_to_save``
    modules (e.g. a classifier head) run each row through its adapter's copy (the original module for
    ``"__base__"`` and adapters without a copy), one call per adapter present, as PEFT does; their input's
    first dimension must be the batch too, and they must return one tensor.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers (see :func:`inject_lora`).
    adapter_names : sequence of str
        One adapter name per batch row; each must exist in at least one layer, or be ``"__base__"``.

    Examples
    --------
    >>> with lowrank.mixed_adapter_batch(model, ["sql", "__base__", "chat", "sql"]):
    ...     logits = model(input_ids)  # input_ids: (4, seq)
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError("adapter_names must be a sequence of adapter names (str), one per batch row")
    names = tuple(adapter_names)
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("model has no LoRA layers; call inject_lora first")
    wrappers = [wrapper for _, wrapper in _wrappers(model)]
    known = {BASE_ADAPTER}.union(*(layer.r.keys() for layer in layers), *(w.adapters for w in wrappers))
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; adapters: {sorted(known - {BASE_ADAPTER})}")
    routed: list[LoRALayer | ModulesToSaveWrapper] = [*layers, *wrappers]
    previous = [module._row_adapters for module in routed]
    for module in routed:
        module._row_adapters = names
    try:
        yield model
    finally:
        for module, before in zip(routed, previous):
            module._row_adapters = before
