"""lowrank._ops.sparse_sign_add_ (csrc/cpu/sparse_sign.cpp and the index_add_ fallback) against a float64
dense reference: out + S @ block with S the d x b matrix holding signs[i, t] at (rows[i, t], i)."""

from __future__ import annotations

import pytest
import torch

from lowrank._ops import sparse_sign_add_


def _case(d, b, n, zeta, dtype, seed=0, distinct=True):
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(b, n, generator=gen, dtype=torch.float64).to(dtype)
    if distinct:
        rows = torch.stack([torch.randperm(d, generator=gen)[:zeta] for _ in range(b)]).reshape(b, zeta)
    else:
        rows = torch.randint(0, d, (b, zeta), generator=gen)
    signs = torch.randint(0, 2, (b, zeta), generator=gen).double() * 2 - 1
    out = torch.randn(d, n, generator=gen, dtype=torch.float64)
    return out, block, rows, signs


def _reference(out, block, rows, signs):
    d, b = out.shape[0], block.shape[0]
    S = torch.zeros(d, b, dtype=torch.float64)
    for t in range(rows.shape[1]):
        S.index_put_((rows[:, t], torch.arange(b)), signs[:, t], accumulate=True)
    return out + S @ block.double()


@pytest.mark.parametrize(
    ("d", "b", "n", "zeta", "dtype"),
    [
        (1, 1, 1, 1, torch.float64),
        (7, 1, 5, 1, torch.float32),
        (13, 37, 1, 8, torch.float64),
        (50, 101, 333, 8, torch.float32),
        (9, 64, 1001, 8, torch.float64),
        (600, 19, 70, 1, torch.float32),  # d * 8 bytes > the tile budget for wide n: narrow tiles
        (20, 30, 17, 3, torch.float32),
        (30, 700, 70, 8, torch.float32),  # several panels of 256 rows, a partial column tile
        (17, 513, 97, 5, torch.float64),  # float64: tiles of 32 columns, panels of 256 rows
    ],
)
def test_matches_dense_reference(d, b, n, zeta, dtype):
    out, block, rows, signs = _case(d, b, n, zeta, dtype)
    ref = _reference(out, block, rows, signs)
    got = sparse_sign_add_(out, block, rows, signs)
    assert got is out
    # one call's sums are rounded in the block's dtype (float32: ~1e-7 of the terms' size), then float64
    tol = 1e-13 if dtype == torch.float64 else 1e-6 * (1 + b * zeta / d)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_repeated_targets_weights_and_strided_inputs():
    out, block, rows, signs = _case(11, 40, 300, 6, torch.float32, seed=1, distinct=False)
    signs = signs * torch.rand(signs.shape, dtype=torch.float64)  # general weights, repeats add twice
    ref = _reference(out, block, rows, signs)
    wide = torch.zeros(40, 600)
    wide[:, ::2] = block
    strided = wide[:, ::2]  # column stride 2: copied once
    rows_t, signs_t = rows.T.contiguous().T, signs.T.contiguous().T  # non-contiguous index tensors
    sparse_sign_add_(out, strided, rows_t, signs_t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # empty block and zeta = 0 leave out as it was
    before = out.clone()
    sparse_sign_add_(out, block[:0], rows[:0], signs[:0])
    sparse_sign_add_(out, block, rows[:, :0], signs[:, :0])
    assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 4, 11, 13, 25])  # dense rows: chunks of 12, padding to a multiple of 4
def test_dense_rows_match_dense_reference(dtype, p):
    d, b, n, zeta = 40, 600, 150, 8
    out, block, rows, signs = _case(d, b, n, zeta, dtype, seed=5)
    gen = torch.Generator().manual_seed(7)
    dense = torch.randn(b, p, generator=gen, dtype=torch.float64)
    full = torch.cat([out, torch.randn(p, n, generator=gen, dtype=torch.float64)])
    ref = full.clone()
    ref[:d] = _reference(out, block, rows, signs)
    ref[d:] += dense.mT @ block.double()
    got = sparse_sign_add_(full, block, rows, signs, dense)
    assert got is full
    tol = 1e-13 if dtype == torch.float64 else 1e-6 * (1 + b * zeta / d)
    torch.testing.assert_close(full[:d], ref[:d], rtol=tol, atol=tol)
    # the dense sums over b rows are rounded in the block's dtype: |error| ~ eps sqrt(b) max|terms|
    tol = 1e-12 if dtype == torch.float64 else 1e-6 * b**0.5 * 4
    torch.testing.assert_close(full[d:], ref[d:], rtol=tol, atol=tol)
    # dense only (zeta = 0) and rows that would reach the dense rows are refused
    only = torch.zeros(p, n, dtype=torch.float64)
    sparse_sign_add_(only, block, rows[:, :0], signs[:, :0], dense)
    torch.testing.assert_close(only, dense.mT @ block.double(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=rf"rows holds {d + p - 1}.*\[0, {d}\)"):
        bad = rows.clone()
        bad[3, 2] = d + p - 1
        sparse_sign_add_(full, block, bad, signs, dense)


def test_split_rows_and_thread_count():
    out, block, rows, signs = _case(40, 600, 257, 8, torch.float64, seed=2)
    dense = torch.randn(600, 3, dtype=torch.float64)
    out = torch.cat([out, torch.zeros(3, 257, dtype=torch.float64)])
    one = sparse_sign_add_(out.clone(), block, rows, signs, dense)
    two = out.clone()
    sparse_sign_add_(two, block[:77], rows[:77], signs[:77], dense[:77])
    sparse_sign_add_(two, block[77:], rows[77:], signs[77:], dense[77:])
    torch.testing.assert_close(one, two, rtol=1e-13, atol=1e-13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sparse_sign_add_(out.clone(), block, rows, signs, dense)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, single)


def test_meta_and_fallback_paths_match():
    out, block, rows, signs = _case(12, 25, 31, 4, torch.float32, seed=3)
    meta = sparse_sign_add_(out.to("meta"), block.to("meta"), rows.to("meta"), signs.to("meta"))
    assert meta.device.type == "meta" and meta.shape == out.shape
    dense = torch.randn(25, 2, dtype=torch.float64)
    full = torch.cat([out, torch.zeros(2, 31, dtype=torch.float64)])
    meta = sparse_sign_add_(*(t.to("meta") for t in (full, block, rows, signs, dense)))
    assert meta.device.type == "meta" and meta.shape == full.shape
    if torch.cuda.is_available():
        ref = _reference(out, block, rows, signs)
        got = sparse_sign_add_(out.cuda(), block.cuda(), rows.cuda(), signs.cuda())
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-13, atol=1e-13)
        ref = torch.cat([ref, dense.mT @ block.double()])
        got = sparse_sign_add_(full.cuda(), block.cuda(), rows.cuda(), signs.cuda(), dense.cuda())
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-13, atol=1e-13)


def test_bad_arguments_name_them():
    out, block, rows, signs = _case(10, 6, 8, 2, torch.float32)
    cases = [
        ((out[:, :7], block, rows, signs), ValueError, "block has 8 columns"),
        ((out, block[:5], rows, signs), ValueError, "rows has 6 rows but block has 5"),
        ((out, block, rows, signs[:, :1]), ValueError, "signs has shape"),
        ((out.T.contiguous().T, block, rows, signs), ValueError, "out must be contiguous"),
        ((out.float(), block, rows, signs), TypeError, "out must be float64"),
        ((out, block.half(), rows, signs), TypeError, "block must be float32 or float64"),
        ((out, block, rows.int(), signs), TypeError, "rows must be int64"),
        ((out, block, rows, signs.float()), TypeError, "signs must be float64"),
        ((out, block[0], rows, signs), ValueError, "block must be 2-D"),
        ((out, block, rows + 10, signs), ValueError, r"rows holds 1\d.*\[0, 10\)"),
        ((out, block, rows - 20, signs), ValueError, "rows holds -"),
        ((out, block.numpy(), rows, signs), TypeError, "block must be a torch.Tensor"),
        ((out, block, rows, signs, torch.ones(5, 2).double()), ValueError, "dense must be 2-D"),
        ((out, block, rows, signs, torch.ones(6, 11).double()), ValueError, "dense has 11 columns"),
        ((out, block, rows, signs, torch.ones(6, 2)), TypeError, "dense must be float64"),
        ((out, block, rows, signs, [[1.0]] * 6), TypeError, "dense must be a torch.Tensor"),
    ]
    for args, error, match in cases:
        before = out.clone()
        with pytest.raises(error, match=match):
            sparse_sign_add_(*args)
        assert torch.equal(out, before)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_out_overlapping_another_argument_is_refused(device):
    """out is accumulated into while block, signs and dense are read: a float64 block, signs or dense that
    shares memory with out is refused by name; disjoint slices of one buffer work (vs float64)."""
    out, block, rows, signs = _case(10, 6, 8, 2, torch.float64, seed=4)
    buffer = torch.cat([out, block]).to(device)  # out rows 0..9, block rows 10..15 of one tensor
    rows, signs = rows.to(device), signs.to(device)
    with pytest.raises(ValueError, match="out must not overlap block"):
        sparse_sign_add_(buffer[:10], buffer[6:12], rows, signs)
    flat = torch.randn(200, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="out must not overlap signs"):
        sparse_sign_add_(flat[:80].view(10, 8), block.to(device), rows, flat[70:82].view(6, 2))
    with pytest.raises(ValueError, match="out must not overlap dense"):
        sparse_sign_add_(flat[:96].view(12, 8), block.to(device), rows, signs, flat[90:102].view(6, 2))
    got = sparse_sign_add_(buffer[:10], buffer[10:], rows, signs)
    torch.testing.assert_close(
        got.cpu(), _reference(out, block, rows.cpu(), signs.cpu()), rtol=1e-13, atol=1e-13
    )
