"""PEFT's adapter format: file and key names, the ``adapter_config.json`` fields and their validation, and
PEFT's rules for which modules a config's ``target_modules`` / ``rank_pattern`` / ``layers_to_transform``
select (matched against PEFT 0.21's own functions in tests/test_checkpoint.py).

:mod:`lowrank.lora.checkpoint` reads and writes adapters with these; :mod:`lowrank.cli` builds configs with
:func:`build_peft_config`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."


def key_names(module_path: str, embedding: bool) -> tuple[str, str]:
    base = KEY_PREFIX + module_path
    if embedding:
        return base + ".lora_embedding_A", base + ".lora_embedding_B"
    return base + ".lora_A.weight", base + ".lora_B.weight"


# ----------------------------------------------------------------------------------------------------
# PEFT config helpers
# ----------------------------------------------------------------------------------------------------


def pattern_value(patterns: dict[str, Any] | None, module_path: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``, PEFT 0.21).

    The first key ``k`` (in dict order) for which ``re.match(r"(.*\\.)?(k)$", module_path)`` succeeds gives
    the value; otherwise ``default``. A plain key is therefore a dotted *suffix* (``"foo"`` also hits
    ``"bar.foo"``); ``"^foo"`` hits the top-level ``foo`` only.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _layer_index_ok(config: dict[str, Any], module_path: str) -> bool:
    """PEFT's ``layers_to_transform`` / ``layers_pattern`` filter (for list ``target_modules`` only)."""
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    layers_pattern = config.get("layers_pattern")
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_path)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == indexes if isinstance(indexes, int) else index in indexes


def matches_targets(config: dict[str, Any], module_path: str) -> bool:
    """Whether PEFT puts a LoRA layer on ``module_path``: ``check_target_module_exists`` of PEFT 0.21.

    ``exclude_modules`` (a full-match regex, or names/dotted suffixes) and ``modules_to_save`` (any module at
    or under a name ``m``: ``(^|.*\\.)m($|\\..*)``) win; then ``target_modules`` as a string is a full-match
    regex, as a list an exact name or dotted suffix, filtered by ``layers_to_transform``/``layers_pattern``.
    """
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module_path):
                return False
        elif module_path in excluded or any(module_path.endswith("." + e) for e in excluded):
            return False
    for saved in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){saved}($|\..*)", module_path):
            return False
    targets = config.get("target_modules")
    if not targets:
        return False
    if (
        targets == "all-linear"
    ):  # PEFT's shorthand (every linear layer but the output head): not narrowed here
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_path) is not None
    if module_path in targets:
        return True
    return any(module_path.endswith("." + t) for t in targets) and _layer_index_ok(config, module_path)


def _pattern_key(module_path: str, universe: Iterable[str]) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that PEFT's rule matches for ``module_path`` alone.

    The plain path when no other module of ``universe`` ends with it (readable, and what PEFT itself
    writes), else PEFT's documented anchored form ``"^" + re.escape(path)``.
    """
    if all(u == module_path for u in universe if re.match(rf"(.*\.)?({module_path})$", u)):
        return module_path
    return "^" + re.escape(module_path)


def _target_field(paths: Sequence[str], universe: Iterable[str]) -> list[str] | str:
    """``target_modules`` selecting exactly ``paths`` among ``universe`` under PEFT's rules.

    A sorted list of the full paths when list semantics (exact name or dotted suffix) select no other module
    of ``universe``; else a full-match regex of the escaped paths (PEFT then uses ``re.fullmatch``).
    """
    chosen = set(paths)
    listed = sorted(chosen)
    extra = [u for u in universe if u not in chosen and any(u.endswith("." + p) for p in listed)]
    if not extra:
        return listed
    return "^(?:" + "|".join(re.escape(p) for p in listed) + ")$"


def _most_common(values: Iterable[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def build_peft_config(
    ranks: dict[str, int],
    alphas: dict[str, int | float],
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    dropout: float = 0.0,
    base: dict[str, Any] | None = None,
    universe: Iterable[str] | None = None,
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict for layers with the given per-module ranks and alphas.

    ``r`` / ``lora_alpha`` are the most common values; layers that differ go into ``rank_pattern`` /
    ``alpha_pattern``. Every pattern field is written so that PEFT's matching rules (PEFT 0.21:
    ``check_target_module_exists``, ``get_pattern_key``) select exactly the adapted modules among
    ``universe`` (every module path of the model; default: the adapted paths): pattern keys are full module
    paths, anchored as ``"^" + re.escape(path)`` where the plain path would also hit a module it ends
    (``"foo"`` hits ``"bar.foo"``); ``target_modules`` is the list of full paths, or a full-match regex when
    a list entry would also select an unadapted module by suffix. Fields of ``base`` (a config read earlier)
    are kept unless overridden.
    """
    names = list(universe) if universe is not None else list(ranks)
    names = sorted(set(names) | set(ranks))
    r = _most_common(ranks.values())
    alpha = _most_common(a for p, a in alphas.items() if ranks[p] == r)
    config = dict(base or {})
    config.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {_pattern_key(p, names): k for p, k in ranks.items() if k != r},
            "alpha_pattern": {_pattern_key(p, names): a for p, a in alphas.items() if a != alpha},
            "target_modules": _target_field(list(ranks), names),
            "lora_dropout": dropout,
            "use_rslora": use_rslora,
            "fan_in_fan_out": False,
            "bias": "none",
            "use_dora": use_dora,
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


# Written into the weights file's metadata: the exact text of the adapter_config.json saved with it.


class AdapterCheckpointError(ValueError):
    """A checkpoint that does not fit the model or cannot be read; the message names the key or file."""


def read_config(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {path!r} (not a PEFT adapter directory)")
    try:
        with open(config_file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise AdapterCheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    return config_from_text(text, config_file)


def config_from_text(text: str, config_file: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterCheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterCheckpointError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}, only LORA is read"
        )
    for field, ok, meaning in [
        ("fan_in_fan_out", lambda v: isinstance(v, bool), "fan_in_fan_out (must be true or false)"),
        ("bias", lambda v: v in (None, "none", "all", "lora_only"), "must be 'none', 'all' or 'lora_only'"),
        ("lora_bias", lambda v: not v, "lora_bias"),
        ("layer_replication", lambda v: not v, "layer_replication"),
    ]:
        if field in config and not ok(config[field]):
            raise AdapterCheckpointError(
                f"{config_file}: {field}={config[field]!r} ({meaning}) is not supported"
            )
    _check_config_values(config, config_file)
    return config


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _check_regex(config_file: str, field: str, pattern: str, template: str = "{}") -> None:
    try:
        re.compile(template.format(pattern))
    except re.error as exc:
        raise AdapterCheckpointError(
            f"{config_file}: {field} holds {pattern!r}, not a valid regular expression ({exc})"
        ) from None


def _check_config_values(config: dict[str, Any], config_file: str) -> None:
    """Every field lowrank interprets must have PEFT's type (``LoraConfig``, PEFT 0.21); else ValueError.

    JSON ``true``/``false`` only for booleans: PEFT keeps a string such as ``"no"`` as is, which Python then
    treats as true, so such a value is refused rather than guessed.
    """

    def bad(field: str, want: str) -> AdapterCheckpointError:
        return AdapterCheckpointError(f"{config_file}: {field} must be {want}, got {config[field]!r}")

    def given(field: str) -> bool:
        return config.get(field) is not None

    if given("r") and not (_is_int(config["r"]) and config["r"] > 0):
        raise bad("r", "a positive integer")
    if given("lora_alpha") and not _is_positive_number(config["lora_alpha"]):
        raise bad("lora_alpha", "a positive finite number")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (
        isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0
    ):
        raise bad("lora_dropout", "a number in [0, 1)")
    for field in ("use_rslora", "use_dora"):
        if given(field) and not isinstance(config[field], bool):
            raise bad(field, "true or false (a JSON boolean)")
    for field, ok, want in (
        ("rank_pattern", _is_int, "positive integers"),
        ("alpha_pattern", _is_positive_number, "positive finite numbers"),
    ):
        table = config.get(field)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise bad(field, f"an object mapping module-name patterns to {want}")
        for key, value in table.items():
            if not ok(value) or (field == "rank_pattern" and value <= 0):
                raise AdapterCheckpointError(
                    f"{config_file}: {field}[{key!r}] must be one of {want}, got {value!r}"
                )
            _check_regex(config_file, field, key, r"(.*\.)?({})$")
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            _check_regex(config_file, field, value)
        elif not _is_str_list(value):
            raise bad(field, "a regular expression (string) or a list of module names")
    saved = config.get("modules_to_save")
    if saved is not None:
        if not _is_str_list(saved):
            raise bad("modules_to_save", "a list of module names")
        for name in saved:
            _check_regex(config_file, "modules_to_save", name, r"(^|.*\.){}($|\..*)")
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        (_is_int(layers) and layers >= 0)
        or (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers))
    ):
        raise bad("layers_to_transform", "a non-negative integer or a list of them")
    pattern = config.get("layers_pattern")
    if pattern is not None:
        if not (isinstance(pattern, str) or _is_str_list(pattern)):
            raise bad("layers_pattern", "a string or a list of strings")
        for p in [pattern] if isinstance(pattern, str) else pattern:
            _check_regex(config_file, "layers_pattern", p)
    if isinstance(config.get("target_modules"), str) and (layers is not None or pattern is not None):
        raise AdapterCheckpointError(
            f"{config_file}: layers_to_transform / layers_pattern cannot go with a string (regex) "
            "target_modules (PEFT refuses this config too)"
        )


# Config fields that give the weights their meaning: a torn save shows as a difference in one of them.
MEANINGFUL_FIELDS = (
    "use_dora",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)
