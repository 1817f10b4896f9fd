"""Public bug reports of the libraries lowrank replaces, replayed against lowrank's math side.

Each test names the report it replays (repository, issue) and checks lowrank's equivalent call against an
independent float64 reference (NumPy's exact SVD) or the documented behaviour.
"""

import numpy as np
import pytest
import torch

import lowrank


def _decaying(m: int, n: int, rate: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    S = rate ** torch.arange(n, dtype=torch.float64)
    return U * S @ V.T, S.numpy()


# scikit-learn #11624 / #23262 (randomized_svd overflows in its power iterations on large data): the
# float64 analogue -- sums of squares leave float64's range for norms beyond ~1e154 or below ~1e-154.
# lowrank's fixed-precision mode, PCA's variance ratios and svd_error were garbage there.
@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_fixed_precision_rank_is_scale_free_in_float64(scale):
    A, S = _decaying(120, 80)
    want = lowrank.rsvd(A, 60, tol=1e-3, seed=0)
    got = lowrank.rsvd(A * scale, 60, tol=1e-3, seed=0)
    assert len(got.S) == len(want.S) < 60
    np.testing.assert_allclose(got.S.numpy() / scale, want.S.numpy(), rtol=1e-8)
    np.testing.assert_allclose(got.S[:5].numpy() / scale, S[:5], rtol=1e-10)
    residual = torch.linalg.norm(got.U * (got.S / scale) @ got.Vh - A) / torch.linalg.norm(A)
    assert residual <= 1e-3


@pytest.mark.parametrize("scale", [1e-300, 1e300])
@pytest.mark.parametrize("sparse", [False, True])
def test_pca_variance_ratio_is_scale_free_in_float64(scale, sparse):
    A, _ = _decaying(120, 80)
    X = A * scale
    ref = np.linalg.svd((A - A.mean(0)).numpy(), compute_uv=False) ** 2
    ratio = ref[:5] / ref.sum()
    got = lowrank.pca(X.to_sparse() if sparse else X, 5, seed=0, method="randomized")
    np.testing.assert_allclose(got.explained_variance_ratio.numpy(), ratio, rtol=1e-8)


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_svd_error_is_scale_free_in_float64(scale):
    A, S = _decaying(120, 80)
    r = lowrank.rsvd(A * scale, 10, seed=0)
    err = float(lowrank.svd_error(A * scale, *r, n_iter=30, seed=0))
    assert err / scale == pytest.approx(S[10], rel=1e-4)
