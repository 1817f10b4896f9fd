"""Faults a user trial found in svd / _linop / pca / qr, each asserted against an independent reference.

pca's float32 variance ratios at extreme scales (S**2 left float32's range), scipy LinearOperators without
an adjoint or with a negative shape, a NaN shift for cholesky_qr, NumPy scalars for tol / oversample /
n_iter / passes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse.linalg as spl
import torch

import lowrank


def _pca_data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((500, 40)) @ np.diag(np.linspace(5, 0.1, 40)) + 3.0


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30])
def test_pca_float32_variance_ratio_at_any_scale(scale):
    from sklearn.decomposition import PCA

    X = _pca_data()
    reference = PCA(3, svd_solver="full").fit(X).explained_variance_ratio_
    got = lowrank.pca((X * scale).astype(np.float32), 3).explained_variance_ratio
    np.testing.assert_allclose(got.double().numpy(), reference, rtol=1e-4)


def test_linear_operator_without_adjoint_is_named():
    D = np.random.default_rng(0).standard_normal((30, 20))
    op = spl.LinearOperator(D.shape, matvec=lambda x: D @ x, dtype=np.float64)
    with pytest.raises((TypeError, ValueError), match=r"\bA\b.*(adjoint|rmatvec|rmatmat)"):
        lowrank.rsvd(op, 3, seed=0)


def test_linear_operator_with_negative_shape_is_refused():
    class Op:
        shape = (-1, 20)
        dtype = torch.float64

        def matmul(self, X):
            return X

        def rmatmul(self, Y):
            return Y

    with pytest.raises(ValueError, match="shape"):
        lowrank.rsvd(Op(), 3, seed=0)


def test_cholesky_qr_nan_shift_is_refused():
    X = torch.randn(50, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shift"):
        lowrank.cholesky_qr(X, shift=float("nan"))


@pytest.mark.parametrize(
    "call",
    [
        lambda A: lowrank.rsvd(A, tol=np.float32(0.5), seed=0),
        lambda A: lowrank.rsvd(A, 8, oversample=np.int64(5), seed=0),
        lambda A: lowrank.rsvd(A, 8, n_iter=np.int64(2), seed=0),
        lambda A: lowrank.pca(A, 3, method="randomized", n_iter=np.int64(2), seed=0),
        lambda A: lowrank.svd_error(A, *lowrank.rsvd(A, 3, seed=0), n_iter=np.int64(5), seed=0),
        lambda A: lowrank.cholesky_qr(A, passes=np.int64(2)),
    ],
    ids=[
        "rsvd-tol",
        "rsvd-oversample",
        "rsvd-n_iter",
        "pca-n_iter",
        "svd_error-n_iter",
        "cholesky_qr-passes",
    ],
)
def test_numpy_scalar_arguments(call):
    A = torch.randn(60, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    call(A)


# --- LoRA user trial: faults in lowrank/lora/layers.py (add_adapter), fixed there ---------------------------


def test_add_adapter_takes_numpy_scalars():
    torch.manual_seed(0)
    layer = lowrank.LoRALinear.from_linear(torch.nn.Linear(8, 16), 2)
    layer.add_adapter("b", np.int64(3), alpha=np.float32(6.0), dropout=np.float32(0.1))
    assert layer.r["b"] == 3 and layer.scaling["b"] == pytest.approx(2.0)


def test_add_adapter_refuses_the_reserved_base_name():
    torch.manual_seed(0)
    layer = lowrank.LoRALinear.from_linear(torch.nn.Linear(8, 16), 2)
    with pytest.raises(ValueError, match="__base__"):
        layer.add_adapter(lowrank.lora.BASE_ADAPTER, 2)


def test_peft_adapter_with_rank_above_the_layer_size_loads(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    config = peft.LoraConfig(r=10, lora_alpha=20, target_modules=["0", "2"], init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), config).eval()
    reference.save_pretrained(tmp_path)
    x = torch.randn(5, 8)
    ours = lowrank.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected = reference(x)
        assert float((ours(x) - expected).norm() / expected.norm()) <= 1e-5


def test_extract_lora_takes_a_numpy_rank():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(60, 40, generator=g, dtype=torch.float64)
    D = torch.randn(60, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 40, generator=g, dtype=torch.float64
    )
    B, A = lowrank.extract_lora(W, W + D, np.int64(5), method="svd")
    torch.testing.assert_close(B @ A, D, rtol=1e-10, atol=1e-10)
    # the other initialisations of lora/init.py take it too (same factors as a Python int)
    for factors in (lowrank.lora.pissa_factors, lowrank.lora.olora_factors):
        for got, want in zip(factors(W, np.int64(3), 2.0), factors(W, 3, 2.0)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- math-side user trial (user-test5) ------------------------------------------------------------------


def _safetensors_entries(tensors):
    from lowrank import io as lowrank_io

    return lowrank_io.entries_from_dict(tensors)


@pytest.mark.parametrize(
    "tensors, metadata, error, match",
    [
        # each of these wrote a file that safetensors then refused to open ("invalid JSON in header")
        ({"a": torch.ones(2)}, {"step": 3}, TypeError, "metadata must map str to str"),
        ({"a": torch.ones(2)}, {"note": None}, TypeError, "metadata must map str to str"),
        ({"__metadata__": torch.ones(2), "b": torch.zeros(1)}, None, ValueError, "__metadata__"),
        # these failed inside torch after the header was written (RuntimeError / NotImplementedError)
        ({"a": torch.ones(3).to_sparse()}, None, TypeError, "dense"),
        ({"a": torch.ones(3, device="meta")}, None, ValueError, "meta"),
    ],
    ids=["int-metadata", "none-metadata", "metadata-name", "sparse", "meta"],
)
def test_write_safetensors_refuses_what_readers_cannot_read(tmp_path, tensors, metadata, error, match):
    from safetensors.torch import load_file, save_file

    from lowrank import io as lowrank_io

    path = tmp_path / "x.safetensors"
    save_file({"old": torch.arange(3.0)}, str(path))
    with pytest.raises(error, match=match):
        lowrank_io.write_safetensors(path, _safetensors_entries(tensors), metadata)
    torch.testing.assert_close(load_file(str(path))["old"], torch.arange(3.0))  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temporary left behind


def test_write_safetensors_round_trip_with_string_metadata(tmp_path):
    from safetensors import safe_open

    from lowrank import io as lowrank_io

    path = tmp_path / "x.safetensors"
    tensors = {"a": torch.randn(3, 4, dtype=torch.float64).T, "b": torch.arange(5), "c": torch.zeros(0, 2)}
    lowrank_io.write_safetensors(path, _safetensors_entries(tensors), {"step": "3"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
        for name, value in tensors.items():
            torch.testing.assert_close(f.get_tensor(name), value, rtol=0, atol=0)


def _low_rank_rows(m=200, n=50, rank=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, rank, dtype=torch.float64, generator=g) @ torch.randn(
        rank, n, dtype=torch.float64, generator=g
    )
    return (A + 1e-3 * torch.randn(m, n, dtype=torch.float64, generator=g)).to(dtype)


def _corrupt(name):
    def edit(state):
        if name == "no-sketches":
            del state["sketches"]
        elif name == "no-n_rows":
            del state["n_rows"]
        elif name == "no-Y":
            del state["Y"]
        elif name == "dtype-unknown":
            state["dtype"] = "nope"
        elif name == "dtype-int32":
            state["dtype"] = "int32"
        elif name == "sketches-list":
            state["sketches"] = [1, 2]
        elif name == "sketch-G-missing":
            del state["sketches"]["G"]
        elif name == "sketch-G-ndarray":
            state["sketches"]["G"] = state["sketches"]["G"].numpy()
        elif name == "sketch-G-shape":
            state["sketches"]["G"] = torch.zeros(3, 3, dtype=torch.float64)
        elif name == "sketch-nan":
            state["sketches"]["G"] = torch.full_like(state["sketches"]["G"], float("nan"))
        elif name == "Y-columns":
            state["Y"] = state["Y"][:, :3]
        elif name == "n_rows-str":
            state["n_rows"] = "x"
        elif name == "row_offset-negative":
            state["row_offset"] = -5
        elif name == "row_offset-str":
            state["row_offset"] = "a"

    return edit


_CORRUPTIONS = [
    "no-sketches",
    "no-n_rows",
    "no-Y",
    "dtype-unknown",
    "dtype-int32",
    "sketches-list",
    "sketch-G-missing",
    "sketch-G-ndarray",
    "sketch-G-shape",
    "sketch-nan",
    "Y-columns",
    "n_rows-str",
    "row_offset-negative",
    "row_offset-str",
]


@pytest.mark.parametrize("corruption", _CORRUPTIONS)
def test_streaming_load_of_a_corrupted_state_is_a_value_error_and_changes_nothing(corruption):
    """Were KeyError / AttributeError / TypeError / RuntimeError / torch's _LinAlgError at result(), or were
    accepted (an int32 dtype returned int32 singular values; a negative or str row_offset); a state that
    failed its shape check had already overwritten this instance's sketches (S off by 96)."""
    A = _low_rank_rows()
    state = lowrank.StreamingSVD(50, 5, seed=0).update(A[:50]).state_dict()
    _corrupt(corruption)(state)
    sk = lowrank.StreamingSVD(50, 5, seed=0).update(A[:100])
    before = sk.result()
    with pytest.raises(ValueError, match="state"):
        sk.load_state_dict(state)
    assert sk.n_rows == 100 and sk.row_offset == 0
    sk.update(A[100:])
    reference = torch.linalg.svdvals(A)[:5]  # the stream continues as if the load had not been tried
    assert float((sk.result().S - reference).abs().max() / reference[0]) < 1e-3
    torch.testing.assert_close(before.S, lowrank.StreamingSVD(50, 5, seed=0).update(A[:100]).result().S)


def test_streaming_update_takes_a_block_that_requires_grad():
    """Was "matmul(): functions with out=... arguments don't support automatic differentiation"."""
    A = _low_rank_rows()
    plain = lowrank.StreamingSVD(50, 5, seed=0, center=True)
    tracked = lowrank.StreamingSVD(50, 5, seed=0, center=True)
    for start in range(0, 200, 50):
        plain.update(A[start : start + 50])
        tracked.update(A[start : start + 50].clone().requires_grad_())
    for got, want in zip(tracked.result(), plain.result()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    reference = torch.linalg.svdvals(A - A.mean(0))[:5]
    assert float((tracked.result().S - reference).abs().max() / reference[0]) < 1e-3


@pytest.mark.parametrize("device", ["nope", 3.5])
def test_streaming_bad_device_is_named(device):
    """Were torch's RuntimeError ("Expected one of cpu, cuda, ...") / TypeError ("device() received an
    invalid combination of arguments")."""
    with pytest.raises(ValueError, match="device"):
        lowrank.StreamingSVD(50, 5, device=device)


@pytest.mark.parametrize("scale", [1e-170, 1e-300])
def test_streaming_float64_at_tiny_scales(scale):
    """The float64 Gram Y^T Y underflowed for data below ~1e-160 and result() returned S = 0 without a word;
    such a stream now raises ValueError (as too large data did), and nothing is added. Tiny rows in a stream
    of ordinary ones are fine (the check is on the accumulated Gram)."""
    A = _low_rank_rows()
    sk = lowrank.StreamingSVD(50, 5, seed=0)
    with pytest.raises(ValueError, match="too small"):
        sk.update(A[:50] * scale)
    assert sk.n_rows == 0
    mixed = lowrank.StreamingSVD(50, 5, seed=0).update(A[:150]).update(A[150:] * scale)
    reference = torch.linalg.svdvals(torch.cat([A[:150], A[150:] * scale]))[:5]
    assert float((mixed.result().S - reference).abs().max() / reference[0]) < 1e-3


def test_streaming_state_of_a_reduced_sketch_round_trips():
    """The summed row count of lowrank.distributed.reduce_sketch was not saved: a reduced sketch reloaded as
    one rank's rows (centring divided by the local count, S off by 65) and update() was accepted again."""
    A = _low_rank_rows(900, 40, 6) + 3.0
    whole = lowrank.StreamingSVD(40, 5, seed=4, center=True).update(A)
    top = lowrank.StreamingSVD(40, 5, seed=4, center=True).update(A[:500])
    bottom = lowrank.StreamingSVD(40, 5, seed=4, center=True, row_offset=500).update(A[500:])
    for mine, theirs in zip(top._sum_buffers(), bottom._sum_buffers()):  # what reduce_sketch does
        mine += theirs
    top._reduced_rows = 900
    torch.testing.assert_close(top.result().S, whole.result().S, rtol=1e-10, atol=0)
    back = lowrank.StreamingSVD(40, 5, seed=4, center=True).load_state_dict(top.state_dict())
    torch.testing.assert_close(back.result().S, whole.result().S, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="already summed"):
        back.update(A[:3])
    # a state without the entry (saved before it was kept) loads as not reduced; a bad one is named
    old = top.state_dict()
    del old["reduced_rows"]
    assert lowrank.StreamingSVD(40, 5, seed=4, center=True).load_state_dict(old)._reduced_rows is None
    with pytest.raises(ValueError, match="reduced_rows"):
        lowrank.StreamingSVD(40, 5, seed=4, center=True).load_state_dict({**old, "reduced_rows": -1})


def _completion_problem():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((60, 3)) @ rng.standard_normal((3, 40))
    return M, rng.random((60, 40)) < 0.5


def test_als_takes_numpy_masks_with_negative_strides():
    """A reversed view (``mask[::-1]``) was refused as "mask must be a boolean tensor or array, got
    ndarray"; the fit must equal that of the same data and mask made contiguous."""
    M, mask = _completion_problem()
    X, observed = M[::-1], mask[::-1]
    U, V = lowrank.als(X, observed, 3, seed=0)
    U2, V2 = lowrank.als(X.copy(), observed.copy(), 3, seed=0)
    torch.testing.assert_close(U @ V.T, U2 @ V2.T, rtol=0, atol=0)
    assert float(np.linalg.norm(X - (U @ V.T).numpy()) / np.linalg.norm(X)) < 1e-3
    _, _, history = lowrank.als(M, mask, 3, seed=0, validation=(~mask)[:, ::-1], return_history=True)
    assert np.isfinite(history["val_rmse"]).all()


@pytest.mark.parametrize(
    "validation, error, match",
    [
        (np.ones((5, 40), dtype=bool), ValueError, "^validation has shape"),  # said "mask has shape"
        (np.ones((60, 40), dtype=np.int8), TypeError, "^validation must have a floating dtype"),
        (np.zeros((60, 40), dtype=bool), ValueError, "no held-out entries"),  # val_rmse was all NaN
    ],
    ids=["shape", "dtype", "empty"],
)
def test_als_validation_errors_name_validation(validation, error, match):
    M, mask = _completion_problem()
    with pytest.raises(error, match=match):
        lowrank.als(M, mask, 3, seed=0, validation=validation)


def test_nmf_takes_data_that_requires_grad():
    """Was "addmv(): functions with out=... arguments don't support automatic differentiation"; the factors
    must equal those of the detached data, and fit it about as well as scikit-learn's NMF (30 iterations)."""
    from sklearn.decomposition import NMF

    X = torch.rand(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = NMF(3, init="nndsvd", max_iter=500, tol=1e-6).fit(X.numpy())
    best = float(np.linalg.norm(X.numpy() - reference.transform(X.numpy()) @ reference.components_))
    for init in ("nndsvd", "random"):
        W, H = lowrank.nmf(X.clone().requires_grad_(), 3, init=init, seed=0, max_iter=30, tol=0)
        W0, H0 = lowrank.nmf(X, 3, init=init, seed=0, max_iter=30, tol=0)
        torch.testing.assert_close(W, W0, rtol=0, atol=0)
        torch.testing.assert_close(H, H0, rtol=0, atol=0)
        assert not W.requires_grad and float((X - W @ H).norm()) <= 1.05 * best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_cholesky_qr_of_an_empty_batch(dtype):
    """Was "amax(): Expected reduction dim to be specified for input.numel() == 0"; torch.linalg.qr and
    lowrank.rsvd / lowrank.svd return empty batches."""
    X = torch.zeros(0, 5, 3, dtype=dtype)
    Q, R = lowrank.cholesky_qr(X)
    Q0, R0 = torch.linalg.qr(X)
    assert Q.shape == Q0.shape == (0, 5, 3) and R.shape == R0.shape == (0, 3, 3)
    assert Q.dtype == R.dtype == dtype
    # a non-empty batch is unchanged: orthonormal Q, R with a positive diagonal, Q R = X
    X = torch.randn(2, 5, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    Q, R = lowrank.cholesky_qr(X)
    eye = torch.eye(3, dtype=dtype).expand(2, 3, 3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(Q.mH @ Q, eye, rtol=0, atol=tol)
    torch.testing.assert_close(Q @ R, X, rtol=0, atol=tol)
    assert bool((torch.diagonal(R, dim1=-2, dim2=-1).real > 0).all())


def test_svd_error_refuses_factors_whose_batch_shapes_do_not_match():
    """S given as the k x k matrix diag(S) (as some libraries return it) was broadcast as a batch: the
    estimate came back with shape (k,) and wrong values (55.7, 59.1, 55.8 for a residual norm of 40.2)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 6, dtype=torch.float64, generator=g) @ torch.randn(
        6, 40, dtype=torch.float64, generator=g
    )
    A = A + 1e-3 * torch.randn(50, 40, dtype=torch.float64, generator=g)
    U, S, Vh = lowrank.svd(A, 3)
    exact = torch.linalg.svdvals(A)[3]  # ||A - A_3||_2
    assert float(abs(lowrank.svd_error(A, U, S, Vh, seed=0) - exact) / exact) < 1e-3
    for bad in [
        (U, torch.diag(S), Vh),
        (U.expand(2, 50, 3), S, Vh),
        (U[0], S, Vh),
        (U, S, Vh.expand(2, 3, 40)),
    ]:
        with pytest.raises(ValueError, match="do not factor"):
            lowrank.svd_error(A, *bad, seed=0)
    # batched factors of a batched A keep working
    batch = A.expand(2, 50, 40)
    est = lowrank.svd_error(batch, U.expand(2, 50, 3), S.expand(2, 3), Vh.expand(2, 3, 40), seed=0)
    assert est.shape == (2,) and float((est - exact).abs().max() / exact) < 1e-3


def test_uncentred_pca_is_truncated_svd_with_second_moments():
    """The docstring promised TruncatedSVD's decomposition for ``center=False`` without saying that the
    variance attributes keep their uncentred meaning (3.7x / 4.1x TruncatedSVD's on this sparse matrix);
    both are now documented and pinned against scikit-learn and float64 formulas."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    X = sp.random(400, 60, density=0.1, random_state=1, format="csr")
    res = lowrank.pca(X, 5, center=False, seed=0)
    ts = TruncatedSVD(5, algorithm="arpack").fit(X)
    np.testing.assert_allclose(res.singular_values.numpy(), ts.singular_values_, rtol=1e-10)
    np.testing.assert_allclose(np.abs(res.components.numpy()), np.abs(ts.components_), atol=1e-8)
    S2 = ts.singular_values_**2
    np.testing.assert_allclose(res.explained_variance.numpy(), S2 / (400 - 1), rtol=1e-10)
    np.testing.assert_allclose(res.explained_variance_ratio.numpy(), S2 / sp.linalg.norm(X) ** 2, rtol=1e-10)
    assert np.all(res.mean.numpy() == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nystrom_of_the_zero_matrix_is_zero(dtype):
    """Was eigenvalues of 4e-323 (subnormal remainders of a shift grown to make the Cholesky factorisation
    of a zero sketch succeed) where the exact answer, and the Nystrom approximation, is 0."""
    U, L = lowrank.nystrom(torch.zeros(10, 10, dtype=dtype), 3, seed=0)
    assert L.dtype == dtype and torch.equal(L, torch.zeros(3, dtype=dtype))
    torch.testing.assert_close(U.mT @ U, torch.eye(3, dtype=dtype), rtol=0, atol=1e-5)
    # a PSD matrix of rank 3 asked for 5: the top 3 exact, the rest zero to rounding
    Q = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[
        0
    ]
    U, L = lowrank.nystrom((Q * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ Q.T, 5, seed=0)
    torch.testing.assert_close(
        L, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_streamed_rsvd_default_sketch_is_streaming_svds_default():
    """stream_rsvd's docstring said the default sketch was ``k + 1`` (2k + 1); it is StreamingSVD's default
    ``min(4k + 1, n)``: rsvd of a list of blocks equals that stream, and not the 2k + 1 one."""
    A = _low_rank_rows(300, 60, 12)
    blocks = [A[i : i + 100] for i in range(0, 300, 100)]
    got = lowrank.rsvd(blocks, 5, seed=3)
    default = lowrank.StreamingSVD(60, 5, seed=3)
    narrow = lowrank.StreamingSVD(60, 5, seed=3, sketch=11)
    for b in blocks:
        default.update(b)
        narrow.update(b)
    assert default.sketch == 21
    torch.testing.assert_close(got.S, default.result().S, rtol=0, atol=0)
    assert not torch.equal(got.S, narrow.result().S)


def test_operator_products_returned_as_negative_stride_views():
    """An operator whose products come back as NumPy views with negative strides (``np.flipud(D @ X)``, a
    row reversal) failed with torch's "At least one stride in the given numpy array is negative"."""
    rng = np.random.default_rng(0)
    D = rng.standard_normal((50, 8)) @ rng.standard_normal((8, 40))
    J = np.flipud(D)  # the matrix both operators represent

    class Flipped:
        shape, dtype = (50, 40), np.float64

        def matmul(self, X):
            return np.flipud(D @ X.numpy())

        def rmatmul(self, Y):
            return D.T @ np.flipud(Y.numpy())

    scipy_op = spl.LinearOperator(
        D.shape,
        matvec=lambda x: np.flipud(D @ x),
        matmat=lambda X: np.flipud(D @ X),
        rmatvec=lambda y: D.T @ np.flipud(y),
        rmatmat=lambda Y: D.T @ np.flipud(Y),
        dtype=np.float64,
    )
    s = np.linalg.svd(J, compute_uv=False)
    for op in (Flipped(), scipy_op):
        U, S, Vh = lowrank.rsvd(op, 8, seed=0)
        np.testing.assert_allclose(S.numpy(), s[:8], rtol=1e-10)
        np.testing.assert_allclose((U * S) @ Vh, J, atol=1e-10)


def test_numpy_bool_flags():
    """``center=np.True_`` (e.g. read from a NumPy config array) was "center must be a bool, got bool" in
    rsvd, pca and StreamingSVD (keep_u too); results must equal those of Python bools."""
    A = _low_rank_rows(120, 30, 6) + 2.0
    reference = torch.linalg.svdvals(A - A.mean(0))[:4]
    got = lowrank.rsvd(A, 4, center=np.True_, seed=0)
    torch.testing.assert_close(got.S, lowrank.rsvd(A, 4, center=True, seed=0).S, rtol=0, atol=0)
    torch.testing.assert_close(got.S, reference, rtol=1e-8, atol=0)
    streamed = lowrank.rsvd([A[:60], A[60:]], 4, center=np.True_, seed=0)
    torch.testing.assert_close(streamed.S, lowrank.rsvd([A[:60], A[60:]], 4, center=True, seed=0).S)
    pcs = lowrank.pca(A, 4, center=np.True_)
    torch.testing.assert_close(pcs.singular_values, reference, rtol=1e-10, atol=0)
    sk = lowrank.StreamingSVD(30, 4, center=np.True_, keep_u=np.False_, seed=0).update(A)
    assert sk.center is True and sk.keep_u is False and sk.result().U is None
    assert float((sk.result().S - reference).abs().max() / reference[0]) < 1e-3


def test_hybrid_sparse_coo_inputs():
    """A 2-D COO tensor with a dense dimension (``X.to_sparse(sparse_dim=1)``: whole rows stored) failed in
    every routine with torch's "coo_to_sparse_csr: conversion ... with sparse_dim()!=2 is not supported";
    results must equal those of the dense matrix."""
    D = _low_rank_rows(30, 20, 4)
    D[::3] = 0
    rows = torch.tensor([[1, 1, 4]])  # uncoalesced: row 1 stored twice (summed)
    D2 = torch.zeros(30, 20, dtype=torch.float64)
    D2[1], D2[4] = 2.0, torch.arange(20.0, dtype=torch.float64)
    H2 = torch.sparse_coo_tensor(rows, torch.stack([D2[1] / 2, D2[1] / 2, D2[4]]), (30, 20))
    for hybrid, dense in ((D.to_sparse(sparse_dim=1), D), (H2, D2)):
        s = torch.linalg.svdvals(dense)
        torch.testing.assert_close(lowrank.rsvd(hybrid, 2, seed=0).S, s[:2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lowrank.svd(hybrid, 2).S, s[:2], rtol=1e-10, atol=1e-12)
        sk = lowrank.StreamingSVD(20, 2, seed=0).update(hybrid)  # one pass: equal to the dense stream's
        torch.testing.assert_close(
            sk.result().S, lowrank.StreamingSVD(20, 2, seed=0).update(dense).result().S
        )
    s = torch.linalg.svdvals(D - D.mean(0))
    torch.testing.assert_close(lowrank.pca(D.to_sparse(sparse_dim=1), 3, seed=0).singular_values, s[:3])
    P = D.T @ D
    _, L = lowrank.nystrom(P.to_sparse(sparse_dim=1), 3, seed=0)
    torch.testing.assert_close(L, torch.linalg.eigvalsh(P).flip(0)[:3], rtol=1e-8, atol=0)
    W, H = lowrank.nmf(D.abs().to_sparse(sparse_dim=1), 2, seed=0, max_iter=20, tol=0)
    W0, H0 = lowrank.nmf(D.abs().to_sparse(), 2, seed=0, max_iter=20, tol=0)
    torch.testing.assert_close(W @ H, W0 @ H0)


@pytest.mark.parametrize("scale, method", [(3e35, "subspace"), (1e36, "auto"), (1e36, "krylov")])
def test_rsvd_float32_near_the_top_of_its_range(scale, method):
    """float32 data with sigma_1 = 9e37-3e38 (within range) made rsvd raise torch's _LinAlgError from
    overflowing intermediate products; it now reruns on A over a power of two and scales S back. NaN data
    still raise ValueError naming A."""
    rng = np.random.default_rng(0)
    D = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 200))
    A = torch.tensor(D * scale, dtype=torch.float32)
    exact = lowrank.svd(A, 5).S.double()
    assert bool(torch.isfinite(exact).all())
    got = lowrank.rsvd(A, 5, seed=0, method=method).S.double()
    torch.testing.assert_close(got / scale, exact / scale, rtol=1e-5, atol=0)
    bad = A.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lowrank.rsvd(bad, 5, seed=0, method=method)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32])
def test_eight_bit_float_and_complex32_inputs_are_computed_in_single_precision(dtype):
    """float8 (e.g. a quantized checkpoint's raw weights) and complex32 inputs failed inside torch
    ("normal_kernel_cpu" / "isfinite" / "addmm_impl_cpu_" not implemented); they are now computed in
    float32 / complex64 as fp16/bf16 are in float32, with the results of the upcast matrix."""
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(30, 4, generator=g) @ torch.randn(4, 20, generator=g)).to(dtype)
    wide = A.to(torch.complex64 if dtype.is_complex else torch.float32)
    s = torch.linalg.svdvals(wide)
    for got in (lowrank.rsvd(A, 3, seed=0).S, lowrank.svd(A, 3).S):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, s[:3], rtol=1e-5, atol=0)
    Q, R = lowrank.cholesky_qr(A[:, :4])
    assert Q.dtype == wide.dtype
    torch.testing.assert_close(Q @ R, wide[:, :4], rtol=0, atol=1e-5)
    if dtype.is_complex:
        return
    ref = lowrank.pca(wide, 3)
    torch.testing.assert_close(lowrank.pca(A, 3).singular_values, ref.singular_values, rtol=0, atol=0)
    sk = lowrank.StreamingSVD(20, 3, seed=0).update(A)
    torch.testing.assert_close(sk.result().S, lowrank.StreamingSVD(20, 3, seed=0).update(wide).result().S)
    W, H = lowrank.nmf(A.float().abs().to(dtype), 2, seed=0, max_iter=10, tol=0)
    assert W.dtype == torch.float32 and bool((W >= 0).all())
    B, Ah = lowrank.low_rank_factor(A, 4)
    assert B.dtype == Ah.dtype == dtype
    assert float((B.float() @ Ah.float() - wide).norm() / wide.norm()) < 0.2  # 8-bit factors
    C, U, Rr, rows, cols = lowrank.cur(A, 4, seed=0)
    torch.testing.assert_close(C, wide[:, cols], rtol=0, atol=0)


@pytest.mark.parametrize("aliased", ["block", "omega"])
def test_range_gram_out_overlapping_an_input_is_refused(aliased):
    from lowrank._ops import range_gram

    g = torch.Generator().manual_seed(0)
    block = torch.randn(5, 5, generator=g)  # square, so that out may be either of them
    omega = torch.randn(5, 5, generator=g)
    out = block if aliased == "block" else omega
    before = out.clone()
    with pytest.raises(ValueError, match=f"out must not overlap {aliased}"):  # was silent garbage
        range_gram(block, omega, 2, out=out)
    assert torch.equal(out, before)  # refused before anything was written
