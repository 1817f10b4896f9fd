"""lowrank._ops.sketch_row_draws (csrc/cpu/sketch_draws.cpp): the row-side test matrices of StreamingSVD,
against an independent pure-Python implementation of the documented generator (SplitMix64 read at
position i W + j, Floyd's distinct picks, sign bits, Marsaglia's polar method), and statistical checks
(uniform subsets, fair signs, Gaussian entries) against SciPy."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import scipy.stats
import torch

from lowrank._ops import sketch_row_draws, sketch_row_draws_limit

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _reference_row(key: int, i: int, sizes, zetas, q: int):
    nz = sum(zetas)
    words = nz + (nz + 63) // 64 + (q + 1) // 2
    counter = i * words

    def word() -> int:
        nonlocal counter
        counter += 1
        return _mix64((key + counter * GAMMA) & MASK)

    rows, offset = [], 0
    for d, z in zip(sizes, zetas):
        picks: list[int] = []
        for t in range(z):
            j = d - z + t
            pick = (word() * (j + 1)) >> 64
            picks.append(offset + (j if offset + pick in picks else pick))
        rows += picks
        offset += d
    signs = []
    for t0 in range(0, nz, 64):
        bits = word()
        signs += [1.0 if (bits >> (t - t0)) & 1 else -1.0 for t in range(t0, min(nz, t0 + 64))]
    gauss = []
    for t in range(0, q, 2):
        x = word()
        while True:
            x = (x + GAMMA) & MASK
            u = (_mix64(x) >> 11) * 2.0**-52 - 1.0
            x = (x + GAMMA) & MASK
            v = (_mix64(x) >> 11) * 2.0**-52 - 1.0
            sq = u * u + v * v
            if 0.0 < sq < 1.0:
                break
        f = math.sqrt(-2.0 * math.log(sq) / sq)
        gauss += [_f32(u * f), _f32(v * f)][: q - t]
    return rows, signs, gauss


@pytest.mark.parametrize(
    "sizes,zetas,q", [((13, 27), (8, 8), 10), ((5,), (5,), 3), ((70, 3, 40), (30, 0, 40), 1)]
)
def test_equals_the_documented_generator(sizes, zetas, q):
    key, start, count = 0x5DEECE66D1234567, 123456789, 40
    rows, signs, gauss = sketch_row_draws(key, start, count, sizes, zetas, q)
    nz = sum(zetas)
    assert rows.shape == signs.shape == (count, nz) and gauss.shape == (count, q)
    assert rows.dtype == torch.int64 and signs.dtype == gauss.dtype == torch.float64
    for i in range(count):
        ref_rows, ref_signs, ref_gauss = _reference_row(key, start + i, sizes, zetas, q)
        assert rows[i].tolist() == ref_rows
        assert signs[i].tolist() == ref_signs
        assert gauss[i].tolist() == ref_gauss


def test_a_row_depends_on_key_and_index_alone():
    args = ((161, 323), (8, 8), 10)
    whole = sketch_row_draws(7, 0, 3000, *args)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for start, stop in ((0, 1), (1, 2999), (1000, 3000), (2047, 2049)):
                part = sketch_row_draws(7, start, stop - start, *args)
                for got, ref in zip(part, whole):
                    assert torch.equal(got, ref[start:stop])
    finally:
        torch.set_num_threads(threads)
    other = sketch_row_draws(8, 0, 3000, *args)
    assert not torch.equal(other[0], whole[0]) and not torch.equal(other[2], whole[2])
    assert all(t.shape[0] == 0 for t in sketch_row_draws(7, 10, 0, *args))
    top = sketch_row_draws((1 << 63) - 1, 2**40, 5, *args)  # the ends of key and a far start
    assert bool((top[0] >= 0).all()) and bool((top[0] < 161 + 323).all())


def test_picks_are_distinct_uniform_subsets_and_signs_fair():
    rows, signs, _ = sketch_row_draws(3, 0, 20000, (5, 161), (2, 8), 0)
    psi, phi = rows[:, :2], rows[:, 2:]
    assert bool((psi >= 0).all() & (psi < 5).all() & (phi >= 5).all() & (phi < 166).all())
    assert bool((psi.sort(1).values.diff(1) > 0).all() & (phi.sort(1).values.diff(1) > 0).all())
    # each of the 10 2-subsets of [0, 5) equally likely
    pairs = psi.sort(1).values
    counts = torch.bincount(pairs[:, 0] * 5 + pairs[:, 1], minlength=25).double()
    counts = counts[counts > 0]
    assert counts.numel() == 10
    assert scipy.stats.chisquare(counts.numpy()).pvalue > 1e-4
    # each of 161 targets in a row's set with probability 8 / 161 (the set is uniform, not each position:
    # Floyd's step t picks from [0, 161 - 8 + t])
    col = torch.bincount((phi - 5).flatten(), minlength=161).double().numpy()
    assert scipy.stats.chisquare(col).pvalue > 1e-4
    # signs: fair and independent of the position in the row
    plus = (signs > 0).double()
    for column in plus.mT:
        assert scipy.stats.binomtest(int(column.sum()), 20000).pvalue > 1e-4
    assert abs(float(torch.corrcoef(plus.mT)[0, 1:].abs().max())) < 0.04


def test_gaussian_entries():
    _, _, gauss = sketch_row_draws(11, 5, 20000, (4,), (0,), 10)
    assert bool((gauss.float().double() == gauss).all())  # float32 values
    for column in (0, 1, 9):  # both halves of a polar pair, and the last column
        assert scipy.stats.kstest(gauss[:, column].numpy(), "norm").pvalue > 1e-4
    flat = gauss.flatten().numpy()
    assert abs(flat.mean()) < 4 / math.sqrt(flat.size)
    assert abs(flat.var() - 1) < 6 * math.sqrt(2 / flat.size)
    corr = np.corrcoef(gauss.numpy().T)
    assert np.abs(corr - np.eye(10)).max() < 0.04  # the pair's two halves and neighbours uncorrelated
    odd = sketch_row_draws(11, 5, 20000, (4,), (0,), 9)[2]
    torch.testing.assert_close(odd, gauss[:, :9], rtol=0, atol=0)  # an odd count drops the last half-pair


def test_bad_arguments():
    with pytest.raises(ValueError, match="start must be >= 0"):
        sketch_row_draws(1, -1, 3, (5,), (2,), 0)
    with pytest.raises(ValueError, match="key must be < 2\\*\\*63"):
        sketch_row_draws(1 << 63, 0, 3, (5,), (2,), 0)
    with pytest.raises(TypeError, match="count must be an int"):
        sketch_row_draws(1, 0, 3.0, (5,), (2,), 0)
    with pytest.raises(ValueError, match="sizes has 2 entries but zetas has 1"):
        sketch_row_draws(1, 0, 3, (5, 6), (2,), 0)
    with pytest.raises(ValueError, match=r"zetas\[0\] = 6 must lie in \[0, sizes\[0\] = 5\]"):
        sketch_row_draws(1, 0, 3, (5,), (6,), 0)
    with pytest.raises(ValueError, match="start \\+ count = .* exceeds the generator's last row"):
        sketch_row_draws(1, 2**62, 3, (5,), (2,), 0)
    op = torch.ops.lowrank.sketch_row_draws_.default
    rows, signs = torch.empty(3, 2, dtype=torch.long), torch.empty(3, 2, dtype=torch.double)
    gauss = torch.empty(3, 1)
    with pytest.raises(TypeError, match="gauss must be float64"):
        op(1, 0, [5], [2], rows, signs, gauss)
    with pytest.raises(ValueError, match="rows must be 2-D"):
        op(1, 0, [5], [3], rows, signs, gauss.double())
    with pytest.raises(ValueError, match=r"sum\(sizes\) must be < 2\*\*63"):  # the op's own check
        op(1, 0, [2**62, 2**62], [1, 1], rows, signs, gauss.double()[:, :0])


def test_the_last_rows_of_the_counter_and_the_limit_is_the_kernels():
    """Found by user test 11: a start past 2**63 reached the op as a pybind RuntimeError, and the
    wrapper's limit must be the kernel's own (rows up to it drawn exactly as documented)."""
    sizes, zetas, q = (161, 323), (8, 8), 10
    limit = sketch_row_draws_limit(zetas, q)
    assert limit == (2**62 - 1) // (16 + 1 + 5)
    key, count = 0x1234567890ABCDEF, 4
    rows, signs, gauss = sketch_row_draws(key, limit - count, count, sizes, zetas, q)
    for i in range(count):
        ref_rows, ref_signs, ref_gauss = _reference_row(key, limit - count + i, sizes, zetas, q)
        assert rows[i].tolist() == ref_rows
        assert signs[i].tolist() == ref_signs
        assert gauss[i].tolist() == ref_gauss
    op = torch.ops.lowrank.sketch_row_draws_.default
    buffers = (
        torch.empty(count, 16, dtype=torch.long),
        torch.empty(count, 16, dtype=torch.double),
        torch.empty(count, q, dtype=torch.double),
    )
    op(key, limit - count, list(sizes), list(zetas), *buffers)  # the kernel accepts the wrapper's last rows
    with pytest.raises(ValueError, match="too large"):
        op(key, limit - count + 1, list(sizes), list(zetas), *buffers)
    for start in (limit - count + 1, 2**63 - 1, 2**63, 2**70):
        with pytest.raises(ValueError, match="start \\+ count = .* exceeds the generator's last row"):
            sketch_row_draws(key, start, count, sizes, zetas, q)
    # NumPy int64 arguments whose sum wraps around (2**62 + 2**62): the limit still applies
    with pytest.raises(ValueError, match="start \\+ count = 9223372036854775808 exceeds"):
        sketch_row_draws(key, np.int64(2**62), np.int64(2**62), sizes, zetas, q)


def test_bad_group_arguments_raise_value_or_type_errors():
    """Found by user test 11: sizes/zetas entries were passed through int() (5.7 and "5" accepted), a
    negative zeta surfaced as torch's RuntimeError, and sizes summing past 2**63 gave negative targets."""
    with pytest.raises(TypeError, match=r"sizes\[0\] must be an int, got float"):
        sketch_row_draws(1, 0, 3, (5.7,), (2,), 0)
    with pytest.raises(TypeError, match=r"zetas\[1\] must be an int, got str"):
        sketch_row_draws(1, 0, 3, (5, 6), (2, "2"), 0)
    with pytest.raises(TypeError, match="sizes must be a sequence of ints, got int"):
        sketch_row_draws(1, 0, 3, 5, (2,), 0)
    with pytest.raises(TypeError, match="zetas must be a sequence of ints, got str"):
        sketch_row_draws(1, 0, 3, (5,), "2", 0)
    with pytest.raises(ValueError, match=r"zetas\[0\] = -1 must lie in \[0, sizes\[0\] = 5\]"):
        sketch_row_draws(1, 0, 3, (5,), (-1,), 0)
    with pytest.raises(ValueError, match=r"sum\(sizes\) must be < 2\*\*63"):
        sketch_row_draws(1, 0, 3, (2**62, 2**62), (2, 2), 0)
    # NumPy and torch integer sequences are ints
    ref = sketch_row_draws(1, 0, 3, (5, 6), (2, 3), 1)
    for sizes, zetas in ((np.array([5, 6]), np.array([2, 3])), (torch.tensor([5, 6]), torch.tensor([2, 3]))):
        for got, want in zip(sketch_row_draws(1, 0, 3, sizes, zetas, 1), ref):
            assert torch.equal(got, want)
