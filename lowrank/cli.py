"""The ``lowrank`` command line: ``extract``, ``compress`` and ``info``.

``lowrank extract BASE TUNED --rank R --out DIR``
    LoRA extraction from a full fine-tune: for each matching 2-D weight, the best rank-``R`` approximation of
    ``tuned - base`` (truncated SVD, Eckart–Young–Mirsky; computed by :func:`lowrank.rsvd`) is written as a
    PEFT adapter (``B = U sqrt(S)``, ``A = sqrt(S) Vh``, ``lora_alpha = r`` so the scaling is 1).
    ``--rank auto --tol T`` picks, per layer, the smallest rank whose relative Frobenius error is at most
    ``T`` (randQB_EI fixed-precision mode, Yu, Gu & Li 2018), written as PEFT's ``rank_pattern``.
    GPT-2-style checkpoints store ``Conv1D`` weights as (in, out): ``--fan-in-fan-out auto`` (the default)
    reads ``config.json`` beside the checkpoint and, for the model types whose transformers code uses
    ``Conv1D`` (``CONV1D_MODEL_TYPES``), factors ``delta.T`` of their ``c_attn`` / ``q_attn`` / ``c_proj`` /
    ``c_fc`` weights, so the adapter has PEFT's ``nn.Linear`` layout (``lora_A`` (r, in), ``lora_B``
    (out, r)) and ``fan_in_fan_out: true``; ``--fan-in-fan-out REGEX`` names such modules explicitly,
    ``none`` treats every weight as (out, in).
``lowrank compress CKPT --rank R | --tol T --out OUT``
    Replaces matching 2-D weights ``W`` of a checkpoint by factors ``W ~= B @ A`` stored as ``<name>.B`` and
    ``<name>.A`` in the stored layout (a Conv1D's (in, out) weight gives B (in, r), A (r, out)); other
    tensors are copied. A layer is kept dense when its factors would not be smaller.
``lowrank extract|compress ... --budget SIZE | --budget-params N``
    One size budget for all layers (bytes in the stored dtype, e.g. ``40MiB``, or parameters): per-layer
    ranks that minimise the total squared Frobenius error within it (:func:`lowrank.allocate_ranks`), from
    each layer's spectrum (exact SVD when the rank allowed is at least half the layer's, else randomized).
``lowrank info DIR | FILE``
    An adapter's config, per-layer ranks, targets and size; for files written by this tool, each layer's
    rank and achieved relative error (worst first) and the totals.

Every file written here carries, in its safetensors metadata (``lowrank.layers``, JSON), each factored
layer's rank, shape, ``||D||_F`` and achieved relative Frobenius error ``||D - B A||_F / ||D||_F``.

Checkpoints are read tensor by tensor with ``safetensors.safe_open`` (memory-mapped), from a file or a
directory (its ``model.safetensors.index.json`` shards, else its ``model.safetensors``, else every
``*.safetensors`` file but an ``adapter_model.safetensors``), so memory stays near one tensor (plus, for
``compress``, the factors written so far).
User mistakes print one line on stderr and exit with status 2 (an internal error: one line, status 1).
Progress bars use tqdm when it is installed (optional; without it the per-layer lines alone are printed).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

# Module names treated as embeddings (PEFT's lora_embedding_A/B layout) when --target selects them.
EMBEDDING_NAME = re.compile(r"(^|\.)(embed\w*|wte|wpe|word_embeddings)$")

# config.json model types whose transformers implementation uses Conv1D (weight stored (in, out)), and the
# module names of those layers: what `extract --fan-in-fan-out auto` treats as (in, out).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_NAME = r"(^|\.)(c_attn|q_attn|c_proj|c_fc)$"


class CLIError(Exception):
    """A user mistake: reported as one line on stderr, exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise CLIError(f"{self.prog}: {message} (see --help)")


# --------------------------------------------------------------------------------------------------------
# Reading checkpoints tensor by tensor
# --------------------------------------------------------------------------------------------------------


class TensorSource:
    """The tensors of a safetensors checkpoint (one file, or a directory of shards), read one at a time."""

    def __init__(self, path: str, label: str) -> None:
        from safetensors import SafetensorError, safe_open

        self.path, self.label = path, label
        if not os.path.exists(path):
            raise CLIError(f"{label} {path!r}: no such file or directory")
        listed: dict[str, str] | None = None  # tensor -> shard file, from an index
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isdir(path):
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                    root = os.path.normpath(os.path.abspath(path))
                    for v in set(weight_map.values()):
                        # a shard named outside the folder ('../x', '/abs'): checked by name, so that a
                        # Hugging Face cache snapshot's symlinks (into ../../blobs) still read
                        target = os.path.normpath(os.path.join(root, v))
                        if os.path.isabs(v) or os.path.commonpath([root, target]) != root:
                            raise CLIError(
                                f"{label} {index!r}: the index names shard {v!r}, outside the checkpoint "
                                "folder; refusing to read it"
                            )
                    files = sorted({os.path.join(path, v) for v in weight_map.values()})
                    listed = {name: os.path.join(path, v) for name, v in weight_map.items()}
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CLIError(f"{label} {index!r}: unreadable shard index ({exc})") from None
            elif os.path.isfile(os.path.join(path, "model.safetensors")):
                files = [os.path.join(path, "model.safetensors")]  # what transformers loads
            else:
                # shards without an index; never an adapter's weights saved beside the model
                files = sorted(
                    f
                    for f in glob.glob(os.path.join(path, "*.safetensors"))
                    if os.path.basename(f) != "adapter_model.safetensors"
                )
            if not files:
                pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
                hint = " (only pickle-based .bin/.pt files, which lowrank does not read)" if pickled else ""
                raise CLIError(f"{label} {path!r}: no .safetensors files{hint}")
        else:
            files = [path]
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._alias: dict[str, str] = {}  # a name this checkpoint does not store -> the tensor it shares
        for file in files:
            if not os.path.isfile(file):
                raise CLIError(f"{label} {file!r}: shard listed in the index is missing")
            try:
                handle = safe_open(file, framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CLIError(f"{label} {file!r}: not a readable safetensors file ({exc})") from None
            self._handles[file] = handle
            for name in handle.keys():
                if name in self._where:
                    raise CLIError(f"{label}: tensor {name!r} appears in two shards")
                self._where[name] = file
        # an index naming a tensor its shard does not hold: a shard from another download or revision, or an
        # interrupted one; transformers then fails on the missing key, and a compressed copy would lack it
        for name, file in (listed or {}).items():
            if self._where.get(name) != file:
                raise CLIError(
                    f"{label} {index!r}: the index maps {name!r} to {os.path.basename(file)!r}, which does "
                    "not hold it (shards from another revision, or an incomplete download?)"
                )

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the checkpoint's files (the first file's value where shards differ)."""
        merged: dict[str, str] = {}
        for handle in self._handles.values():
            for key, value in (handle.metadata() or {}).items():
                merged.setdefault(key, value)
        return merged

    def names(self) -> list[str]:
        return list(self._where) + [name for name in self._alias if name not in self._where]

    def alias(self, name: str, stored: str) -> None:
        """Read ``name`` (not stored: a tied weight) as the stored tensor ``stored``."""
        self._alias[name] = stored

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._alias

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._alias.get(name, name)
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        from lowrank.io import DTYPE_FROM_CODE

        name = self._alias.get(name, name)
        code = self._handles[self._where[name]].get_slice(name).get_dtype()
        if code not in DTYPE_FROM_CODE:
            raise CLIError(f"{self.label}: tensor {name!r} has unsupported dtype {code}")
        return DTYPE_FROM_CODE[code]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        name = self._alias.get(name, name)
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CLIError(f"{self.label}: cannot read tensor {name!r} ({exc})") from None


def _compile_target(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CLIError(f"--target {pattern!r}: invalid regular expression ({exc})") from None


def _select(source: TensorSource, target: re.Pattern[str] | None, *, embeddings: bool) -> list[str]:
    """Names of the ``<module>.weight`` tensors to factor.

    With ``--target``, every ``.weight`` whose module path the regex matches (``re.search``) and that is a
    non-empty 2-D floating tensor; matching tensors that cannot be factored (1-D norms, integer buffers,
    zero-size weights) are skipped and counted on stderr. Without it, all non-empty 2-D floating weights are
    taken except embeddings (``EMBEDDING_NAME``). Raises CLIError when nothing 2-D is selected.
    """
    chosen = []
    skipped: list[str] = []
    for name in source.names():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if target is not None:
            if not target.search(module):
                continue
            shape, dtype = source.shape(name), source.dtype(name)
            if len(shape) != 2 or not dtype.is_floating_point or 0 in shape:
                skipped.append(f"{name!r} ({'x'.join(map(str, shape)) or 'scalar'} {dtype})")
                continue
        elif (
            len(source.shape(name)) != 2
            or not source.dtype(name).is_floating_point
            or 0 in source.shape(name)  # zero-size: nothing to factor, copied as it is
        ):
            continue
        elif not embeddings and EMBEDDING_NAME.search(module):
            continue
        chosen.append(name)
    if not chosen:
        what = f"--target {target.pattern!r}" if target is not None else "the default selection"
        also = (
            f" ({len(skipped)} matching tensors are not 2-D float weights, e.g. {skipped[0]})"
            if skipped
            else ""
        )
        raise CLIError(f"{source.label} {source.path!r}: no 2-D weight tensors match {what}{also}")
    if skipped:
        print(
            f"lowrank: note: skipped {len(skipped)} tensor(s) matching --target that are not non-empty 2-D "
            f"float weights and cannot be factored (e.g. {skipped[0]})",
            file=sys.stderr,
        )
    return chosen


def _progress(items: Sequence[str], desc: str) -> Iterable[str]:
    """A progress bar on stderr with tqdm when it is installed (optional: ``pip install tqdm``), else none."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="layer", file=sys.stderr, disable=None, leave=False)


def _write_line(text: str) -> None:
    """Print a result line on stdout without breaking a running tqdm bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(text, flush=True)
        return
    tqdm.write(text, file=sys.stdout)


def _note(text: str) -> None:
    print(f"lowrank: note: {text}", file=sys.stderr, flush=True)


def _check_finite(source: TensorSource, name: str, tensor: torch.Tensor) -> None:
    # One reduction, no boolean temporary: a finite sum means finite entries (a NaN or an infinity makes
    # the sum NaN/inf); only a non-finite sum (also reached by overflow of huge finite values) needs the
    # element-wise count.
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CLIError(
            f"{source.label} tensor {name!r} holds {bad} NaN or infinite value(s); it cannot be factored"
        )


def _module_paths(names: Iterable[str]) -> set[str]:
    """Every module path (each dotted prefix) of the tensor names: what PEFT would see as modules."""
    paths: set[str] = set()
    for name in names:
        parts = name.split(".")[:-1]
        paths.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return paths


# Same-shape layers are factored together in one batched SVD call (the engine takes (..., m, n)); a
# group holds at most this many layers and bytes of deltas, so peak memory stays a few layers.
GROUP_LAYERS = 8
GROUP_BYTES = 256 << 20


class _LayerDelta(NamedTuple):
    name: str
    module: str
    delta: torch.Tensor  # (m, n) in the working dtype; embeddings transposed to PEFT's (dim, num)
    out_dtype: torch.dtype
    embedding: bool
    norm_sq: float


class _Bar:
    """A per-layer progress bar on stderr with tqdm when it is installed, else nothing."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, disable=None, leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _delta_groups(
    base: TensorSource | None,
    tuned: TensorSource,
    names: list[str],
    max_layers: int = GROUP_LAYERS,
    *,
    peft_embeddings: bool = True,
    conv1d: re.Pattern[str] | None = None,
) -> Iterator[list[_LayerDelta]]:
    """The deltas ``TUNED - BASE`` of ``names`` (the weights themselves when ``base`` is None), in groups
    of one shape, stored dtype and kind.

    Each checkpoint is read once, tensor by tensor (memory-mapped); a group is yielded as soon as it is
    full (``max_layers`` layers or ``GROUP_BYTES``) and the remainder at the end, so at most one partial
    group per shape is held. Computed in fp32 (fp64 for fp64 checkpoints). With ``peft_embeddings``,
    embedding deltas are transposed to PEFT's ``(dim, num)`` layout, and the modules ``conv1d`` matches
    (weights stored ``(in, out)``) to ``(out, in)``.
    """
    from lowrank.lora.init import same_shape_groups

    return same_shape_groups(
        _deltas(base, tuned, names, peft_embeddings, conv1d),
        key=lambda layer: (tuple(layer.delta.shape), layer.out_dtype, layer.embedding),
        size=lambda layer: layer.delta.numel() * layer.delta.element_size(),
        max_items=max_layers,
        max_bytes=GROUP_BYTES,
    )


def _deltas(
    base: TensorSource | None,
    tuned: TensorSource,
    names: list[str],
    peft_embeddings: bool,
    conv1d: re.Pattern[str] | None,
) -> Iterator[_LayerDelta]:
    """The deltas of ``names`` one by one, read from the checkpoints when needed (see _delta_groups)."""
    for name in names:
        module = name[: -len(".weight")]
        out_dtype = tuned.dtype(name)
        work = _work_dtype(out_dtype)
        delta = tuned.get(name).to(work)
        if base is not None:
            delta = delta - base.get(name).to(work)
        if not bool(torch.isfinite(delta.sum(dtype=torch.float64))):
            _check_finite(tuned, name, tuned.get(name))
            if base is not None:
                _check_finite(base, name, base.get(name))
                raise CLIError(f"the delta of {name!r} overflows {work} (TUNED - BASE is not finite)")
        embedding = peft_embeddings and EMBEDDING_NAME.search(module) is not None
        if embedding or _is_conv1d_name(conv1d, module):
            # PEFT's embedding update is (B A)^T with B (dim, r), A (r, num); a Conv1D's is (B A)^T with
            # B (out, r), A (r, in) for a weight stored (in, out).
            delta = delta.T
        norm_sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        yield _LayerDelta(name, module, delta, out_dtype, embedding, norm_sq)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _balanced_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def _factor(matrix: torch.Tensor, rank: int | None, tol: float | None, seed: int) -> tuple[torch.Tensor, ...]:
    """``(B, A)`` with ``matrix ~= B @ A`` of rank ``rank`` (clamped) or the smallest rank meeting ``tol``."""
    from lowrank.svd import rsvd

    if tol is not None:
        # Fixed precision (randQB_EI) bounds the rank; a fixed-rank rsvd at that rank, with power iterations,
        # then gives better leading triplets. Both are SVDs of a projection Q Q^T A, so truncating to rank k
        # has squared error ||A||^2 - sum_{i<k} S_i^2: keep the smallest k within tol.
        total = float(matrix.double().pow(2).sum())
        bound = tol * tol * total
        first = rsvd(matrix, tol=tol, seed=seed)
        second = rsvd(matrix, k=len(first.S), seed=seed)
        U, S, Vh = second if total - float(second.S.double().pow(2).sum()) <= bound else first
        ok = torch.nonzero(total - torch.cumsum(S.double().pow(2), 0) <= bound)
        k = int(ok[0, 0]) + 1 if len(ok) else len(S)
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    else:
        U, S, Vh = rsvd(matrix, k=min(rank, *matrix.shape), seed=seed)
    return _balanced_factors(U, S, Vh)


def _factor_batch(
    deltas: list[torch.Tensor], rank: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(B, A)]`` of rank ``min(rank, m, n)`` for same-shape matrices, by one batched :func:`rsvd` call."""
    if len(deltas) == 1:
        return [_factor(deltas[0], rank, None, seed)]
    from lowrank.svd import rsvd

    stack = torch.stack(deltas)
    U, S, Vh = rsvd(stack, k=min(rank, *stack.shape[1:]), seed=seed)
    del stack
    return [_balanced_factors(U[i], S[i], Vh[i]) for i in range(len(deltas))]


def _relative_error(matrix: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """``||M - B A||_F / ||M||_F`` with both norms of ``(.) / max|M|`` in float64: in the weights' fp32 the
    sums of squares overflowed for entries beyond ~1e19 (the error recorded as NaN) and underflowed below
    ~1e-19 (recorded as 0 for a rank-2 truncation 37% off)."""
    big = float(matrix.abs().amax())
    if not big > 0:
        return 0.0
    norm = float(torch.linalg.vector_norm(matrix.double() / big))
    return float(torch.linalg.vector_norm((matrix - B @ A).double() / big)) / norm


def _spectral_factors(matrix: torch.Tensor, k_cap: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``(U, S, Vh)`` of the leading ``k_cap`` triplets of ``matrix`` (``(m, n)`` or a batch ``(b, m, n)``):
    exact SVD when ``k_cap`` is at least half the smaller side (where a randomized SVD saves nothing),
    else the randomized SVD (whose trailing values near ``k_cap`` may be slightly underestimated; the
    allocation then errs towards other layers)."""
    from lowrank.svd import rsvd

    if 2 * k_cap >= min(matrix.shape[-2:]):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[..., :k_cap], S[..., :k_cap], Vh[..., :k_cap, :]
    U, S, Vh = rsvd(matrix, k=k_cap, seed=seed)
    return U, S, Vh


def _tail_error(norm_sq: float, resid_sq: float, S: torch.Tensor, k: int) -> float:
    """Relative error of ``U_k S_k Vh_k`` from the residual at the full computed rank ``K = len(S)``.

    ``||D - U_k S_k Vh_k||_F^2 = ||D - U S Vh||_F^2 + sum_{k <= i < K} S_i^2`` for the truncations of an
    SVD and of a randomized SVD's projection (``U_k S_k Vh_k = U_k U_k^T D`` there): a sum of positive
    terms, so no cancellation however small the error (``resid_sq`` is computed directly from ``D``).
    """
    if norm_sq <= 0:
        return 0.0
    dropped = float(S[k:].double().pow(2).sum())
    return math.sqrt(min(resid_sq + dropped, norm_sq) / norm_sq)


def _budget_ranks(
    spectra: list[torch.Tensor], costs: list[float], budget: int, unit: str, min_rank: int
) -> list[int]:
    """Per-layer ranks within ``budget`` (each layer at least ``min_rank``), by :func:`allocate_ranks`."""
    from lowrank.budget import allocate_ranks

    floor_cost = min_rank * sum(costs)
    if floor_cost > budget:
        raise CLIError(
            f"the budget of {_human_size(budget, unit)} is below the {_human_size(floor_cost, unit)} "
            f"that rank {min_rank} for each of the {len(costs)} selected layers takes"
        )
    result = allocate_ranks([s[min_rank:] for s in spectra], budget - floor_cost, costs)
    return [min_rank + k for k in result.ranks]


def _layer_record(shape: tuple[int, ...], rank: int, norm: float, error: float) -> dict[str, Any]:
    return {"shape": list(shape), "rank": rank, "norm": norm, "rel_error": error}


def _human_size(n: float, unit: str) -> str:
    return _human_bytes(int(n)) if unit == "bytes" else f"{int(n):,} parameters"


_SIZE_SUFFIX = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _parse_size(text: str) -> int:
    """``40MiB``, ``1.5GB``, ``2e6``, ``300k`` -> a positive whole number (of bytes or parameters)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    suffix = match[2].lower() if match else None
    if match is None or suffix not in _SIZE_SUFFIX:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 40MiB, 1.5GB, 250k or 1000000, got {text!r}"
        )
    value = float(match[1]) * _SIZE_SUFFIX[suffix]
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    whole = round(value)
    if abs(value - whole) > 1e-9 * value:  # 0.3k is 300 to rounding; 1.5 (parameters or bytes) is no count
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes or parameters, got {text!r}")
    return int(whole)


def _budget_of(args: argparse.Namespace) -> tuple[int, str] | None:
    """``(budget, unit)`` from --budget (bytes) or --budget-params, or None."""
    if args.budget is not None and args.budget_params is not None:
        raise CLIError(f"{args.command}: pass --budget SIZE or --budget-params N, not both")
    if args.budget is not None:
        return args.budget, "bytes"
    if args.budget_params is not None:
        return args.budget_params, "params"
    return None


def _rank_cost(shape: tuple[int, ...], dtype: torch.dtype, unit: str) -> int:
    """Size of one rank of ``B (m, r) @ A (r, n)``: ``m + n`` parameters, times the element size in bytes."""
    params = shape[0] + shape[1]
    return params * torch.empty((), dtype=dtype).element_size() if unit == "bytes" else params


def _metadata(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {"lowrank.layers": json.dumps(records, sort_keys=True)}


def _human_bytes(n: int) -> str:
    from lowrank.lora.checkpoint import _human_bytes as human

    return human(n)


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------


def _parse_rank(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _parse_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value


def _parse_tol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _conv1d_pattern(mode: str, sources: Sequence[TensorSource]) -> re.Pattern[str] | None:
    """Which module paths hold (in, out) Conv1D weights: ``none``, a regex, or ``auto`` from config.json."""
    if mode == "none":
        return None
    if mode != "auto":
        try:
            return re.compile(mode)
        except re.error as exc:
            raise CLIError(f"--fan-in-fan-out {mode!r}: invalid regular expression ({exc})") from None
    found = _read_config(sources)
    if found is None:
        return None
    config_file, config = found
    model_type = config.get("model_type")
    if model_type in CONV1D_MODEL_TYPES:
        _note(
            f"{config_file}: model_type {model_type!r} stores Conv1D weights as (in, out); factoring the "
            "transpose of those layers (--fan-in-fan-out none to turn this off)"
        )
        return re.compile(CONV1D_NAME)
    return None


def _check_out_path(out: str) -> None:
    """Refuse an empty ``--out`` (it names no path) before any work is done."""
    if not out.strip():
        raise CLIError(f"--out {out!r}: empty path; give the output file or folder")


def _check_out_dir(folder: str) -> None:
    """Refuse an output folder that cannot be one (an existing file on its path) or cannot be written (its
    nearest existing folder is not writable) before any work is done."""
    probe = os.path.abspath(folder or ".")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CLIError(f"--out: {probe!r} is a file, not a directory; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"--out: {probe!r} is not writable; choose another output path")


def cmd_extract(args: argparse.Namespace) -> int:
    from lowrank.lora.checkpoint import write_adapter_dir
    from lowrank.lora.peft_format import build_peft_config

    budget = _budget_of(args)
    if (args.rank is None) == (budget is None):
        raise CLIError(
            "extract: pass one of --rank R, --rank auto --tol T, --budget SIZE or --budget-params N"
        )
    if args.rank == "auto" and args.tol is None:
        raise CLIError("extract: --rank auto needs --tol T (the relative error allowed per layer)")
    if args.rank != "auto" and args.tol is not None:
        raise CLIError("extract: --tol goes with --rank auto; pass either --rank R or --rank auto --tol T")
    _check_out_path(args.out)
    _check_out_dir(args.out)  # before any reading or arithmetic
    base, tuned = TensorSource(args.base, "BASE"), TensorSource(args.tuned, "TUNED")
    _alias_tied_output(base, tuned)
    conv1d = _conv1d_pattern(args.fan_in_fan_out, (tuned, base))
    names = _select(tuned, _compile_target(args.target), embeddings=args.target is not None)
    for name in names:  # check everything that headers can tell before any arithmetic
        if name not in base:
            raise CLIError(f"tensor {name!r} is in TUNED but not in BASE (different models?)")
        if base.shape(name) != tuned.shape(name):
            raise CLIError(
                f"mismatched shapes for {name!r}: BASE {base.shape(name)} vs TUNED {tuned.shape(name)}"
            )
        if base.dtype(name) != tuned.dtype(name):
            _note(
                f"{name}: BASE stores {base.dtype(name)} and TUNED {tuned.dtype(name)}; the delta includes "
                "the rounding between the two formats"
            )

    tied = _tied_embedding(tuned, base, names)
    left_out = _changed_elsewhere(base, tuned, set(names))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    records: dict[str, dict[str, Any]] = {}
    total_captured = total_energy = 0.0
    low_rank = 0
    if budget is not None:
        tensors, ranks, records, total_captured, total_energy = _extract_budget(
            base, tuned, names, *budget, args.seed, conv1d, tied[1] if tied else None
        )
    bar = _Bar(0 if budget is not None else len(names), "extract")
    groups = (
        []
        if budget is not None
        else _delta_groups(base, tuned, names, 1 if args.rank == "auto" else GROUP_LAYERS, conv1d=conv1d)
    )
    for group in groups:
        bar.update(len(group))
        for layer in group:
            if layer.norm_sq == 0.0:
                _write_line(f"{layer.module:<48} {_shape(layer.delta)}  unchanged, skipped")
        group = [layer for layer in group if layer.norm_sq > 0.0]
        if not group:
            continue
        if args.rank == "auto":
            factors = [_factor(group[0].delta, None, args.tol, args.seed)]
        else:
            shape = tuple(group[0].delta.shape)
            if args.rank >= min(shape):
                _note(
                    f"{', '.join(layer.module for layer in group)}: --rank {args.rank} is not below "
                    f"min{shape} = {min(shape)}; kept at full rank {min(shape)} (the adapter is no smaller "
                    "than the dense delta)"
                )
            else:
                low_rank += len(group)
            factors = _factor_batch([layer.delta for layer in group], args.rank, args.seed)
        for layer, (B, A) in zip(group, factors):
            work = layer.delta.dtype
            error = _relative_error(
                layer.delta, B.to(layer.out_dtype).to(work), A.to(layer.out_dtype).to(work)
            )
            norm_sq = layer.norm_sq
            records[layer.module] = _layer_record(
                tuple(layer.delta.shape), int(B.shape[1]), math.sqrt(norm_sq), error
            )
            total_captured += (1.0 - error * error) * norm_sq
            total_energy += norm_sq
            ranks[layer.module] = int(B.shape[1])
            _add_layer(
                tensors, layer.module, layer.embedding, B, A, layer.out_dtype, _shape(layer.delta), error
            )
        del group, factors
    bar.close()
    if not ranks and total_energy > 0:
        raise CLIError("extract: the budget leaves no layer a rank (one rank of the smallest costs more)")
    if not ranks:
        raise CLIError("extract: every selected weight is identical in BASE and TUNED; nothing to extract")
    if budget is None and args.rank != "auto" and not low_rank:
        raise CLIError(
            f"extract: --rank {args.rank} is not below min(rows, columns) of any changed layer: nothing was "
            "factored to a lower rank; choose a smaller --rank (nothing written)"
        )
    if tied is not None:
        _tie_output_embedding(*tied, tensors, ranks, records)
    # lora_alpha = r: scaling 1, B @ A is the delta itself
    config = build_peft_config(ranks, dict(ranks), universe=_module_paths(tuned.names()))
    config["fan_in_fan_out"] = any(_is_conv1d_name(conv1d, m) for m in ranks)
    config["base_model_name_or_path"] = args.base_model_name or os.path.abspath(args.base)
    write_adapter_dir(args.out, tensors, config, _metadata(records))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_line(
        f"wrote {args.out}: {len(ranks)} layers, {_human_bytes(size)}, captured energy "
        f"{100 * total_captured / total_energy:.3f}% of the selected layers' delta"
    )
    if left_out:
        shown = ", ".join(left_out[:8]) + (f" and {len(left_out) - 8} more" if len(left_out) > 8 else "")
        _note(
            f"{len(left_out)} changed tensor(s) of TUNED are not in the adapter (not selected, or not 2-D "
            f"weights; a LoRA adapter cannot carry biases, norms or unselected layers): {shown}. The adapter "
            "on BASE does not reproduce TUNED there; select them with --target, or ship those tensors."
        )
    return 0


def _read_config(sources: Sequence[TensorSource]) -> tuple[str, dict[str, Any]] | None:
    """``(path, dict)`` of the first ``config.json`` beside one of ``sources``, or None."""
    for source in sources:
        folder = source.path if os.path.isdir(source.path) else os.path.dirname(os.path.abspath(source.path))
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            continue
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise CLIError(f"{config_file}: unreadable config ({exc})") from None
        if not isinstance(config, dict):
            raise CLIError(f"{config_file}: unreadable config (not a JSON object)")
        return config_file, config
    return None


# The output layer that transformers ties to the input embedding of a causal LM (not stored in the file).
TIED_OUTPUT = "lm_head"


def _tied_embedding(tuned: TensorSource, base: TensorSource, names: list[str]) -> tuple[str, str] | None:
    """``(config file, weight name)`` of the selected input embedding that the output layer shares, or None.

    A model with ``tie_word_embeddings`` (config.json; transformers' default when the key is absent) stores
    one matrix ``E`` (vocab, dim) for the input embedding and ``lm_head`` (``TIED_OUTPUT``), which is then
    absent from the file; a fine-tune changes both. The candidate is the selected embedding with
    ``vocab_size`` rows (when the config gives it).
    """
    found = _read_config((tuned, base))
    if found is None or TIED_OUTPUT + ".weight" in tuned:
        return None
    config_file, config = found
    if not config.get("tie_word_embeddings", True):
        return None
    vocab = config.get("vocab_size")
    known = isinstance(vocab, int) and not isinstance(vocab, bool)
    candidates = [
        name
        for name in names
        if EMBEDDING_NAME.search(name[: -len(".weight")]) and (not known or tuned.shape(name)[0] == vocab)
    ]
    if len(candidates) > 1:
        raise CLIError(
            f"{config_file}: tie_word_embeddings is set but {len(candidates)} selected embeddings could be "
            f"the tied one ({', '.join(candidates)}); narrow --target to the input embedding"
        )
    return (config_file, candidates[0]) if candidates else None


def _alias_tied_output(base: TensorSource, tuned: TensorSource) -> None:
    """One checkpoint ties ``lm_head`` to its input embedding (not stored), the other stores its own.

    The tied one (``tie_word_embeddings`` in the config.json beside it, no ``lm_head.weight`` stored) then
    reads ``lm_head.weight`` as its embedding of the other's ``lm_head`` shape, so the ``lm_head`` delta is
    TUNED's output layer minus BASE's, whichever of the two is tied: the adapter's ``lm_head`` update on the
    BASE model gives TUNED's output layer.
    """
    name = TIED_OUTPUT + ".weight"
    for tied, other, label in ((base, tuned, "BASE"), (tuned, base, "TUNED")):
        if name not in other or name in tied:
            continue
        found = _read_config((tied,))
        if found is None or not found[1].get("tie_word_embeddings", True):
            continue
        candidates = [
            n
            for n in tied.names()
            if n.endswith(".weight")
            and EMBEDDING_NAME.search(n[: -len(".weight")])
            and tied.shape(n) == other.shape(name)
        ]
        if len(candidates) == 1:
            tied.alias(name, candidates[0])
            _note(
                f"{found[0]}: {label} ties {name} to {candidates[0]} (not stored); the {TIED_OUTPUT} delta "
                "is TUNED's minus BASE's output layer"
            )


def _tie_output_embedding(
    config_file: str,
    name: str,
    tensors: dict[str, torch.Tensor],
    ranks: dict[str, int],
    records: dict[str, dict[str, Any]],
) -> None:
    """Give the tied output layer the embedding's update, so the adapter on BASE reproduces TUNED there.

    PEFT adapts modules, not parameters: an adapter on the embedding alone leaves ``lm_head`` at ``E_base``
    and the logits wrong. The ``lm_head`` LoRA gets the same factors transposed: the embedding's update is
    ``(B A)^T = A^T B^T`` with ``lora_embedding_B`` = B (dim, r), ``lora_embedding_A`` = A (r, vocab), so
    ``lora_B`` = A^T (vocab, r) and ``lora_A`` = B^T (r, dim). (``--budget`` counts these twice.)
    """
    module = name[: -len(".weight")]
    key = "base_model.model."
    if module not in ranks or TIED_OUTPUT in ranks or key + module + ".lora_embedding_A" not in tensors:
        return  # unchanged, or left out by the budget
    A = tensors[key + module + ".lora_embedding_A"]
    B = tensors[key + module + ".lora_embedding_B"]
    tensors[key + TIED_OUTPUT + ".lora_A.weight"] = B.T.contiguous()
    tensors[key + TIED_OUTPUT + ".lora_B.weight"] = A.T.contiguous()
    ranks[TIED_OUTPUT] = ranks[module]
    record = dict(records[module])
    record["shape"] = list(reversed(record["shape"]))
    records[TIED_OUTPUT] = record
    _note(
        f"{config_file}: tie_word_embeddings: {TIED_OUTPUT} shares {name}, so the adapter also targets "
        f"{TIED_OUTPUT} with the same update (an adapter on {module} alone leaves the logits at BASE)"
    )


def _changed_elsewhere(base: TensorSource, tuned: TensorSource, selected: set[str]) -> list[str]:
    """Tensors of TUNED outside ``selected`` that differ from BASE (or are absent there), each named with
    its relative change; one read of each (biases and norms are small; an unselected embedding is read
    once)."""
    changed = []
    for name in tuned.names():
        if name in selected:
            continue
        if name not in base or base.shape(name) != tuned.shape(name):
            changed.append(f"{name} (not in BASE with this shape)")
            continue
        new, old = tuned.get(name), base.get(name)
        if torch.equal(new, old):
            continue
        if not (new.is_floating_point() and old.is_floating_point()):
            changed.append(f"{name} ({new.dtype})")
            continue
        diff = torch.linalg.vector_norm((new.double() - old.double()).reshape(-1))
        norm = torch.linalg.vector_norm(old.double().reshape(-1))
        changed.append(f"{name} (rel. change {float(diff / norm) if norm > 0 else float('inf'):.2e})")
    return changed


def _is_conv1d_name(conv1d: re.Pattern[str] | None, module: str) -> bool:
    return conv1d is not None and conv1d.search(module) is not None


def _extract_budget(
    base: TensorSource,
    tuned: TensorSource,
    names: list[str],
    budget: int,
    unit: str,
    seed: int,
    conv1d: re.Pattern[str] | None = None,
    tied: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, dict[str, Any]], float, float]:
    """``extract --budget``: each delta's leading triplets in one pass, then the ranks within the budget.

    A layer's spectrum goes as far as the budget could ever give it (``budget // cost`` ranks, at most its
    smaller side); the triplets are kept so the checkpoints are read once. Memory: the kept triplets, each
    at most the budget's size. Errors from the residual at the computed rank plus the dropped values (see
    ``_tail_error``) for fp32/fp64 factors; for bf16/fp16 factors the delta is read again and the error of
    the stored (rounded) factors recorded, as the fixed-rank modes do.
    """
    kept = {}
    bar = _Bar(len(names), "spectra")
    for group in _delta_groups(base, tuned, names, conv1d=conv1d):
        bar.update(len(group))
        first = group[0]
        cost = _rank_cost(tuple(first.delta.shape), first.out_dtype, unit)
        k_cap = min(min(first.delta.shape), budget // cost)
        live = [layer for layer in group if layer.norm_sq > 0.0] if k_cap else []
        triplets = (
            _spectral_factors(torch.stack([layer.delta for layer in live]), k_cap, seed) if live else None
        )
        where = {id(layer): i for i, layer in enumerate(live)}
        for layer in group:
            if id(layer) in where:
                U, S, Vh = (t[where[id(layer)]] for t in triplets)
                resid = layer.delta - (U * S) @ Vh
                resid_sq = float(torch.linalg.vector_norm(resid, dtype=torch.float64) ** 2)
            else:
                U = Vh = S = layer.delta.new_zeros(0)
                resid_sq = layer.norm_sq
            shape = tuple(layer.delta.shape)
            kept[layer.name] = (
                layer.module,
                shape,
                layer.out_dtype,
                layer.embedding,
                layer.norm_sq,
                resid_sq,
                U,
                S,
                Vh,
            )
        del group, live, triplets
    bar.close()
    spectra = [kept[name][7] for name in names]
    # the tied embedding's factors are stored twice (for lm_head too): each of its ranks costs double
    costs = [_rank_cost(kept[name][1], kept[name][2], unit) * (2 if name == tied else 1) for name in names]
    allocation = _budget_ranks(spectra, costs, budget, unit, min_rank=0)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    records: dict[str, dict[str, Any]] = {}
    total_captured = total_energy = 0.0
    for name, k in zip(names, allocation):
        module, shape, out_dtype, embedding, norm_sq, resid_sq, U, S, Vh = kept.pop(name)
        shape_text = f"{shape[0]}x{shape[1]}".rjust(11)
        if norm_sq == 0.0:
            _write_line(f"{module:<48} {shape_text}  unchanged, skipped")
            continue
        total_energy += norm_sq
        if k == 0:
            _write_line(f"{module:<48} {shape_text}  rank    0  left out: the budget buys more elsewhere")
            continue
        B, A = _balanced_factors(U[:, :k], S[:k], Vh[:k])
        if _work_dtype(out_dtype) == out_dtype:
            error = _tail_error(norm_sq, resid_sq, S, k)
        else:  # fp16/bf16 factors: their rounding is part of the achieved error (the delta is read again)
            (layer,) = _deltas(base, tuned, [name], True, conv1d)
            work = layer.delta.dtype
            error = _relative_error(layer.delta, B.to(out_dtype).to(work), A.to(out_dtype).to(work))
            del layer
        total_captured += (1.0 - error * error) * norm_sq
        ranks[module] = k
        records[module] = _layer_record(shape, k, math.sqrt(norm_sq), error)
        _add_layer(tensors, module, embedding, B, A, out_dtype, shape_text, error)
    return tensors, ranks, records, total_captured, total_energy


def _add_layer(
    tensors: dict[str, torch.Tensor],
    module: str,
    embedding: bool,
    B: torch.Tensor,
    A: torch.Tensor,
    out_dtype: torch.dtype,
    shape_text: str,
    error: float,
) -> None:
    """Adds one layer's factors under PEFT's keys (embeddings: lora_embedding_A/B) and prints its line."""
    key = "base_model.model." + module
    names = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
    tensors[key + names[0]] = A.to(out_dtype).contiguous()
    tensors[key + names[1]] = B.to(out_dtype).contiguous()
    _write_line(
        f"{module:<48} {shape_text}  rank {B.shape[1]:>4}  energy {100 * (1 - error * error):7.3f}%  "
        f"rel.err {error:.3e}"
    )


def _shape(t: torch.Tensor) -> str:
    return f"{t.shape[0]}x{t.shape[1]}".rjust(11)


def cmd_compress(args: argparse.Namespace) -> int:
    from lowrank.io import TensorEntry, folder_for_write, write_safetensors

    budget = _budget_of(args)
    if (args.rank is not None) + (args.tol is not None) + (budget is not None) != 1:
        raise CLIError("compress: pass exactly one of --rank R, --tol T, --budget SIZE or --budget-params N")
    _check_out_path(args.out)
    out_file = args.out if args.out.endswith(".safetensors") else os.path.join(args.out, "model.safetensors")
    if os.path.isdir(out_file):
        raise CLIError(
            f"--out {args.out!r} is a directory; give a .safetensors file or a folder to write into"
        )
    _check_out_dir(os.path.dirname(out_file))  # before any reading or arithmetic
    source = TensorSource(args.ckpt, "CKPT")
    if os.path.exists(out_file) and any(os.path.samefile(out_file, f) for f in source._handles):
        raise CLIError(f"--out {args.out!r} is the input checkpoint; choose another path")
    names = set(_select(source, _compile_target(args.target), embeddings=args.target is not None))

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    records: dict[str, dict[str, Any]] = {}
    bytes_before = bytes_after = 0
    planned = _plan_compress_budget(source, sorted(names), *budget, args.seed) if budget is not None else {}
    fixed_rank = args.rank is not None
    bar = _Bar(len(names), "compress")
    groups = _delta_groups(
        None, source, sorted(names), GROUP_LAYERS if fixed_rank else 1, peft_embeddings=False
    )
    for group in groups:
        bar.update(len(group))
        if fixed_rank:
            batch = _factor_batch([layer.delta for layer in group], args.rank, args.seed)
        for i, layer in enumerate(group):
            name, work, weight_dtype = layer.name, layer.delta, layer.out_dtype
            if fixed_rank:
                B, A = batch[i]
            elif name in planned:
                B, A = planned.pop(name)
            elif budget is not None:  # the budget keeps it dense: factors of any rank would not be smaller
                B = work.new_zeros(work.shape[0], min(work.shape))
                A = work.new_zeros(min(work.shape), work.shape[1])
            else:
                B, A = _factor(work, None, args.tol, args.seed)
            rank = int(B.shape[1])
            m, n = work.shape
            itemsize = torch.empty((), dtype=weight_dtype).element_size()
            dense = m * n * itemsize
            factored = rank * (m + n) * itemsize
            bytes_before += dense
            if factored >= dense:
                bytes_after += dense
                why = (
                    f"--rank {args.rank} is not below min{tuple(work.shape)} = {min(m, n)}"
                    if fixed_rank and args.rank >= min(m, n)
                    else f"rank {rank} factors would take {rank * (m + n):,} numbers, the dense weight "
                    f"{m * n:,}"
                )
                _note(f"{name}: kept dense: {why}")
                _write_line(
                    f"{name:<52} {_shape(work)}  rank {rank:>4}  kept dense (factors would not be smaller)"
                )
                continue
            B, A = B.to(weight_dtype).contiguous(), A.to(weight_dtype).contiguous()
            error = _relative_error(work, B.to(work.dtype), A.to(work.dtype))
            records[layer.module] = _layer_record(tuple(work.shape), rank, math.sqrt(layer.norm_sq), error)
            factors[name] = (B, A)
            bytes_after += factored
            _write_line(
                f"{name:<52} {_shape(work)}  rank {rank:>4}  {_human_bytes(dense):>10} -> "
                f"{_human_bytes(factored):>10}  rel.err {error:.3e}"
            )
        del group
    bar.close()

    if not factors:
        raise CLIError(
            f"compress: no layer was factored: for each of the {len(names)} selected layers the factors "
            "would be no smaller than the dense weight (see the notes above); choose a smaller --rank or a "
            "larger --tol (nothing written)"
        )
    entries = []
    other_bytes = 0
    for name in source.names():
        if name in factors:
            B, A = factors[name]
            entries.append(TensorEntry(name + ".B", B.dtype, tuple(B.shape), lambda B=B: B))
            entries.append(TensorEntry(name + ".A", A.dtype, tuple(A.shape), lambda A=A: A))
        else:
            dtype, shape = source.dtype(name), source.shape(name)
            entries.append(TensorEntry(name, dtype, shape, lambda name=name: source.get(name)))
            if name not in names:
                other_bytes += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # the checkpoint's own metadata (training tool, license, model card fields) travels with its tensors;
    # the lowrank.* keys describe this file's factors and replace any a previous run left
    metadata = {k: v for k, v in source.metadata().items() if k != "format" and not k.startswith("lowrank.")}
    metadata.update({"lowrank.factorized": json.dumps(sorted(factors)), "lowrank.layout": "W = B @ A"})
    metadata.update(_metadata(records))
    with folder_for_write(os.path.dirname(os.path.abspath(out_file))):  # no empty folders left on failure
        write_safetensors(out_file, entries, metadata)
    before, after = bytes_before + other_bytes, bytes_after + other_bytes
    _write_line(
        f"wrote {out_file}: {len(factors)} of {len(names)} layers factored; "
        f"{_human_bytes(before)} -> {_human_bytes(after)} ({100 * after / before:.1f}%)"
    )
    return 0


def _plan_compress_budget(
    source: TensorSource, names: list[str], budget: int, unit: str, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``compress --budget``: ranks for the selected weights within the budget (each at least 1, and only
    as large as keeps its factors smaller than the dense weight), then their factors ``(B, A)``.

    The budget counts the factored layers' ``B`` and ``A``; a layer whose rank-1 factors would not be
    smaller than its dense weight stays dense, outside the budget. Each weight is read here for its
    spectrum; the triplets are kept, so the factors need no second SVD.
    """
    spectra, costs, kept, order = [], [], {}, []
    for name in _progress(names, "spectra"):
        shape, dtype = source.shape(name), source.dtype(name)
        m, n = shape
        dense_cap = (m * n - 1) // (m + n)  # factors of rank k are smaller than W iff k (m + n) < m n
        cost = _rank_cost(shape, dtype, unit)
        k_cap = min(m, n, dense_cap, budget // cost)
        if dense_cap == 0:
            continue
        if k_cap == 0:
            raise CLIError(
                f"the budget of {_human_size(budget, unit)} cannot give {name!r} {shape} even rank 1 "
                f"({_human_size(cost, unit)})"
            )
        weight = source.get(name)
        _check_finite(source, name, weight)
        work = weight.to(_work_dtype(weight.dtype))
        kept[name] = _spectral_factors(work, k_cap, seed)
        spectra.append(kept[name][1])
        costs.append(cost)
        order.append(name)
    ranks = _budget_ranks(spectra, costs, budget, unit, min_rank=1)
    planned = {}
    for name, k in zip(order, ranks):
        U, S, Vh = kept.pop(name)
        planned[name] = _balanced_factors(U[:, :k], S[:k], Vh[:k])
    return planned


def cmd_info(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError, safe_open

    from lowrank.lora.checkpoint import _read_consistent_config
    from lowrank.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterCheckpointError, pattern_value

    if os.path.isfile(args.dir):
        if args.dir.endswith(".safetensors"):
            return _info_file(args.dir)
        raise CLIError(
            f"DIR {args.dir!r} is a file: pass an adapter folder, or a .safetensors file written by "
            "lowrank compress"
        )
    if not os.path.isdir(args.dir):
        raise CLIError(f"DIR {args.dir!r}: no such directory")
    try:
        config = _read_consistent_config(args.dir)
    except FileNotFoundError:
        raise CLIError(f"DIR {args.dir!r}: no {CONFIG_NAME} (not a PEFT adapter directory)") from None
    except AdapterCheckpointError as exc:
        raise CLIError(str(exc)) from None
    weights = os.path.join(args.dir, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CLIError(f"DIR {args.dir!r}: no {WEIGHTS_NAME}")
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            file_metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CLIError(f"{weights}: not a readable safetensors file ({exc})") from None

    layers: dict[str, dict[str, Any]] = {}
    for key, shape in shapes.items():
        match = re.match(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)$", key)
        if match and len(shape) == 2:
            embedding = match[2] == "lora_embedding_A"
            b_key = key.replace("lora_A.weight", "lora_B.weight").replace(
                "lora_embedding_A", "lora_embedding_B"
            )
            out = shapes.get(b_key, (None,))[0]
            layers[match[1]] = {"rank": shape[0], "in": shape[1], "out": out, "embedding": embedding}
    params = sum(math.prod(s) for s in shapes.values())
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    print(f"{'adapter':<24} {args.dir}")
    for field in ("peft_type", "task_type", "base_model_name_or_path"):
        print(f"{field:<24} {config.get(field)}")
    print(
        f"{'r':<24} {r}"
        + (f"  (rank_pattern: {len(config['rank_pattern'])} entries)" if config.get("rank_pattern") else "")
    )
    print(
        f"{'lora_alpha':<24} {alpha}"
        + (
            f"  (alpha_pattern: {len(config['alpha_pattern'])} entries)"
            if config.get("alpha_pattern")
            else ""
        )
    )
    print(f"{'lora_dropout':<24} {config.get('lora_dropout', 0.0)}")
    print(f"{'use_rslora':<24} {config.get('use_rslora', False)}")
    print(f"{'fan_in_fan_out':<24} {config.get('fan_in_fan_out', False)}")
    print(f"{'use_dora':<24} {config.get('use_dora', False)}")
    print(f"{'bias':<24} {config.get('bias', 'none')}")
    init = config.get("init_lora_weights", True)
    if init is not True:  # PEFT's default (Kaiming A, zero B) needs no line
        print(f"{'init_lora_weights':<24} {init}")
    if config.get("modules_to_save"):
        print(f"{'modules_to_save':<24} {', '.join(map(str, config['modules_to_save']))}")
    targets = config.get("target_modules")
    print(f"{'target_modules':<24} {targets if isinstance(targets, str) else ', '.join(targets or [])}")
    print(f"{'layers':<24} {len(layers)}   dtype {', '.join(sorted(set(dtypes.values())))}")
    print(f"{'size':<24} {params:,} params, {_human_bytes(os.path.getsize(weights))} on disk")
    print()
    print(f"{'module':<48} {'kind':<9} {'in':>6} {'out':>6} {'rank':>5} {'alpha':>7} {'scaling':>8}")
    for module, info in sorted(layers.items()):
        a = pattern_value(config.get("alpha_pattern"), module, alpha)
        rank = info["rank"]
        scaling = (
            f"{a / (math.sqrt(rank) if config.get('use_rslora') else rank):>8.4g}"
            if rank > 0
            else f"{'-':>8}"
        )
        kind = "embedding" if info["embedding"] else "linear"
        print(
            f"{module:<48} {kind:<9} {info['in']:>6} {info['out']!s:>6} {rank:>5} {a:>7g} {scaling}"
            + ("  (empty adapter: rank 0)" if rank == 0 else "")
        )
    _print_layer_errors(file_metadata, weights)
    return 0


def _layer_records(metadata: dict[str, str], where: str) -> dict[str, dict[str, Any]] | None:
    """The ``lowrank.layers`` records of a file's metadata, or None when it has none."""
    text = metadata.get("lowrank.layers")
    if text is None:
        return None
    try:
        records = json.loads(text)
        for record in records.values():
            int(record["rank"]), float(record["rel_error"]), float(record["norm"])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CLIError(f"{where}: malformed lowrank.layers metadata") from None
    return records


def _print_layer_errors(metadata: dict[str, str], where: str) -> None:
    """Each factored layer's rank and achieved relative error, worst first, and the totals."""
    records = _layer_records(metadata, where)
    if not records:
        return
    print()
    print(f"{'achieved error (worst first)':<48} {'shape':>11} {'rank':>5} {'rel.err':>10} {'norm_F':>10}")
    for module, rec in sorted(records.items(), key=lambda item: -float(item[1]["rel_error"])):
        shape = "x".join(str(d) for d in rec.get("shape", [])).rjust(11)
        rank, error, norm = int(rec["rank"]), float(rec["rel_error"]), float(rec["norm"])
        print(f"{module:<48} {shape} {rank:>5} {error:>10.3e} {norm:>10.3e}")
    norm_sq = sum(float(r["norm"]) ** 2 for r in records.values())
    err_sq = sum((float(r["rel_error"]) * float(r["norm"])) ** 2 for r in records.values())
    total = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    ranks = sum(int(r["rank"]) for r in records.values())
    print(f"{'total':<48} {len(records):>8} layers {ranks:>5} {total:>10.3e} {math.sqrt(norm_sq):>10.3e}")


def _info_file(path: str) -> int:
    """``lowrank info FILE``: a checkpoint written by ``lowrank compress``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            count = len(list(f.keys()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CLIError(f"{path}: not a readable safetensors file ({exc})") from None
    print(f"{'file':<24} {path}")
    print(f"{'tensors':<24} {count}   {_human_bytes(os.path.getsize(path))} on disk")
    print(f"{'layout':<24} {metadata.get('lowrank.layout', '(not written by lowrank compress)')}")
    _print_layer_errors(metadata, path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowrank`` command."""
    parser = _ArgumentParser(prog="lowrank", description="Low-rank tools for model checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    p = sub.add_parser("extract", help="extract a LoRA adapter from a base and a fine-tuned checkpoint")
    p.add_argument("base", metavar="BASE", help="base safetensors checkpoint (file or directory of shards)")
    p.add_argument("tuned", metavar="TUNED", help="fine-tuned checkpoint of the same model")
    p.add_argument("--rank", type=_parse_rank, help="rank per layer, or 'auto' with --tol")
    p.add_argument(
        "--tol", type=_parse_tol, help="with --rank auto: relative Frobenius error allowed per layer"
    )
    p.add_argument(
        "--target", help="regex searched in module paths (default: all 2-D weights but embeddings)"
    )
    p.add_argument(
        "--budget",
        type=_parse_size,
        help="total size of the factors in bytes of the stored dtype (e.g. 40MiB, 1.5GB): ranks per layer "
        "that minimise the total squared error within it",
    )
    p.add_argument("--budget-params", type=_parse_size, help="like --budget, counted in parameters (e.g. 2M)")
    p.add_argument("--out", required=True, help="adapter directory to write (PEFT layout)")
    p.add_argument(
        "--fan-in-fan-out",
        default="auto",
        metavar="auto|none|REGEX",
        help="modules whose weights are stored (in, out) (GPT-2's Conv1D): 'auto' (default) from config.json "
        "beside the checkpoint, 'none', or a regex searched in module paths",
    )
    p.add_argument("--base-model-name", help="base_model_name_or_path for the config (default: BASE)")
    p.add_argument("--seed", type=_parse_seed, default=0, help="seed of the randomized SVD (default 0)")
    p.set_defaults(run=cmd_extract)

    p = sub.add_parser("compress", help="replace 2-D weights of a checkpoint by low-rank factors")
    p.add_argument("ckpt", metavar="CKPT", help="safetensors checkpoint (file or directory of shards)")
    p.add_argument("--rank", type=_parse_rank, help="rank per layer")
    p.add_argument("--tol", type=_parse_tol, help="relative Frobenius error allowed per layer")
    p.add_argument(
        "--target", help="regex searched in module paths (default: all 2-D weights but embeddings)"
    )
    p.add_argument(
        "--budget",
        type=_parse_size,
        help="total size of the factors in bytes of the stored dtype (e.g. 40MiB, 1.5GB): ranks per layer "
        "that minimise the total squared error within it",
    )
    p.add_argument("--budget-params", type=_parse_size, help="like --budget, counted in parameters (e.g. 2M)")
    p.add_argument(
        "--out", required=True, help="output .safetensors file, or a directory for model.safetensors"
    )
    p.add_argument("--seed", type=_parse_seed, default=0, help="seed of the randomized SVD (default 0)")
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("info", help="show an adapter's config, ranks, targets, size and achieved errors")
    p.add_argument("dir", metavar="DIR", help="PEFT adapter directory, or a file written by lowrank compress")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowrank`` command line; returns the exit status (0 ok, 2 user error, 1 internal error).

    Every failure is one line on stderr, never a traceback. tqdm, when installed, draws progress bars.
    """
    from safetensors import SafetensorError

    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "rank", None) == "auto" and args.command == "compress":
            raise CLIError("compress: --rank takes an integer; use --tol T for per-layer ranks")
        return args.run(args)
    except CLIError as exc:
        print(f"lowrank: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, SafetensorError) as exc:
        print(f"lowrank: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowrank: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a command line prints one line, never a traceback
        print(
            f"lowrank: internal error: {type(exc).__name__}: {exc} (a bug in lowrank: please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
