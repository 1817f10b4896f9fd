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
