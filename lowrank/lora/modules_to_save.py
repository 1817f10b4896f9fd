"""Full trainable copies of whole modules (classifier heads, embeddings) next to the LoRA adapters.

PEFT calls these ``modules_to_save``: fine-tuning a classifier on a new task needs a new head, which a
low-rank update of the old one does not give, so each adapter gets its own full copy of the head, trained
and saved with the adapter. :class:`ModulesToSaveWrapper` replaces the named module; it keeps the original
(frozen) as ``original_module`` and one copy per adapter in ``modules_to_save[adapter]``, so its state-dict
keys are PEFT's (``<path>.original_module.weight``, ``<path>.modules_to_save.<adapter>.weight``). Switching
adapters switches the copy; no copy is made per call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(nn.Module):
    """A module replaced by per-adapter full copies; ``forward`` runs the active adapter's copy.

    Parameters
    ----------
    module : nn.Module
        The module to copy (any module: ``nn.Linear`` head, ``nn.Embedding``, a sub-network). It is kept,
        frozen, as ``original_module``; ``forward`` runs it when no adapter is active.
    adapter_name : str
        The first adapter; gets a deep copy of ``module``, trainable, and becomes active.

    Attributes
    ----------
    original_module : nn.Module
    modules_to_save : nn.ModuleDict
        adapter name -> full copy (same class, parameters, buffers; ``requires_grad`` True).
    active_adapter : str or None

    Notes
    -----
    Memory: one full copy of ``module``'s parameters per adapter. Attributes the wrapper lacks (e.g.
    ``weight``, ``out_features``) are read from the active copy (``original_module`` when none is
    active), so code that inspects the head keeps working.
    """

    # class default as well: a wrapper pickled before mixed batches were routed has no instance attribute
    _row_adapters: tuple[str, ...] | None = None

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, ModulesToSaveWrapper):
            raise TypeError("module is already a ModulesToSaveWrapper; use its add_adapter")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        # set by lowrank.mixed_adapter_batch: one adapter name per row of the batch (first dimension)
        self._row_adapters: tuple[str, ...] | None = None
        self._base_requires_grad = [(p, p.requires_grad) for p in module.parameters()]
        self.add_adapter(adapter_name)

    @staticmethod
    def _check_new_name(name: object) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")

    def add_adapter(self, name: str) -> None:
        """Add a trainable deep copy of ``original_module`` for adapter ``name`` (active if none is)."""
        self._check_new_name(name)
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.modules_to_save)})")
        copied = copy.deepcopy(self.original_module)
        for param in copied.parameters():
            param.requires_grad_(True)
        self.original_module.requires_grad_(False)
        self.modules_to_save[name] = copied
        if self.active_adapter is None:
            self.active_adapter = name

    @property
    def adapters(self) -> list[str]:
        """The adapter names this wrapper holds a copy for."""
        return list(self.modules_to_save)

    def set_adapter(self, name: str | None) -> None:
        """Run adapter ``name``'s copy from now on (``None``: the original module)."""
        if name is not None and name not in self.modules_to_save:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.modules_to_save)}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy; if it was active, the first remaining one (or None) is active."""
        if name not in self.modules_to_save:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.modules_to_save)}")
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        """The module ``forward`` runs: the active adapter's copy, else ``original_module``."""
        if self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def unwrap(self) -> nn.Module:
        """The active copy (or the original when none is active), with the original's ``requires_grad``
        restored when the original comes back."""
        if self.active_adapter is None:
            for param, flag in self._base_requires_grad:
                param.requires_grad_(flag)
        return self.active_module()

    def adapter_parameters(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """``(local state-dict key, parameter)`` of the copies (of adapter ``name`` if given)."""
        for adapter, module in self.modules_to_save.items():
            if name is None or adapter == name:
                for key, param in module.named_parameters():
                    yield f"modules_to_save.{adapter}.{key}", param

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s copy's state dict (parameters and persistent buffers), keys local to it."""
        if name not in self.modules_to_save:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.modules_to_save)}")
        return {k: v.detach() for k, v in self.modules_to_save[name].state_dict().items()}

    def forward(self, *args, **kwargs):
        if self._row_adapters is not None:
            return self._forward_mixed(*args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def _forward_mixed(self, x, *args, **kwargs):
        """Rows of ``x`` through the copy of their adapter (the original for ``"__base__"`` and adapters
        without a copy), as PEFT's mixed-batch forward: one call per adapter present, outputs put back in
        row order (differentiable)."""
        names = self._row_adapters
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(names):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"mixed_adapter_batch got {len(names)} adapter names but this modules_to_save module's input "
                f"is {shape}: give one name per row of the batch (the first dimension)"
            )
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name if name in self.modules_to_save else "", []).append(row)
        outputs, order = [], []
        for name, rows in groups.items():
            module = self.modules_to_save[name] if name else self.original_module
            index = torch.tensor(rows, device=x.device)
            out = module(x.index_select(0, index), *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"mixed_adapter_batch: a modules_to_save module returned {type(out).__name__}; rows can "
                    "only be routed through modules that return one tensor"
                )
            outputs.append(out)
            order.extend(rows)
        if len(outputs) == 1:
            return outputs[0]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(outputs).index_select(0, inverse.to(outputs[0].device))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules:
                raise
            return getattr(self.active_module(), name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save)}, active={self.active_adapter!r}"
