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
