"""lowrank._linop.as_linop: every input kind against dense float64 NumPy products."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from lowrank._linop import CenteredOp, TransposedOp, as_linop

RNG = np.random.default_rng(0)
DENSE = sp.random(40, 25, density=0.2, random_state=RNG, format="csr", dtype=np.float64).toarray()
DENSE[:, 3] += 2.0  # a column with a non-zero mean


class NumpyOperator:
    shape = DENSE.shape
    dtype = np.float64

    def matmul(self, X):
        return DENSE @ np.asarray(X)

    def rmatmul(self, Y):
        return DENSE.T @ np.asarray(Y)


INPUTS = {
    "dense": lambda: torch.from_numpy(DENSE),
    "coo": lambda: torch.from_numpy(DENSE).to_sparse_coo(),
    "csr": lambda: torch.from_numpy(DENSE).to_sparse_csr(),
    "numpy": lambda: DENSE,
    "scipy-csr": lambda: sp.csr_matrix(DENSE),
    "scipy-coo-array": lambda: sp.coo_array(DENSE),
    "operator": NumpyOperator,
    "scipy-linop": lambda: spla.aslinearoperator(DENSE),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_products_and_reductions(kind):
    op = as_linop(INPUTS[kind]())
    assert op.shape == (40, 25) and op.dtype == torch.float64
    X = RNG.standard_normal((25, 3))
    Y = RNG.standard_normal((40, 2))
    np.testing.assert_allclose(op.matmul(torch.from_numpy(X)).numpy(), DENSE @ X, atol=1e-12)
    np.testing.assert_allclose(op.rmatmul(torch.from_numpy(Y)).numpy(), DENSE.T @ Y, atol=1e-12)
    np.testing.assert_allclose(op.column_mean().numpy()[:, 0], DENSE.mean(0), atol=1e-12)
    assert float(op.fro_norm_sq()) == pytest.approx(np.sum(DENSE**2), rel=1e-12)
    np.testing.assert_allclose(op.to_dense().numpy(), DENSE, atol=1e-12)

    centered = CenteredOp(op)
    C = DENSE - DENSE.mean(0)
    np.testing.assert_allclose(centered.matmul(torch.from_numpy(X)).numpy(), C @ X, atol=1e-12)
    np.testing.assert_allclose(centered.rmatmul(torch.from_numpy(Y)).numpy(), C.T @ Y, atol=1e-12)
    assert float(centered.fro_norm_sq()) == pytest.approx(np.sum(C**2), rel=1e-10)
    np.testing.assert_allclose(centered.to_dense().numpy(), C, atol=1e-12)


def test_batched_dense_and_low_precision():
    A = torch.randn(2, 3, 7, 5, dtype=torch.float16)
    op = as_linop(A)
    assert op.batch_shape == (2, 3) and op.dtype == torch.float32
    X = torch.randn(5, 4)
    torch.testing.assert_close(op.matmul(X), A.float() @ X)
    torch.testing.assert_close(op.rmatmul(torch.randn(7, 2)).shape, torch.Size([2, 3, 5, 2]))
    torch.testing.assert_close(op.column_mean()[..., 0], A.float().mean(-2))
    with pytest.raises(ValueError, match="A"):
        as_linop(A, allow_batch=False)


def test_bad_inputs():
    with pytest.raises(TypeError, match="A"):
        as_linop([[1.0]])
    with pytest.raises(TypeError, match="dtype"):
        as_linop(np.ones((3, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="dtype"):
        as_linop(torch.ones(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        as_linop(sp.csr_matrix(np.ones((3, 2), dtype=np.int64)))
    with pytest.raises(ValueError, match="empty"):
        as_linop(torch.ones(0, 3))
    with pytest.raises(ValueError, match="M"):
        as_linop(torch.ones(3), name="M")
    bad = DENSE.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_linop(sp.csr_matrix(bad))
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_linop(torch.from_numpy(bad))

    class WrongShape(NumpyOperator):
        def matmul(self, X):
            return np.ones((3, 3))

    with pytest.raises(ValueError, match="matmul returned shape"):
        as_linop(WrongShape()).matmul(torch.ones(25, 2, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["row-major", "column-major", "batched", "complex"])
def test_dense_products_any_layout(layout):
    # CPU dense products are computed as (X^T A^T)^T; they must equal A @ X whatever A's strides
    rng = np.random.default_rng(11)
    M = rng.standard_normal((2, 30, 20)) if layout == "batched" else rng.standard_normal((30, 20))
    if layout == "complex":
        M = M + 1j * rng.standard_normal(M.shape)
    A = torch.from_numpy(M.T.copy()).mT if layout == "column-major" else torch.from_numpy(M)
    op = as_linop(A)
    X = rng.standard_normal((20, 4))
    Y = rng.standard_normal((30, 3))
    MH = np.conj(np.swapaxes(M, -1, -2))
    np.testing.assert_allclose(op.matmul(torch.from_numpy(X).to(A.dtype)).numpy(), M @ X, atol=1e-12)
    np.testing.assert_allclose(op.rmatmul(torch.from_numpy(Y).to(A.dtype)).numpy(), MH @ Y, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.sparse_csr, torch.sparse_coo, torch.sparse_csc])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_sparse_adjoint_products(layout, dtype):
    """rmatmul of every sparse layout is A^H Y (the transpose is built once, SciPy or torch)."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(40, 25, dtype=dtype, generator=gen) * (torch.rand(40, 25, generator=gen) < 0.25)
    A[7] = 0  # an empty row and an empty column
    A[:, 4] = 0
    dense = A.numpy()
    sparse = {torch.sparse_csr: A.to_sparse_csr, torch.sparse_coo: A.to_sparse_coo}.get(
        layout, A.to_sparse_csc
    )()
    op = as_linop(sparse, check_finite=False)
    Y = torch.randn(40, 3, dtype=dtype, generator=gen)
    np.testing.assert_allclose(op.rmatmul(Y).numpy(), dense.conj().T @ Y.numpy(), atol=1e-12)
    X = torch.randn(25, 2, dtype=dtype, generator=gen)
    np.testing.assert_allclose(op.matmul(X).numpy(), dense @ X.numpy(), atol=1e-12)


@pytest.mark.parametrize("center", [False, True])
def test_transposed_op_of_centered(center):
    """TransposedOp swaps the products; over a CenteredOp it is the transpose of the centred matrix."""
    rng = np.random.default_rng(8)
    A = rng.standard_normal((30, 12)) * (rng.random((30, 12)) < 0.4) + 1.5
    ref = A - A.mean(axis=0) if center else A
    base = as_linop(torch.from_numpy(A).to_sparse_csr())
    op = TransposedOp(CenteredOp(base) if center else base)
    assert op.shape == (12, 30)
    X = torch.from_numpy(rng.standard_normal((30, 4)))
    Y = torch.from_numpy(rng.standard_normal((12, 3)))
    np.testing.assert_allclose(op.matmul(X).numpy(), ref.T @ X.numpy(), atol=1e-12)
    np.testing.assert_allclose(op.rmatmul(Y).numpy(), ref @ Y.numpy(), atol=1e-12)
    np.testing.assert_allclose(op.to_dense().numpy(), ref.T, atol=1e-12)
    np.testing.assert_allclose(op.column_mean()[:, 0].numpy(), ref.mean(axis=1), atol=1e-12)
    assert float(op.fro_norm_sq()) == pytest.approx(np.sum(ref**2), rel=1e-12)


# ---------------------------------------------------------------- issue 15: the shared entry guards

from lowrank._linop import check_seed, no_autocast  # noqa: E402


def test_check_seed_accepts_the_torch_range_and_names_seed():
    for seed in (None, 0, 1, 2**63 - 1, np.int32(5), np.uint64(3)):
        out = check_seed(seed)
        assert out is None or type(out) is int
    gen = torch.Generator()
    assert check_seed(gen) is gen
    for seed, error in ((2**63, ValueError), (-1, ValueError), (2**64, ValueError), (1.0, TypeError)):
        with pytest.raises(error, match="seed"):
            check_seed(seed)
    with pytest.raises(TypeError, match="my_seed must be None or an int"):
        check_seed(gen, allow_generator=False, name="my_seed")
    with pytest.raises(TypeError, match="seed"):
        check_seed(np.bool_(True))


def test_no_autocast_switches_autocast_off_inside_only():
    @no_autocast
    def probe(x):
        return torch.is_autocast_enabled("cpu"), (x @ x).dtype

    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe(x) == (False, torch.float32)
        assert torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.bfloat16
    assert probe(x) == (False, torch.float32)
    assert probe.__name__ == "probe"


def test_meta_inputs_are_refused_by_the_adapter():
    with pytest.raises(ValueError, match="B is on the meta device"):
        as_linop(torch.empty(3, 2, device="meta"), name="B")
    with pytest.raises(ValueError, match="B is on the meta device"):
        as_linop(torch.empty(2, 3, 2, device="meta"), name="B")


def test_dense_column_means_are_accumulated_in_float64():
    X = torch.full((100000, 3), 0.1, dtype=torch.float32) + torch.arange(3.0)
    mean = as_linop(X).column_mean()[:, 0]
    exact = X.double().mean(0)
    assert torch.equal(mean, exact.float())  # correctly rounded, not m*eps off
