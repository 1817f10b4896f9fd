"""Faults found by user test 11 (StreamingSVD's counter-based row draws, commit 8200cbd): each test asserts
what a user should get, against an independent reference (float64 exact SVD, the stream's own state)."""

from __future__ import annotations

import pytest
import torch

from lowrank.sketch import StreamingSVD


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (U * 0.5 ** torch.arange(n, dtype=torch.float64)) @ V.T


def test_row_offset_beyond_the_generators_rows_is_a_value_error_naming_it():
    """row_offset = 2**60 (or >= 2**63) was accepted, then update() raised a ValueError about the private
    op's ``start`` (or pybind's RuntimeError): the generator reads word ``i W + j`` of a 2**62 counter.
    Now the constructor names row_offset, the last rows work, and a block past them changes nothing."""
    n, k = 30, 3
    limit = (2**62 - 1) // (8 + 8 + 1)  # zeta_s + zeta_c sign picks and 1 sign word per row (Theta: 5)
    for offset in (limit, 2**60, 2**63, 2**64):
        with pytest.raises(ValueError, match=f"row_offset must be < {limit}.*got {offset}"):
            StreamingSVD(n, k, seed=1, row_offset=offset)
    A = _decaying(200, n, seed=2)
    sk = StreamingSVD(n, k, seed=1, row_offset=limit - 200)
    sk.update(A[:150]).update(A[150:])  # up to the last row
    torch.testing.assert_close(sk.result().S, torch.linalg.svdvals(A)[:k], rtol=2e-3, atol=0)
    state = {key: value.clone() for key, value in sk._acc.items()}
    with pytest.raises(ValueError, match="row_offset=.* plus 201 rows.*beyond the last row"):
        sk.update(A[:1])
    assert sk.n_rows == 200
    assert all(torch.equal(state[key], sk._acc[key]) for key in state)
    # a state whose rows pass the limit (hand-edited) is refused by load_state_dict, naming the rows
    bad = StreamingSVD(n, k, seed=1, row_offset=limit - 200).update(A).state_dict()
    bad["row_offset"] = limit - 100
    with pytest.raises(ValueError, match="row_offset \\+ n_rows = .* beyond the last global row"):
        StreamingSVD(n, k, seed=1).load_state_dict(bad)
    # more than 34 Gaussian test rows mean more words per row for Theta, and fewer rows
    small = (2**62 - 1) // 50
    with pytest.raises(ValueError, match=f"row_offset must be < {small}"):
        StreamingSVD(n, k, seed=1, n_test=100, row_offset=small)


def test_n_test_does_not_change_the_factorisation():
    """With one generator call per row for Psi, Phi and Theta, n_test set the words per row, so Psi's and
    Phi's draws (and U, S, V) changed with n_test: turning the error estimate off changed the SVD. Now the
    sign maps come from a key of their own; the estimate stays within a factor 2 of the exact residual."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(900, 8, dtype=torch.float64, generator=gen) @ torch.randn(
        8, 60, dtype=torch.float64, generator=gen
    )
    A += 1e-2 * torch.randn(900, 60, dtype=torch.float64, generator=gen)
    ref = StreamingSVD(60, 3, seed=5, n_test=0, row_offset=7).update(A[:400]).update(A[400:]).result()
    for q in (1, 10, 11, 40):
        sk = StreamingSVD(60, 3, seed=5, n_test=q, row_offset=7).update(A[:400]).update(A[400:])
        got = sk.result()
        for name in ("U", "S", "Vh"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (q, name)
        truth = float(torch.linalg.norm(A - (got.U * got.S) @ got.Vh))
        assert 0.5 < sk.error_estimate() / truth < 2.0


def test_torchs_default_dtype_and_device_do_not_change_the_stream():
    """Under torch.set_default_dtype(torch.float64), Omega and Xi were drawn in float64 (other values: S
    changed by 3 on a flat spectrum); under ``with torch.device(...)`` (meta here, cuda for a user
    building a model) the row draws and scipy/torch.sparse block conversions went to that device and
    failed (NotImplementedError from the CPU-only op, ValueError 'block is on the meta device')."""
    import scipy.sparse as sp

    import lowrank

    A = _decaying(300, 20, seed=4)
    ref = StreamingSVD(20, 3, seed=0, center=True).update(A[:100]).update(A[100:])
    want = ref.result()
    centred = torch.linalg.svdvals(A - A.mean(0))[:3]
    torch.testing.assert_close(want.S, centred, rtol=2e-3, atol=0)  # the reference stream is right
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = StreamingSVD(20, 3, seed=0, center=True).update(A[:100]).update(A[100:]).result()
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(got.S, want.S) and torch.equal(got.Vh, want.Vh)
    blocks = {
        "dense": lambda X: X,
        "numpy": lambda X: X.numpy(),
        "scipy csr": lambda X: sp.csr_matrix(X.numpy()),
        "scipy coo": lambda X: sp.coo_matrix(X.numpy()),
        "torch coo": lambda X: X.to_sparse(),
        "torch csr": lambda X: X.to_sparse_csr(),
        "torch hybrid coo": lambda X: X.to_sparse(sparse_dim=1),
    }
    rsvd_ref = lowrank.rsvd(sp.csr_matrix(A.numpy()), 3, seed=0)
    for name, make in blocks.items():
        with torch.device("meta"):
            sk = StreamingSVD(20, 3, seed=0, center=True).update(make(A[:100])).update(make(A[100:]))
            got = sk.result()
            estimate = sk.error_estimate()
            rsvd = lowrank.rsvd(make(A), 3, seed=0)
        assert got.S.device.type == "cpu", name
        torch.testing.assert_close(got.S, want.S, rtol=1e-12, atol=0, msg=name)
        torch.testing.assert_close(got.Vh, want.Vh, rtol=0, atol=1e-12, msg=name)
        assert abs(estimate / ref.error_estimate() - 1) < 1e-9, name
        torch.testing.assert_close(rsvd.S, rsvd_ref.S, rtol=1e-12, atol=0, msg=name)


def test_big_endian_numpy_blocks_are_read():
    """A big-endian array (np.load of a '>f8' file, FITS data) raised torch's 'byte order different from
    the native byte order' ValueError in StreamingSVD.update and lowrank.rsvd: it is now read (one copy)."""
    import numpy as np

    import lowrank

    A = _decaying(120, 25, seed=6).numpy()
    for dtype in ("f8", "f4"):
        native = A.astype("<" + dtype)
        big = A.astype(">" + dtype)
        assert not big.dtype.isnative and np.array_equal(big, native)
        want = StreamingSVD(25, 3, seed=0).update(native[:50]).update(native[50:]).result()
        got = StreamingSVD(25, 3, seed=0).update(big[:50]).update(big[50:]).result()
        assert torch.equal(got.S, want.S) and torch.equal(got.Vh, want.Vh)
        exact = torch.linalg.svdvals(torch.from_numpy(native).double())[:3]
        torch.testing.assert_close(lowrank.rsvd(big, 3, seed=0).S.double(), exact, rtol=1e-4, atol=0)
