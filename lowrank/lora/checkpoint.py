"""Adapter checkpoints in the Hugging Face PEFT layout: save, load, size.

A checkpoint is a directory holding

* ``adapter_model.safetensors``: one pair of tensors per adapted layer, named as PEFT names them,
  ``base_model.model.<module path>.lora_A.weight`` of shape ``(r, in_features)`` and
  ``base_model.model.<module path>.lora_B.weight`` of shape ``(out_features, r)`` for linear layers, and
  ``base_model.model.<module path>.lora_embedding_A`` ``(r, num_embeddings)`` /
  ``lora_embedding_B`` ``(embedding_dim, r)`` for embeddings;
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
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import nn

__all__ = ["AdapterSize", "adapter_size", "load_adapter", "save_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."

# Config read from disk, per adapter, kept on the model so that a later save keeps unknown fields.
_CONFIG_ATTR = "_lowrank_adapter_configs"

# safetensors dtype codes (https://github.com/huggingface/safetensors, format description).
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code
DTYPE_FROM_CODE: dict[str, torch.dtype] = {code: dtype for dtype, code in _DTYPE_CODES.items()}


# ----------------------------------------------------------------------------------------------------
# Atomic, streaming safetensors writer
# ----------------------------------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write(f)`` fills a temporary file created in the same directory as ``path``; the file is flushed and
    ``fsync``-ed, then moved over ``path`` with :func:`os.replace` (atomic on POSIX and Windows within one
    file system), and the directory entry is synced. On any exception the temporary file is removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, dtype, shape and a zero-argument function that produces it.

    The producer is called only when the tensor's bytes are written, so a writer holds one tensor at a time.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def write_safetensors(
    path: str | os.PathLike, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically, one tensor in memory at a time.

    Parameters
    ----------
    path : str or PathLike
        Destination file; replaced atomically (see :func:`atomic_write`).
    entries : sequence of TensorEntry
        Tensors in file order. Each produced tensor must match its declared dtype and shape.
    metadata : dict of str to str, optional
        Stored under ``__metadata__``; ``{"format": "pt"}`` is added as transformers expects.

    Notes
    -----
    The format is an 8-byte little-endian header length, a JSON header mapping each name to its dtype, shape
    and ``[begin, end)`` byte offsets into the data section, padded with spaces to a multiple of 8 bytes, then
    the raw little-endian data. Writing it directly (rather than building the whole file in memory) keeps the
    peak memory at one tensor, which matters for whole-model checkpoints in the command-line tool.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"entries: duplicate tensor name {entry.name!r}")
        seen.add(entry.name)
        if entry.dtype not in _DTYPE_CODES:
            raise TypeError(f"entries: tensor {entry.name!r} has unsupported dtype {entry.dtype}")
        nbytes = torch.Size(entry.shape).numel() * torch.empty((), dtype=entry.dtype).element_size()
        header[entry.name] = {
            "dtype": _DTYPE_CODES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for entry in entries:
            tensor = entry.produce()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != tuple(entry.shape):
                raise ValueError(
                    f"tensor {entry.name!r}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                    f"declared {entry.dtype} {tuple(entry.shape)}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))

    atomic_write(path, write)


def _entries_from_dict(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(k, t.dtype, tuple(t.shape), (lambda t=t: t)) for k, t in tensors.items()]


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


def _key_names(module_path: str, embedding: bool) -> tuple[str, str]:
    base = KEY_PREFIX + module_path
    if embedding:
        return base + ".lora_embedding_A", base + ".lora_embedding_B"
    return base + ".lora_A.weight", base + ".lora_B.weight"


# ----------------------------------------------------------------------------------------------------
# PEFT config helpers
# ----------------------------------------------------------------------------------------------------


def _pattern_value(patterns: dict[str, Any] | None, module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key ``k`` with ``(.*\\.)?(k)$`` matching."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _matches_targets(config: dict[str, Any], module_path: str) -> bool:
    """PEFT's target_modules semantics: a string is a full-match regex, a list matches names or suffixes."""
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module_path):
                return False
        elif module_path in excluded or any(module_path.endswith("." + e) for e in excluded):
            return False
    targets = config.get("target_modules")
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module_path) is not None
    return module_path in targets or any(module_path.endswith("." + t) for t in targets)


def _most_common(values: Iterable[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _stored_config(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    return dict(getattr(model, _CONFIG_ATTR, {}).get(adapter_name, {}))


def _remember_config(model: nn.Module, adapter_name: str, config: dict[str, Any]) -> None:
    store = dict(getattr(model, _CONFIG_ATTR, {}))
    store[adapter_name] = dict(config)
    # object.__setattr__: a plain attribute, not a submodule/parameter, not part of the state dict.
    object.__setattr__(model, _CONFIG_ATTR, store)


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

    Raises
    ------
    ValueError
        If no layer holds ``adapter_name``, or the layers use settings one PEFT config cannot express
        (mixed ``use_rslora``).

    Notes
    -----
    Per-layer ranks and alphas are written as PEFT's ``rank_pattern`` / ``alpha_pattern`` (full module paths
    as keys) around the most common value. Each file is replaced atomically, the weights first: a crash
    leaves the old pair, or new weights with the old config (which :func:`load_adapter` then rejects if
    ranks changed), never a torn file. Fields of a config previously read by :func:`load_adapter` that
    lowrank does not interpret are kept. Cost: one copy of the adapter tensors, ``O(sum_l r_l (m_l + n_l))``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    modules = _lora_modules(model, adapter_name)
    if not modules:
        raise ValueError(f"adapter_name: no LoRA layer of the model holds an adapter named {adapter_name!r}")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, int | float] = {}
    rslora: set[bool] = set()
    dropouts: list[float] = []
    for module_path, module in modules:
        if hasattr(module, "enable_lora"):
            raise ValueError(
                f"{module_path}: merged-projection LoRA layers (per-slice adapters) have no PEFT LoRA layout"
            )
        lora_a, lora_b = _lora_pair(module, adapter_name)
        key_a, key_b = _key_names(module_path, embedding=not _is_lora_linear(module))
        tensors[key_a] = lora_a.detach().to("cpu").contiguous()
        tensors[key_b] = lora_b.detach().to("cpu").contiguous()
        ranks[module_path] = int(module.r[adapter_name])
        alphas[module_path] = _number(module.lora_alpha[adapter_name])
        rslora.add(bool(module.use_rslora[adapter_name]))
        dropout = getattr(module, "lora_dropout", {})
        if adapter_name in dropout:
            dropouts.append(float(getattr(dropout[adapter_name], "p", 0.0)))
    if len(rslora) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} mixes use_rslora=True and False across layers; a PEFT config holds one"
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
        dropout=max(dropouts, default=0.0),
        base=_stored_config(model, adapter_name),
    )
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    if task_type is not None:
        config["task_type"] = task_type
    write_adapter_dir(path, tensors, config)


def build_peft_config(
    ranks: dict[str, int],
    alphas: dict[str, int | float],
    *,
    use_rslora: bool = False,
    dropout: float = 0.0,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict for layers with the given per-module ranks and alphas.

    ``r`` / ``lora_alpha`` are the most common values; layers that differ go into ``rank_pattern`` /
    ``alpha_pattern`` keyed by full module path. ``target_modules`` lists every module path (PEFT matches a
    list entry by name or suffix). Fields of ``base`` (a config read earlier) are kept unless overridden.
    """
    r = _most_common(ranks.values())
    alpha = _most_common(a for p, a in alphas.items() if ranks[p] == r)
    config = dict(base or {})
    config.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {p: k for p, k in ranks.items() if k != r},
            "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
            "target_modules": sorted(ranks),
            "lora_dropout": dropout,
            "use_rslora": use_rslora,
            "fan_in_fan_out": False,
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "exclude_modules": None,
            "inference_mode": True,
        }
    )
    for field in ("init_lora_weights", "revision", "base_model_name_or_path", "task_type"):
        config.setdefault(field, True if field == "init_lora_weights" else None)
    return config


def write_adapter_dir(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` (with ``metadata``) then ``adapter_config.json``, each atomically."""
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, WEIGHTS_NAME), _entries_from_dict(tensors), metadata)
    text = json.dumps(dict(sorted(config.items())), indent=2) + "\n"
    atomic_write(os.path.join(path, CONFIG_NAME), lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------


class AdapterCheckpointError(ValueError):
    """A checkpoint that does not fit the model or cannot be read; the message names the key or file."""


def _read_config(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {path!r} (not a PEFT adapter directory)")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterCheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterCheckpointError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}, only LORA is read"
        )
    for field, ok, meaning in [
        ("use_dora", lambda v: not v, "DoRA"),
        ("fan_in_fan_out", lambda v: not v, "fan_in_fan_out (Conv1D layouts)"),
        ("bias", lambda v: v in (None, "none"), "trained biases"),
        ("lora_bias", lambda v: not v, "lora_bias"),
        ("layer_replication", lambda v: not v, "layer_replication"),
    ]:
        if field in config and not ok(config[field]):
            raise AdapterCheckpointError(
                f"{config_file}: {field}={config[field]!r} ({meaning}) is not supported"
            )
    for field in ("r", "lora_alpha"):
        if field in config and (not isinstance(config[field], (int, float)) or config[field] <= 0):
            raise AdapterCheckpointError(
                f"{config_file}: {field} must be a positive number, got {config[field]!r}"
            )
    return config


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


_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)
_BASE_KEY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")


def _dims(module: nn.Module) -> tuple[bool, int, int] | None:
    """(is_embedding, rows of A's input side, rows of B's output side) for an adaptable module, else None."""
    if _is_lora_linear(module) or isinstance(module, nn.Linear):
        return False, int(module.in_features), int(module.out_features)
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
    modules = dict(model.named_modules())
    plans: list[_Planned] = []
    for module_path in sorted(grouped):
        kinds = grouped[module_path]
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        key_a, key_b = (KEY_PREFIX + module_path + "." + n for n in names)
        for kind in kinds:
            if kind not in names:
                raise AdapterCheckpointError(
                    f"{source}: key {KEY_PREFIX + module_path + '.' + kind!r} mixes "
                    "linear and embedding LoRA names for one module"
                )
        for key, kind in ((key_a, names[0]), (key_b, names[1])):
            if kind not in kinds:
                raise AdapterCheckpointError(f"{source}: missing key {key!r}")
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
        expected_rank = _pattern_value(config.get("rank_pattern"), module_path, default_r)
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
        alpha = float(_pattern_value(config.get("alpha_pattern"), module_path, default_alpha))
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
        plans.append(_Planned(module_path, embedding, key_a, key_b, lora_a, lora_b, rank, alpha, base_weight))
    if base_weights:
        key = next(iter(base_weights.values()))[0]
        if strict:
            raise AdapterCheckpointError(
                f"{source}: unexpected key {key!r} (a base weight of an unadapted module)"
            )
    if strict and config.get("target_modules") and not config.get("layers_to_transform"):
        planned = {p.module_path for p in plans}
        for name, module in model.named_modules():
            if name in planned or _dims(module) is None or not _matches_targets(config, name):
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


def _parent_and_child(model: nn.Module, module_path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = module_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def _wrap(
    module: nn.Module, plan: _Planned, adapter_name: str, dropout: float, use_rslora: bool
) -> nn.Module:
    """A LoRA layer around a plain ``nn.Linear`` / ``nn.Embedding`` with one adapter, ``adapter_name``."""
    from lowrank.lora.layers import LoRAEmbedding, LoRALinear

    kwargs = {"alpha": plan.alpha, "dropout": dropout, "use_rslora": use_rslora, "init": "zeros"}
    if plan.embedding:
        layer = LoRAEmbedding.from_embedding(module, plan.rank, **kwargs)
    else:
        layer = LoRALinear.from_linear(module, plan.rank, **kwargs)
    if adapter_name != "default":  # the constructors name their first adapter "default"
        layer.add_adapter(adapter_name, plan.rank, **kwargs)
        layer.delete_adapter("default")
    return layer


def _apply(model: nn.Module, plans: list[_Planned], config: dict[str, Any], adapter_name: str) -> None:
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_rslora = bool(config.get("use_rslora", False))
    undo: list[Callable[[], None]] = []
    try:
        for plan in plans:
            module = model.get_submodule(plan.module_path)
            if _lora_pair(module, adapter_name) is None:
                if _is_lora_linear(module) or _is_lora_embedding(module):
                    module.add_adapter(
                        adapter_name, plan.rank, alpha=plan.alpha, dropout=dropout, use_rslora=use_rslora
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
            lora_a, lora_b = _lora_pair(module, adapter_name)
            old = (lora_a.detach().clone(), lora_b.detach().clone())
            undo.append(lambda a=lora_a, b=lora_b, o=old: (a.data.copy_(o[0]), b.data.copy_(o[1])))
            with torch.no_grad():
                lora_a.copy_(plan.lora_a.to(dtype=lora_a.dtype, device=lora_a.device))
                lora_b.copy_(plan.lora_b.to(dtype=lora_b.dtype, device=lora_b.device))
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
    FileNotFoundError
        If the directory, its config or its weights are missing.
    ValueError
        (:class:`AdapterCheckpointError`) naming the key: a wrong base model (missing module, shape mismatch),
        a rank that disagrees with the config, a missing ``lora_A``/``lora_B`` partner, a truncated or corrupt
        file, non-finite values. Every tensor is checked before the model is touched, so on error the model is
        unchanged.

    Notes
    -----
    Ranks come from the tensor shapes and are checked against ``r`` / ``rank_pattern``; alphas come from
    ``lora_alpha`` / ``alpha_pattern`` (PEFT's pattern matching). The whole config, including fields lowrank
    does not use, is kept on the model and written back by :func:`save_adapter`. An adapter added to layers
    that already hold other adapters is not activated (as in PEFT); use the layers' ``set_adapter``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: adapter directory {path!r} does not exist")
    config = _read_config(path)
    tensors, source = _read_tensors(path)
    plans = _plan(model, tensors, config, adapter_name, inject, strict, source)
    _apply(model, plans, config, adapter_name)
    _remember_config(model, adapter_name, config)
    return model


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
        ``adapter_params``/``adapter_bytes`` (the ``lora_A``/``lora_B`` factors, what :func:`save_adapter`
        writes) and ``base_params``/``base_bytes`` (every other parameter, shared ones counted once), with
        ``ratio`` = adapter bytes / base bytes. A rank-``r`` adapter of an ``m x n`` layer stores
        ``r (m + n)`` numbers instead of ``m n``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapter_ids: set[int] = set()
    found = False
    for module in model.modules():
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
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
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
        if isinstance(getattr(m, attr, None), nn.ParameterDict)
        for p in getattr(m, attr).values()
    }
    for p in model.parameters():  # parameters() yields shared parameters once
        if id(p) in adapter_ids:
            adapter_params += p.numel()
            adapter_bytes += p.numel() * p.element_size()
        elif id(p) not in all_adapter_ids:
            base_params += p.numel()
            base_bytes += p.numel() * p.element_size()
    return AdapterSize(adapter_params, adapter_bytes, base_params, base_bytes)
