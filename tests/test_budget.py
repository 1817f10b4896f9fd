"""lowrank.allocate_ranks against brute force over every allocation of small problems."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import lowrank
import lowrank.budget as budget_module


def random_problem(rng, layers, max_rank, cost_range):
    spectra = [
        np.sort(rng.random(rng.integers(1, max_rank + 1)) ** rng.uniform(0.5, 4) * rng.uniform(0.1, 10))[::-1]
        for _ in range(layers)
    ]
    costs = rng.integers(*cost_range, size=layers).astype(float)
    return spectra, costs


def brute_force(spectra, costs, budget):
    best = 0.0
    for ranks in itertools.product(*[range(len(s) + 1) for s in spectra]):
        if sum(k * c for k, c in zip(ranks, costs)) <= budget:
            best = max(best, sum(float((s[:k] ** 2).sum()) for s, k in zip(spectra, ranks)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_exact_solver_is_optimal(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        spectra, costs = random_problem(rng, rng.integers(1, 5), 5, (1, 8))
        budget = float(rng.integers(0, int(costs.sum() * 5) + 1))
        result = lowrank.allocate_ranks(spectra, budget, costs)
        best = brute_force(spectra, costs, budget)
        assert result.method == "exact"
        assert result.captured == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert result.cost <= budget
        assert result.cost == sum(k * c for k, c in zip(result.ranks, costs))
        assert result.upper_bound >= best - 1e-12


def test_greedy_is_optimal_with_equal_costs(monkeypatch):
    monkeypatch.setattr(budget_module, "MAX_EXACT_WORK", -1)
    rng = np.random.default_rng(10)
    for _ in range(100):
        spectra, _ = random_problem(rng, rng.integers(1, 5), 5, (1, 2))
        cost = float(rng.integers(1, 6))
        budget = float(rng.uniform(0, cost * 12))
        result = lowrank.allocate_ranks(spectra, budget, [cost] * len(spectra))
        assert result.method == "greedy"
        assert result.captured == pytest.approx(
            brute_force(spectra, [cost] * len(spectra), budget), rel=1e-12
        )


def test_greedy_within_5_percent_of_the_optimal_error_when_ranks_are_small_slices(monkeypatch):
    # The greedy runs on problems too large for the exact programme, where one rank is a sliver of the
    # budget; here each rank costs at most a tenth of it. Its shortfall is certified by upper_bound.
    monkeypatch.setattr(budget_module, "MAX_EXACT_WORK", -1)
    rng = np.random.default_rng(20)
    for _ in range(80):
        spectra, costs = random_problem(rng, 3, 8, (1, 4))
        budget = float(rng.uniform(10 * costs.max(), costs.sum() * 8))
        total = sum(float((s**2).sum()) for s in spectra) + 1e-3  # plus a tail the spectra leave out
        result = lowrank.allocate_ranks(spectra, budget, costs)
        best = brute_force(spectra, costs, budget)
        assert result.cost <= budget + 1e-9
        assert total - result.captured <= 1.05 * (total - best) + 1e-12
        assert result.upper_bound >= best - 1e-12
        assert best - result.captured <= result.upper_bound - result.captured + 1e-12


def test_never_worse_than_a_uniform_rank_of_the_same_size():
    # Layers whose updates differ in rank and decay, as fine-tuning deltas do.
    rng = np.random.default_rng(3)
    shapes = [(64, 64), (64, 256), (256, 64), (64, 64)]
    spectra = [
        np.exp(-np.arange(64) / 2.0),
        np.exp(-np.arange(64) / 20.0) * 3,
        np.concatenate([np.ones(4) * 5, np.full(60, 0.01)]),
        rng.random(64) * 0.1,
    ]
    spectra = [np.sort(s)[::-1] for s in spectra]
    costs = [o + i for o, i in shapes]
    total = sum(float((s**2).sum()) for s in spectra)
    for rank in (2, 4, 8, 16):
        size = rank * sum(costs)
        uniform_error = total - sum(float((s[:rank] ** 2).sum()) for s in spectra)
        result = lowrank.allocate_ranks(spectra, size, costs)
        assert result.cost <= size
        assert total - result.captured <= uniform_error + 1e-9
    # at rank 4 the spectra differ enough for a large gain
    result = lowrank.allocate_ranks(spectra, 4 * sum(costs), costs)
    uniform_error = total - sum(float((s[:4] ** 2).sum()) for s in spectra)
    assert total - result.captured <= 0.8 * uniform_error


def test_default_cost_counts_ranks_and_max_ranks_caps():
    spectra = [torch.tensor([3.0, 2.0, 1.0]), np.array([2.5, 0.5])]
    assert lowrank.allocate_ranks(spectra, 3).ranks == [2, 1]
    assert lowrank.allocate_ranks(spectra, 3, max_ranks=[1, 2]).ranks == [1, 2]
    assert lowrank.allocate_ranks(spectra, 0).ranks == [0, 0]
    assert lowrank.allocate_ranks(spectra, 100).ranks == [3, 2]
    assert lowrank.allocate_ranks([], 10).ranks == []


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (([np.array([1.0])], -1), {}, ValueError, "budget must be a finite number >= 0"),
        (([np.array([1.0])], float("nan")), {}, ValueError, "budget"),
        (([np.array([1.0])], "10"), {}, TypeError, "budget must be a number"),
        (([np.array([1.0, 2.0])], 1), {}, ValueError, r"spectra\[0\] must be sorted"),
        (([np.array([[1.0]])], 1), {}, ValueError, r"spectra\[0\] must be 1-D"),
        (([np.array([1.0, -1.0])], 1), {}, ValueError, "non-negative"),
        (([np.array([np.nan])], 1), {}, ValueError, "finite"),
        (([["a"]], 1), {}, TypeError, r"spectra\[0\]"),
        ((np.ones(3), 1), {}, TypeError, "spectra must be a sequence"),
        (([np.ones(2)], 1, [1.0, 2.0]), {}, ValueError, "cost must have one entry per layer"),
        (([np.ones(2)], 1, [0.0]), {}, ValueError, "cost must hold finite positive"),
        (([np.ones(2)], 1), {"max_ranks": [1, 2]}, ValueError, "max_ranks must have one entry"),
        (([np.ones(2)], 1), {"max_ranks": [-1]}, ValueError, r"max_ranks\[0\]"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        lowrank.allocate_ranks(*args, **kwargs)


def test_costs_beyond_int64_and_spectra_beyond_float64_squares():
    # Byte costs of 1e19 (> int64) raised "negative dimensions are not allowed" from the exact programme;
    # singular values of 1e200 squared to inf, so every choice tied (rank 1 of 2 taken within a budget of 3).
    spectra = [np.array([3.0, 2.0, 1.0]), np.array([2.5, 0.5]), np.array([1.5, 1.4, 1.3])]
    costs = [1e19, 2e19, 1e19]
    got = lowrank.allocate_ranks(spectra, 5e19, costs)
    assert got.captured == pytest.approx(brute_force(spectra, costs, 5e19), rel=1e-12)
    assert got.cost <= 5e19
    big = lowrank.allocate_ranks([np.array([1e200, 1e199])], 3)
    assert big.ranks == [2]
    scaled = lowrank.allocate_ranks([s * 1e200 for s in spectra], 4, [1, 2, 1])
    assert scaled.ranks == lowrank.allocate_ranks(spectra, 4, [1, 2, 1]).ranks


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_ranks": [None, 1, 1]}, ValueError, r"max_ranks\[0\] must be an integer >= 0, got None"),
        ({"max_ranks": [float("nan"), 1, 1]}, ValueError, r"max_ranks\[0\] must be an integer"),
        (
            {"max_ranks": [float("inf"), 1, 1]},
            ValueError,
            r"max_ranks\[0\] must be an integer",
        ),  # OverflowError
        ({"max_ranks": 3}, TypeError, "max_ranks must be a sequence"),  # "object of type 'int' has no len()"
        ({"cost": ["a", "b", "c"]}, TypeError, "cost must be a sequence of numbers"),
    ],
)
def test_bad_max_ranks_and_costs_name_the_argument(kwargs, error, match):
    spectra = [np.array([3.0, 2.0]), np.array([1.0]), np.array([2.0, 1.0])]
    with pytest.raises(error, match=match):
        lowrank.allocate_ranks(spectra, 3, **kwargs)


def test_integral_float_and_numpy_max_ranks():
    spectra = [np.array([3.0, 2.0]), np.array([1.0]), np.array([2.0, 1.0])]
    a = lowrank.allocate_ranks(spectra, 3, max_ranks=[1.0, np.int64(1), 2])
    assert a.ranks == [1, 1, 1]
