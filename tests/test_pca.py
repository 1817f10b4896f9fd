"""lowrank.pca against scikit-learn's PCA / TruncatedSVD on dense and sparse data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA, TruncatedSVD

import lowrank

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def dense_data(m=200, n=40, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -2, n)
    return rng.standard_normal((m, n)) @ (rng.standard_normal((n, n)) * scales[:, None]) + 3.0


def sparse_data(m=400, n=60, seed=0):
    # sparse, not centred, with a decaying spectrum (column scales fall geometrically)
    S = sp.random(
        m, n, density=0.2, random_state=seed, format="csr", data_rvs=np.random.default_rng(seed).random
    )
    return (S @ sp.diags(0.8 ** np.arange(n))).tocsr()


def assert_matches(result, reference, X, Xdense, k, rtol):
    np.testing.assert_allclose(result.components.numpy(), reference.components_[:k], atol=rtol)
    np.testing.assert_allclose(
        result.explained_variance.numpy(), reference.explained_variance_[:k], rtol=rtol
    )
    np.testing.assert_allclose(
        result.explained_variance_ratio.numpy(), reference.explained_variance_ratio_[:k], rtol=rtol
    )
    np.testing.assert_allclose(result.singular_values.numpy(), reference.singular_values_[:k], rtol=rtol)
    np.testing.assert_allclose(result.mean.numpy(), reference.mean_, atol=1e-12)
    scale = np.abs(reference.transform(Xdense)).max()
    np.testing.assert_allclose(result.transform(X).numpy(), reference.transform(Xdense), atol=rtol * scale)
    Z = result.transform(X)
    np.testing.assert_allclose(
        result.inverse_transform(Z).numpy(),
        reference.inverse_transform(reference.transform(Xdense)),
        atol=rtol * scale,
    )


@pytest.mark.parametrize("method", ["auto", "exact", "randomized"])
def test_dense_matches_sklearn(method):
    X = dense_data()
    reference = PCA(6, svd_solver="full").fit(X)
    result = lowrank.pca(torch.from_numpy(X), 6, method=method, seed=0)
    assert result.components.shape == (6, 40)
    assert_matches(result, reference, torch.from_numpy(X), X, 6, 1e-10 if method != "randomized" else 1e-6)


@pytest.mark.parametrize("kind", ["scipy", "torch_coo", "torch_csr"])
def test_sparse_implicit_centering_matches_sklearn_on_dense(kind):
    S = sparse_data()
    D = S.toarray()
    X = {
        "scipy": S,
        "torch_coo": torch.from_numpy(D).to_sparse(),
        "torch_csr": torch.from_numpy(D).to_sparse_csr(),
    }[kind]
    reference = PCA(5, svd_solver="full").fit(D)
    result = lowrank.pca(X, 5, seed=0)  # auto -> randomized with implicit centring
    assert_matches(result, reference, X, D, 5, 1e-6)


def test_uncentred_matches_truncated_svd():
    S = sparse_data(seed=1)
    reference = TruncatedSVD(4, algorithm="arpack").fit(S)
    result = lowrank.pca(S, 4, center=False, seed=0)
    np.testing.assert_allclose(result.singular_values.numpy(), reference.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(result.components.numpy()), np.abs(reference.components_), atol=1e-6)
    assert float(result.mean.abs().max()) == 0.0


def test_float32_and_module_level_helpers():
    X = torch.from_numpy(dense_data(seed=2)).float()
    result = lowrank.pca(X, 4)
    assert result.components.dtype == torch.float32
    Z = lowrank.pca_transform(result, X)
    torch.testing.assert_close(Z, result.transform(X))
    torch.testing.assert_close(lowrank.pca_inverse_transform(result, Z), result.inverse_transform(Z))
    reference = PCA(4, svd_solver="full").fit(X.double().numpy())
    np.testing.assert_allclose(result.explained_variance.numpy(), reference.explained_variance_, rtol=1e-4)


def test_errors():
    X = torch.from_numpy(dense_data())
    with pytest.raises(ValueError, match="k"):
        lowrank.pca(X, 0)
    with pytest.raises(ValueError, match="k"):
        lowrank.pca(X, 41)
    with pytest.raises(ValueError, match="method"):
        lowrank.pca(X, 3, method="arpack")
    with pytest.raises(TypeError, match="center"):
        lowrank.pca(X, 3, center=1)
    with pytest.raises(ValueError, match="2 samples"):
        lowrank.pca(X[:1], 1)
    with pytest.raises(TypeError, match="X"):
        lowrank.pca(torch.ones(5, 4, dtype=torch.int64), 2)
    result = lowrank.pca(X, 3)
    with pytest.raises(ValueError, match="features"):
        result.transform(X[:, :10])
    with pytest.raises(ValueError, match="Z"):
        result.inverse_transform(torch.ones(5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="PCAResult"):
        lowrank.pca_transform((1, 2), X)


@needs_cuda
def test_cuda_matches_cpu():
    X = torch.from_numpy(dense_data())
    a = lowrank.pca(X, 5)
    b = lowrank.pca(X.cuda(), 5)
    assert b.components.is_cuda
    torch.testing.assert_close(b.components.cpu(), a.components, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b.explained_variance.cpu(), a.explained_variance, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- issue 15: autocast, 0/0, bad input

from numerics import AUTOCAST_CASES, check_bad, nan_at, same_under_autocast  # noqa: E402


@pytest.mark.parametrize("device_type, dtype", AUTOCAST_CASES)
def test_pca_and_transforms_ignore_autocast(device_type, dtype):
    """Issue 15 §1: ``pca(rand(1000, 3), 3).mean`` came back bf16 inside autocast."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 3, generator=g).to(device_type)
    X = (torch.randn(700, 40, generator=g) @ torch.diag(0.9 ** torch.arange(40.0))).to(device_type)
    same_under_autocast(lambda: lowrank.pca(x, 3), device_type, dtype)
    same_under_autocast(lambda: lowrank.pca(X, 5, method="randomized", seed=0), device_type, dtype)
    result = lowrank.pca(X, 5, method="exact")
    same_under_autocast(lambda: lowrank.pca_transform(result, X), device_type, dtype)
    Z = result.transform(X)
    same_under_autocast(lambda: lowrank.pca_inverse_transform(result, Z), device_type, dtype)
    with torch.autocast(device_type, dtype=dtype):
        assert lowrank.pca(x, 3).mean.dtype == torch.float32


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("value", [3.7, 1000.0, 1e-30])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_constant_data_explain_no_variance(method, value, kind):
    """Issue 15 §5: pca(method="randomized") on constant data gave explained_variance_ratio 25885 (0/0
    through cancellation). Defined: data without variance have ratios 0."""
    X = torch.full((1000, 20), value)
    if kind == "sparse":
        X = X.to_sparse()
    result = lowrank.pca(X, 3, method=method, seed=0)
    assert torch.equal(result.explained_variance_ratio, torch.zeros(3))
    assert torch.allclose(result.mean, torch.full((20,), value))


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_small_variance_next_to_a_large_mean_matches_sklearn(method, offset):
    """Data 1000 + 0.01 noise in fp32: the variance is 1e-10 of the data's energy; the ratios still match
    scikit-learn's float64 PCA (means accumulated in float64, variance summed two-pass)."""
    g = torch.Generator().manual_seed(0)
    X = torch.full((1000, 20), offset) + 1e-2 * torch.randn(1000, 20, generator=g) @ torch.diag(
        1.1 ** -torch.arange(20.0)
    )
    result = lowrank.pca(X, 3, method=method, seed=0)
    reference = PCA(3).fit(X.double().numpy()).explained_variance_ratio_
    ratio = result.explained_variance_ratio.double().numpy()
    assert np.allclose(ratio, reference, rtol=2e-2 if offset else 1e-4)
    assert float(result.explained_variance_ratio.sum()) <= 1.0


_Xp = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
_R = lowrank.pca(_Xp, 3)

PCA_BAD = [
    ("nan", lambda: lowrank.pca(nan_at(_Xp), 3), ValueError, "X contains NaN"),
    ("inf", lambda: lowrank.pca(nan_at(_Xp, float("inf")), 3), ValueError, "X contains NaN or Inf"),
    ("meta", lambda: lowrank.pca(torch.empty(40, 10, device="meta"), 3), ValueError, "X is on the meta"),
    ("complex", lambda: lowrank.pca(_Xp.to(torch.complex64), 3), TypeError, "X must be real"),
    ("type", lambda: lowrank.pca("X", 3), TypeError, "X must be"),
    ("k", lambda: lowrank.pca(_Xp, 0), ValueError, "k must be >= 1"),
    ("seed big", lambda: lowrank.pca(_Xp, 3, seed=2**63), ValueError, "seed must be in"),
    ("seed neg", lambda: lowrank.pca(_Xp, 3, seed=-1), ValueError, "seed must be in"),
    (
        "seed float",
        lambda: lowrank.pca(_Xp, 3, seed=0.5),
        TypeError,
        "seed must be None, an int",
    ),
    ("method", lambda: lowrank.pca(_Xp, 3, method="svd"), ValueError, "method must be one of"),
    ("one row", lambda: lowrank.pca(_Xp[:1], 1), ValueError, "at least 2 samples"),
]

PCA_TRANSFORM_BAD = [
    ("nan", lambda: lowrank.pca_transform(_R, nan_at(_Xp)), ValueError, "X contains NaN"),
    (
        "meta",
        lambda: lowrank.pca_transform(_R, torch.empty(4, 10, device="meta")),
        ValueError,
        "X is on the meta",
    ),
    ("complex", lambda: lowrank.pca_transform(_R, _Xp.to(torch.complex64)), TypeError, "X must be real"),
    ("features", lambda: lowrank.pca_transform(_R, _Xp[:, :5]), ValueError, "X has 5 features"),
    ("result", lambda: lowrank.pca_transform((1, 2), _Xp), TypeError, "result must be a PCAResult"),
]

PCA_INVERSE_BAD = [
    (
        "nan",
        lambda: lowrank.pca_inverse_transform(_R, nan_at(torch.zeros(4, 3))),
        ValueError,
        "Z contains NaN",
    ),
    (
        "meta",
        lambda: lowrank.pca_inverse_transform(_R, torch.empty(4, 3, device="meta")),
        ValueError,
        "Z is on",
    ),
    (
        "sparse",
        lambda: lowrank.pca_inverse_transform(_R, torch.zeros(4, 3).to_sparse()),
        TypeError,
        "Z must be a",
    ),
    (
        "complex",
        lambda: lowrank.pca_inverse_transform(_R, torch.zeros(4, 3, dtype=torch.complex64)),
        TypeError,
        "Z",
    ),
    ("shape", lambda: lowrank.pca_inverse_transform(_R, torch.zeros(4, 2)), ValueError, "Z must be a"),
    ("result", lambda: lowrank.pca_inverse_transform(None, torch.zeros(4, 3)), TypeError, "result must be"),
]


@pytest.mark.parametrize("fn, error, match", [row[1:] for row in PCA_BAD], ids=[row[0] for row in PCA_BAD])
def test_pca_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in PCA_TRANSFORM_BAD], ids=[row[0] for row in PCA_TRANSFORM_BAD]
)
def test_pca_transform_bad_input(fn, error, match):
    check_bad(fn, error, match)


@pytest.mark.parametrize(
    "fn, error, match", [row[1:] for row in PCA_INVERSE_BAD], ids=[row[0] for row in PCA_INVERSE_BAD]
)
def test_pca_inverse_transform_bad_input(fn, error, match):
    check_bad(fn, error, match)
