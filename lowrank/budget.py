"""Spending a size budget across layers: per-layer ranks that minimise the total squared Frobenius error.

Truncating layer ``l`` (singular values ``s_l``) to rank ``k_l`` leaves the squared error
``||D_l||_F^2 - sum_{i < k_l} s_{l,i}^2`` (Eckart-Young-Mirsky), and its factors cost ``k_l * c_l``
(parameters, ``c_l = out_l + in_l``, or bytes). Minimising the total error under
``sum_l k_l c_l <= budget`` is a knapsack over the "items" ``(l, i)`` of value ``s_{l,i}^2`` and weight
``c_l``, where each layer's items must be taken in order -- which costs nothing, since the values are
non-increasing along a layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

#: Most element operations the exact dynamic programme may take (budget steps x ranks tried, summed over
#: layers); bigger problems take the greedy, whose shortfall is then tiny (one rank's gain at most).
MAX_EXACT_WORK = 30_000_000


class RankAllocation(NamedTuple):
    """The result of :func:`allocate_ranks`."""

    ranks: list[int]
    """Rank of each layer, in the order of ``spectra`` (0: the layer is left out)."""
    cost: float
    """``sum_l ranks[l] * cost[l]`` (<= budget)."""
    captured: float
    """``sum_l sum_{i < ranks[l]} s_{l,i}^2``: the squared Frobenius norm kept."""
    method: str
    """``"exact"`` (dynamic programming over the budget) or ``"greedy"`` (see Notes of allocate_ranks)."""
    upper_bound: float
    """An upper bound on the ``captured`` of any allocation within the budget (the fractional optimum)."""


def _as_spectrum(values: object, index: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    try:
        s = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"spectra[{index}] must be a 1-D array of singular values") from None
    if s.ndim != 1:
        raise ValueError(f"spectra[{index}] must be 1-D, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"spectra[{index}] must hold finite non-negative singular values")
    if len(s) > 1 and np.any(np.diff(s) > 1e-12 * s[0]):
        raise ValueError(f"spectra[{index}] must be sorted in non-increasing order (as an SVD returns it)")
    return s


def allocate_ranks(
    spectra: Sequence[object],
    budget: float,
    cost: Sequence[float] | None = None,
    *,
    max_ranks: Sequence[int] | None = None,
) -> RankAllocation:
    r"""Per-layer ranks that keep the most squared Frobenius norm within a total size budget.

    Chooses ``k_l`` to maximise ``sum_l sum_{i < k_l} s_{l,i}^2`` (equivalently, to minimise the total
    squared error ``sum_l ||D_l - [D_l]_{k_l}||_F^2`` of the truncated SVDs) subject to
    ``sum_l k_l cost_l <= budget``.

    Parameters
    ----------
    spectra : sequence of 1-D arrays or tensors
        Singular values of each layer, non-increasing, as far as each layer may be truncated (the rank of
        layer ``l`` is at most ``len(spectra[l])``).
    budget : float
        Total size allowed, in the unit of ``cost`` (e.g. parameters, or bytes in the stored dtype).
    cost : sequence of float, optional
        Size of one rank of each layer: ``out + in`` parameters for a LoRA pair or ``W ~= B A``, times the
        element size for bytes. Default 1 for every layer (the budget is then a total rank).
    max_ranks : sequence of int, optional
        A cap per layer (default ``len(spectra[l])``).

    Returns
    -------
    RankAllocation
        ``ranks``, the ``cost`` used, the ``captured`` squared norm, the ``method`` used, and an
        ``upper_bound`` on what any allocation could capture (so ``upper_bound - captured`` bounds the
        distance to the optimum).

    Raises
    ------
    ValueError
        Negative or non-finite budget or costs, spectra not 1-D / not sorted / negative, mismatched lengths.
    TypeError
        A spectrum that is not an array of numbers.

    Notes
    -----
    Each layer's gains ``s_{l,i}^2`` are non-increasing in ``i`` and every rank of layer ``l`` costs the same
    ``cost_l``, so the problem is a 0/1 knapsack whose per-layer items come in the order a greedy would take
    them anyway. Two solvers:

    * **exact** -- when the costs are integers and the programme is small (budget steps of the costs'
      greatest common divisor, times the ranks tried per layer, at most ``MAX_EXACT_WORK``): dynamic
      programming over the budget, one layer at a time. Optimal.
    * **greedy** -- otherwise: ranks in decreasing gain per unit cost ``s_{l,i}^2 / cost_l``, skipping
      those that no longer fit. With equal costs it is optimal; in general it keeps all but less than one
      rank's gain of the optimum (the fractional relaxation differs from it by at most the one rank it
      splits), which on real models -- thousands of ranks, each a sliver of the budget -- is a relative
      shortfall of ~1e-5. ``upper_bound`` (the fractional-knapsack optimum, Dantzig 1957) certifies the
      gap on every call: ``optimal captured - captured <= upper_bound - captured``.

    Cost: the exact programme at most ``MAX_EXACT_WORK`` vectorised element operations; the greedy and the
    bound ``O(N log N)`` over ``N = sum_l len(spectra[l])`` ranks.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1936.
    G. B. Dantzig, "Discrete-variable extremum problems", Operations Research 5(2), 1957.
    """
    if isinstance(spectra, (torch.Tensor, np.ndarray)) or not isinstance(spectra, Sequence):
        raise TypeError("spectra must be a sequence of 1-D arrays, one per layer")
    s_list = [_as_spectrum(s, i) for i, s in enumerate(spectra)]
    n = len(s_list)
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise TypeError(f"budget must be a number, got {type(budget).__name__}")
    budget = float(budget)
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    try:
        costs = np.ones(n) if cost is None else np.asarray(cost, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError("cost must be a sequence of numbers, one per layer") from None
    if costs.shape != (n,):
        raise ValueError(f"cost must have one entry per layer ({n}), got shape {costs.shape}")
    if not np.all(np.isfinite(costs)) or np.any(costs <= 0):
        raise ValueError("cost must hold finite positive sizes")
    caps = [len(s) for s in s_list]
    if max_ranks is not None:
        if isinstance(max_ranks, (str, bytes)) or not hasattr(max_ranks, "__len__"):
            raise TypeError(
                f"max_ranks must be a sequence of ints, one per layer, got {type(max_ranks).__name__}"
            )
        if len(max_ranks) != n:
            raise ValueError(f"max_ranks must have one entry per layer ({n}), got {len(max_ranks)}")
        caps = [min(c, _cap(m, i)) for i, (c, m) in enumerate(zip(caps, max_ranks))]
    # The gains are the squares of the singular values divided by the largest one's (a power of two:
    # exact): spectra beyond ~1e154 squared to inf, and every comparison between such layers was a tie.
    largest = max((float(s[0]) for s in s_list if len(s)), default=0.0)
    exponent = math.frexp(largest)[1] if largest > 0 else 0
    gains = [np.ldexp(s[:c], -exponent) ** 2 for s, c in zip(s_list, caps)]
    upper = _fractional_bound(gains, costs, budget)

    steps = _exact_steps(costs, budget, caps)
    if n == 0:
        ranks, method = [], "exact"
    elif steps is not None:
        ranks, method = _exact(gains, steps), "exact"
    else:
        ranks, method = _greedy(gains, costs, budget), "greedy"
    captured = _captured(gains, ranks)
    used = float(sum(k * c for k, c in zip(ranks, costs)))
    upper = max(upper, captured)
    with np.errstate(over="ignore"):  # a captured norm beyond float64 is inf, as it truly is
        captured, upper = (float(np.ldexp(value, 2 * exponent)) for value in (captured, upper))
    return RankAllocation(ranks, used, captured, method, upper)


def _cap(value: object, index: int) -> int:
    """One entry of ``max_ranks`` as an int >= 0 (integral floats and NumPy integers included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"max_ranks[{index}] must be an integer >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0 and int(value) == value):
        raise ValueError(f"max_ranks[{index}] must be an integer >= 0, got {value!r}")
    return int(value)


def _exact_steps(costs: np.ndarray, budget: float, caps: list[int]) -> tuple[np.ndarray, int] | None:
    """Costs and budget in units of the costs' gcd, when integral and the programme is small enough."""
    # integral costs only, and small enough for int64 arithmetic (2**53: every such float is an integer)
    if not len(costs) or not np.all(costs == np.round(costs)) or costs.max() > 2.0**53 or budget > 2.0**62:
        return None
    ints = costs.astype(np.int64)
    unit = int(np.gcd.reduce(ints))
    steps = int(budget // unit)
    unit_costs = ints // unit
    work = sum(min(cap, steps // int(c)) for cap, c in zip(caps, unit_costs)) * (steps + 1)
    if work > MAX_EXACT_WORK:
        return None
    return unit_costs, steps


def _exact(gains: list[np.ndarray], steps_info: tuple[np.ndarray, int]) -> list[int]:
    """Dynamic programming: best[b] = most captured with total cost <= b, layer by layer."""
    unit_costs, steps = steps_info
    best = np.zeros(steps + 1)
    choices = []
    for g, c in zip(gains, unit_costs):
        c = int(c)
        prefix = np.concatenate([[0.0], np.cumsum(g)])
        new = best.copy()
        choice = np.zeros(steps + 1, dtype=np.int64)
        for k in range(1, len(g) + 1):
            if k * c > steps:
                break
            candidate = np.full(steps + 1, -np.inf)
            candidate[k * c :] = best[: steps + 1 - k * c] + prefix[k]
            better = candidate > new
            new[better] = candidate[better]
            choice[better] = k
        choices.append(choice)
        best = new
    ranks = [0] * len(gains)
    b = steps
    for layer in range(len(gains) - 1, -1, -1):
        k = int(choices[layer][b])
        ranks[layer] = k
        b -= k * int(unit_costs[layer])
    return ranks


def _captured(gains: list[np.ndarray], ranks: list[int]) -> float:
    return float(sum(g[:k].sum() for g, k in zip(gains, ranks)))


def _greedy(gains: list[np.ndarray], costs: np.ndarray, budget: float) -> list[int]:
    """Ranks in decreasing gain per unit cost, skipping what no longer fits."""
    ranks = [0] * len(gains)
    left = budget
    items = sorted(
        ((float(g[i]) / costs[layer], layer) for layer, g in enumerate(gains) for i in range(len(g))),
        key=lambda item: -item[0],
    )
    for _, layer in items:  # a layer's items come in order, so ranks[layer] is the next index
        if costs[layer] <= left + 1e-12 * budget:
            ranks[layer] += 1
            left -= costs[layer]
    return ranks


def _fractional_bound(gains: list[np.ndarray], costs: np.ndarray, budget: float) -> float:
    """The fractional-knapsack optimum: an upper bound on every integral allocation's captured norm."""
    items = sorted(
        (
            (float(g[i]) / costs[layer], float(g[i]), costs[layer])
            for layer, g in enumerate(gains)
            for i in range(len(g))
        ),
        key=lambda item: -item[0],
    )
    total, left = 0.0, budget
    for ratio, gain, c in items:
        if c <= left:
            total += gain
            left -= c
        else:
            total += ratio * left
            break
    return total
