"""lowrank._ops.range_gram (csrc/cpu/range_gram.cpp and the torch fallback on other devices) against float64
references: out = block @ omega and the Gram matrix out^T out of the float32/float64 result."""

from __future__ import annotations

import pytest
import torch

from lowrank._ops import range_gram


def _case(b, n, s, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(b, n, generator=gen, dtype=torch.float64).to(dtype)
    omega = torch.randn(n, s, generator=gen, dtype=torch.float64).to(dtype)
    return block, omega


@pytest.mark.parametrize(
    ("b", "n", "s", "chunk", "dtype"),
    [
        (1, 1, 1, 1, torch.float32),
        (7, 5, 3, 1, torch.float64),  # one row per chunk
        (300, 40, 9, 256, torch.float32),  # a short last chunk
        (1000, 70, 21, 333, torch.float64),
        (513, 64, 17, 10_000, torch.float32),  # one chunk
        (1000, 12, 5, 10, torch.float32),  # 100 chunks: two groups of at most 64
        (50, 10, 1500, 5, torch.float64),  # a wide sketch: groups of 3 chunks (64 MiB of Gram matrices)
        (400, 50, 41, 64, torch.float32),  # s >= 32: the Gram matrix by halves, mirrored
    ],
)
def test_range_and_gram_match_float64(b, n, s, chunk, dtype):
    block, omega = _case(b, n, s, dtype)
    out = torch.full((b, s), float("nan"), dtype=dtype)
    colsum = torch.full((s,), float("nan"), dtype=torch.float64)
    gram = range_gram(block, omega, chunk, out=out, colsum=colsum)
    want = block.double() @ omega.double()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert gram.dtype == torch.float64 and gram.shape == (s, s)
    yd = out.double()  # the Gram matrix of the rounded result, exact products in float64
    torch.testing.assert_close(gram, yd.mT @ yd, rtol=1e-12, atol=1e-12 * float(gram.abs().max()))
    # the float64 column sums of the rounded result (float64 sums of float32 values: exact to ~b eps64)
    torch.testing.assert_close(colsum, yd.sum(0), rtol=1e-12, atol=1e-12 * float(yd.abs().sum(0).max()))
    torch.testing.assert_close(range_gram(block, omega, chunk, out=out.clone()), gram, rtol=0, atol=0)
    if s >= 32:  # the lower left block is the mirrored upper right one
        h = s // 2
        assert torch.equal(gram[h:, :h], gram[:h, h:].mT)
    none = range_gram(block, omega, chunk, gram=False, out=torch.empty_like(out))
    assert none.shape == (0, 0)


def test_strided_inputs_and_thread_count(request):
    """Transposed / sliced block and omega; the result is the same bit for bit with 1 and 2 threads."""
    block, omega = _case(900, 60, 11, torch.float32, seed=1)
    block_t = block.mT.contiguous().mT  # column-major
    omega_s = torch.stack([omega, omega], dim=2)[:, :, 0]  # column stride 2
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        out = torch.empty(900, 11)
        results.append((range_gram(block_t, omega_s, 128, out=out), out))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    want = block.double() @ omega.double()
    torch.testing.assert_close(results[0][1].double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


def test_empty_block():
    block, omega = _case(0, 8, 4, torch.float32)
    colsum = torch.full((4,), float("nan"), dtype=torch.float64)
    gram = range_gram(block, omega, 16, out=torch.empty(0, 4), colsum=colsum)
    assert torch.equal(gram, torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(colsum, torch.zeros(4, dtype=torch.float64))


def test_colsum_bad_arguments():
    block, omega = _case(10, 6, 3, torch.float32)
    out = torch.empty(10, 3)
    cases = [
        ({"colsum": torch.zeros(3, dtype=torch.float64), "gram": False}, ValueError, "needs gram=True"),
        ({"colsum": torch.zeros(4, dtype=torch.float64)}, ValueError, r"colsum must have shape \(3,\)"),
        ({"colsum": torch.zeros(3)}, TypeError, "colsum must be float64"),
        ({"colsum": torch.zeros(6, dtype=torch.float64)[::2]}, ValueError, "colsum must be contiguous"),
        ({"colsum": [0.0, 0.0, 0.0]}, TypeError, "colsum must be a torch.Tensor"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            range_gram(block, omega, 4, out=out, **kwargs)
    shared = torch.zeros(10, 3, dtype=torch.float64)  # colsum inside out
    with pytest.raises(ValueError, match="colsum must not overlap"):
        range_gram(block.double(), omega.double(), 4, out=shared, colsum=shared[0])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.ones(4, 3), torch.ones(2, 2), 2), {"out": torch.empty(4, 2)}, ValueError, "omega has 2 rows"),
        (
            (torch.ones(4, 3), torch.ones(3, 2), 2),
            {"out": torch.empty(3, 2)},
            ValueError,
            "out must have shape",
        ),
        ((torch.ones(4, 3), torch.ones(3, 2), 0), {"out": torch.empty(4, 2)}, ValueError, "chunk_rows"),
        ((torch.ones(4), torch.ones(3, 2), 2), {"out": torch.empty(4, 2)}, ValueError, "block must be 2-D"),
        ((torch.ones(4, 3), torch.ones(3, 2).double(), 2), {"out": torch.empty(4, 2)}, TypeError, "dtype"),
        (
            (torch.ones(4, 3).half(), torch.ones(3, 2).half(), 2),
            {"out": torch.empty(4, 2).half()},
            TypeError,
            "block",
        ),
        ((torch.ones(4, 3), torch.ones(3, 2), 2), {"out": torch.empty(2, 4).mT}, ValueError, "contiguous"),
        ((torch.ones(4, 3), torch.ones(3, 2), 2.0), {"out": torch.empty(4, 2)}, TypeError, "chunk_rows"),
        ((torch.ones(4, 3), torch.ones(3, 2), True), {"out": torch.empty(4, 2)}, TypeError, "chunk_rows"),
        (
            ([[1.0]], torch.ones(1, 1), 1),
            {"out": torch.empty(1, 1)},
            TypeError,
            "block must be a torch.Tensor",
        ),
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        range_gram(*args, **kwargs)


def test_meta():
    block = torch.empty(10, 6, device="meta")
    gram = range_gram(block, torch.empty(6, 3, device="meta"), 4, out=torch.empty(10, 3, device="meta"))
    assert gram.shape == (3, 3) and gram.dtype == torch.float64 and gram.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_float64():
    block, omega = _case(700, 90, 13, torch.float32, seed=2)
    out = torch.empty(700, 13, device="cuda")
    colsum = torch.empty(13, dtype=torch.float64, device="cuda")
    gram = range_gram(block.cuda(), omega.cuda(), 256, out=out, colsum=colsum)
    want = block.double() @ omega.double()
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    yd = out.double().cpu()
    torch.testing.assert_close(gram.cpu(), yd.mT @ yd, rtol=1e-10, atol=1e-10 * float(gram.abs().max()))
    torch.testing.assert_close(colsum.cpu(), yd.sum(0), rtol=1e-12, atol=1e-12 * float(yd.abs().sum(0).max()))
    with pytest.raises(ValueError, match="one device"):
        range_gram(block.cuda(), omega, 256, out=out)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
        ),
    ],
)
def test_out_overlapping_an_input_is_refused_and_disjoint_views_of_one_buffer_are_not(device):
    """out is written while block and omega are read: any shared byte is refused by name (the C++ check on
    CPU, the Python one before torch's GEMM elsewhere); disjoint slices of one buffer work (vs float64)."""
    gen = torch.Generator().manual_seed(3)
    buffer = torch.randn(40, 6, generator=gen).to(device)
    omega = torch.randn(6, 6, generator=gen).to(device)
    with pytest.raises(ValueError, match="out must not overlap block"):
        range_gram(buffer[:20], omega, 7, out=buffer[10:30])
    square = torch.randn(6, 6, generator=gen).to(device)
    with pytest.raises(ValueError, match="out must not overlap omega"):
        range_gram(torch.randn(6, 6).to(device), square, 7, out=square)
    block, out = buffer[:20], buffer[20:]
    want = block.double() @ omega.double()
    gram = range_gram(block, omega, 7, out=out)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram, want.mT @ want, rtol=1e-4, atol=1e-4)
