"""lowrank.sketch.StreamingSVD (one-pass SVD of a row-block stream) and its routes: lowrank.rsvd on streams,
lowrank.distributed.reduce_sketch. References: float64 exact SVD (torch.linalg / NumPy), explicit centring,
the same matrix streamed in other cuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gloo_harness import run_gloo

import lowrank
from lowrank import sketch as sketch_mod
from lowrank.sketch import StreamingSVD


def _decaying(m: int, n: int, decay: float, seed: int = 0, offset: float = 0.0, dtype=torch.float64):
    """``U diag(decay**i) V^T`` (+ ``offset`` * a random row added to every row), float64 then cast."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen))
    A = (U * decay ** torch.arange(r, dtype=torch.float64)) @ V.T
    if offset:
        A = A + offset * torch.randn(n, dtype=torch.float64, generator=gen)
    return A.to(dtype)


def _stream(A, cuts, **kwargs) -> StreamingSVD:
    sk = StreamingSVD(A.shape[1], **kwargs)
    bounds = [0, *cuts, A.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sk.update(A[lo:hi])
    return sk


def _rel_err(A, result) -> float:
    U, S, Vh = result
    return float(torch.linalg.norm(A - (U.double() * S.double()) @ Vh.double()))


def _optimal(A, k) -> float:
    s = torch.linalg.svdvals(A.double())
    return float(s[k:].square().sum().sqrt())


# ------------------------------------------------------------------------------------------- accuracy


def test_exact_low_rank_recovered():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(400, 6, dtype=torch.float64, generator=gen) @ torch.randn(6, 90, dtype=torch.float64)
    res = _stream(A, [100, 250], k=6, seed=1).result()
    ref = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close(res.S, ref.S[:6], rtol=1e-10, atol=0)
    torch.testing.assert_close(res.U @ torch.diag(res.S) @ res.Vh, A, rtol=0, atol=1e-10 * float(ref.S[0]))
    # subspaces equal: |U^T U_ref| is a rotation (orthonormal)
    torch.testing.assert_close(res.U.T @ res.U, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(res.Vh @ res.Vh.T, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("m", "n", "k", "decay", "dtype"),
    [
        (1500, 300, 10, 0.9, torch.float64),
        (2000, 200, 20, 0.95, torch.float32),
        (600, 500, 8, 0.8, torch.float32),
    ],
)
def test_error_within_1_5x_optimal(m, n, k, decay, dtype):
    A = _decaying(m, n, decay, seed=k)
    ratios = []
    for seed in range(3):
        res = _stream(A.to(dtype), [m // 3, m // 2], k=k, seed=seed).result()
        assert res.U.dtype == dtype and res.U.shape == (m, k) and res.Vh.shape == (k, n)
        ratios.append(_rel_err(A, res) / _optimal(A, k))
    assert max(ratios) <= 1.5, ratios
    # singular values close to the true ones (top ones to within a few percent of sigma_1)
    s_true = torch.linalg.svdvals(A)[:k]
    assert float((res.S.double() - s_true).abs().max() / s_true[0]) < 0.05


def test_error_estimate_within_factor_2_in_95_percent_of_40_seeds():
    A = _decaying(300, 80, 0.85, seed=11)
    hits, ratios = 0, []
    for seed in range(40):
        sk = _stream(A, [120], k=5, seed=seed)
        true = _rel_err(A, sk.result())
        ratio = sk.error_estimate() / true
        ratios.append(ratio)
        hits += 0.5 <= ratio <= 2.0
    assert hits >= 38, sorted(ratios)
    assert 0.7 < float(np.median(ratios)) < 1.3  # unbiased in the square: median near 1


def test_error_estimate_centred_and_float32():
    A = _decaying(500, 120, 0.9, seed=2, offset=2.0)
    sk = _stream(A.float(), [200], k=10, seed=4, center=True)
    true = _rel_err(A - A.mean(0), sk.result())
    assert 0.5 <= sk.error_estimate() / true <= 2.0
    with pytest.raises(ValueError, match="n_test"):
        _stream(A, [], k=3, n_test=0, seed=0).error_estimate()


# ------------------------------------------------------------------------------------------- invariances


def test_stream_cut_invariance():
    m, n = 4096 + 900, 24
    A = _decaying(m, n, 0.7, seed=5)
    one = _stream(A, [], k=4, seed=9).result()
    for cuts in ([1, 2, 3], [4096 - 1, 4096 + 1], [1000, 2000, 3000, 4095, 4096, 4097, 5000]):
        res = _stream(A, cuts, k=4, seed=9).result()
        torch.testing.assert_close(res.S, one.S, rtol=1e-11, atol=0)
        torch.testing.assert_close(res.U, one.U, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.Vh, one.Vh, rtol=0, atol=1e-10)
    # another seed is another draw
    other = _stream(A, [], k=4, seed=10).result()
    assert float((other.Vh - one.Vh).abs().max()) > 1e-12 or float((other.S - one.S).abs().max()) > 1e-14


@pytest.mark.parametrize("keep_u", [True, False])
def test_range_gemm_in_row_chunks_equals_one_product(monkeypatch, request, keep_u):
    """Y = A Omega in row chunks (GEMM_BYTES), the lean mode's reused buffers (blocks growing and
    shrinking): equal to rounding to float64 products of the whole matrix and to one unchunked update;
    equal bit for bit with one thread and with two (threads take whole chunks; every block has at least
    two chunks, so the small-block rule does not apply)."""
    m, n = 2300, 50
    A = _decaying(m, n, 0.85, seed=11, offset=0.5, dtype=torch.float32)
    cuts = [700, 1000, 1900]  # blocks of 700, 300, 900, 400 rows: chunked, buffer reused and grown
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    assert sketch_mod.gemm_rows(n, 4) >= m
    assert sketch_mod.gemm_rows(3000, 4, 5000) == 625  # 8 equal chunks of the 8 MiB target, not 7 x 699 + 107
    plain = _stream(A, cuts, k=5, seed=3, center=True, keep_u=keep_u)  # one GEMM call per block
    one = _stream(A, [], k=5, seed=3, center=True, keep_u=keep_u)  # one update
    monkeypatch.setattr(sketch_mod, "GEMM_BYTES", 1)
    assert sketch_mod.gemm_rows(n, 4) == 256
    torch.set_num_threads(2)  # a block with fewer chunks than threads: one chunk per thread
    assert (
        sketch_mod.gemm_rows(n, 4, 200),
        sketch_mod.gemm_rows(n, 4, 20),
        sketch_mod.gemm_rows(n, 4, 33),
        sketch_mod.gemm_rows(n, 4, 600),
    ) == (
        100,
        20,  # two chunks would hold fewer than 16 rows each (was 16 + 4)
        17,  # 17 + 16, equal (was 16 + 16 + 1)
        200,  # 3 chunks of the 256-row target, made equal
    )
    torch.set_num_threads(1)
    assert sketch_mod.gemm_rows(n, 4, 200) == 200 and sketch_mod.gemm_rows(n, 4, 1000) == 250
    chunked = _stream(A, cuts, k=5, seed=3, center=True, keep_u=keep_u)
    torch.set_num_threads(2)
    two = _stream(A, cuts, k=5, seed=3, center=True, keep_u=keep_u)
    torch.set_num_threads(1)
    assert torch.equal(two._acc["G"], chunked._acc["G"])
    assert torch.equal(two._acc["ysum"], chunked._acc["ysum"])
    assert torch.equal(two.result().S, chunked.result().S)
    Y = A.double() @ chunked._omega().double()
    torch.testing.assert_close(chunked._acc["G"], Y.mT @ Y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked._acc["ysum"], Y.sum(0), rtol=1e-6, atol=1e-6)
    if keep_u:
        torch.testing.assert_close(torch.cat(chunked._Y).double(), Y, rtol=1e-5, atol=1e-5)
    else:
        assert chunked._Y == [] and chunked._buffers["Y"].shape == (900, chunked.sketch)
    for ref, tol in ((plain, 1e-6), (one, 1e-4)):  # float32 sums over a block depend on its cut
        a, b = ref.result(), chunked.result()
        torch.testing.assert_close(b.S, a.S, rtol=tol, atol=0)
        torch.testing.assert_close(b.Vh, a.Vh, rtol=0, atol=tol * 10)
        if keep_u:
            torch.testing.assert_close(b.U, a.U, rtol=0, atol=tol * 10)
        assert abs(chunked.error_estimate() / ref.error_estimate() - 1) < tol * 10


def test_reconstruction_kept_until_the_state_changes():
    """result() then error_estimate() reconstruct once; update, load_state_dict and a summed (distributed)
    sketch each give the new rows' factors, equal to a fresh instance's; Xi is the seed's draw."""
    A = _decaying(900, 60, 0.85, seed=12, offset=0.5)
    sk = _stream(A[:500], [], k=5, seed=4, center=True)
    first = sk.result()
    cached = sk._factor_cache
    assert sk.error_estimate() == _stream(A[:500], [], k=5, seed=4, center=True).error_estimate()
    assert sk._factor_cache is cached  # error_estimate reused result()'s reconstruction
    torch.testing.assert_close(sk._xi(), sk._col_draw()[:, sk.sketch :].double(), rtol=0, atol=0)
    sk.update(A[500:])
    whole = _stream(A, [], k=5, seed=4, center=True)
    for got, want in zip(sk.result(), whole.result()):  # float64 sums in another order: rounding only
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert abs(sk.error_estimate() / whole.error_estimate() - 1) < 1e-9
    assert float((sk.result().S - first.S).abs().max()) > 1e-6
    # load_state_dict replaces the sketch: the reconstruction follows it
    sk.load_state_dict(_stream(A[:500], [], k=5, seed=4, center=True).state_dict())
    torch.testing.assert_close(sk.result().S, first.S, rtol=1e-12, atol=0)
    # what lowrank.distributed.reduce_sketch does: sum the buffers, then set the row count
    top = _stream(A[:500], [], k=5, seed=4, center=True)
    top.result()
    bottom = _stream(A[500:], [], k=5, seed=4, center=True, row_offset=500)
    for mine, theirs in zip(top._sum_buffers(), bottom._sum_buffers()):
        mine += theirs
    top._reduced_rows = 900
    got = top.result()
    torch.testing.assert_close(got.S, whole.result().S, rtol=1e-10, atol=0)
    # (atol 1e-9: after a reduce result() skips the CholeskyQR step that needs all of U's rows)
    torch.testing.assert_close(got.Vh, whole.result().Vh, rtol=0, atol=1e-9)


def test_sketches_equal_dense_products_of_the_sparse_sign_maps():
    """[Psi A; Phi A], Phi Y, Theta A, 1^T A as dense float64 products of the maps the stream drew."""
    m, n = 4096 + 300, 37
    A = _decaying(m, n, 0.8, seed=4, dtype=torch.float32)
    sk = _stream(A, [1000, 4096 + 5], k=3, sketch=13, core=27, seed=6)
    s, c, q = 13, 27, sk.n_test
    R = sk._row_test(0, m)
    maps = torch.zeros(m, s + c, dtype=torch.float64)
    maps.scatter_(1, R["rows"], R["signs"])
    # zeta = min(8, d) distinct targets per row, with signs +-1, in each map
    assert R["rows"].shape == (m, 16) and set(R["signs"].unique().tolist()) == {-1.0, 1.0}
    assert bool((maps[:, :s] != 0).sum(1).eq(8).all()) and bool((maps[:, s:] != 0).sum(1).eq(8).all())
    Ad = A.double()
    parts = sk._parts(sk._acc["sketch"])
    # sums over one block are rounded in float32 (the block's dtype), then added in float64
    torch.testing.assert_close(torch.cat([parts["W"], parts["PhiA"]]), maps.mT @ Ad, rtol=1e-5, atol=1e-5)
    dense = R["dense"]  # [Theta^T, 1], float64 holding float32 draws
    assert dense.dtype == torch.float64 and bool((dense[:, -1] == 1).all())
    assert bool((dense[:, :q].float().double() == dense[:, :q]).all())
    theta = dense[:, :q]
    torch.testing.assert_close(parts["E"], theta.mT @ Ad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts["colsum"], Ad.sum(0), rtol=1e-5, atol=1e-4)
    formed = sk._formed()  # Phi Y = (Phi A) Omega, Theta Y = (Theta A) Omega at result time
    Y = Ad @ sk._omega().double()
    torch.testing.assert_close(formed["PhiY"], maps[:, s:].mT @ Y, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(formed["ThetaY"], theta.mT @ Y, rtol=1e-5, atol=1e-3)
    # the row sums [Psi 1; Phi 1; Theta 1] of the centring corrections (kept only when centring)
    centred = _stream(A, [1000, 4096 + 5], k=3, sketch=13, core=27, seed=6, center=True)
    rowsum = torch.cat([maps.sum(0), theta.sum(0)])
    torch.testing.assert_close(centred._acc["rowsum"], rowsum, rtol=1e-12, atol=1e-9)
    assert not bool(sk._acc["rowsum"].any())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_centring_equals_explicit_centring(dtype):
    A = _decaying(700, 60, 0.85, seed=6, offset=3.0, dtype=dtype)
    implicit = _stream(A, [300], k=6, seed=2, center=True)
    Ac = (A.double() - A.double().mean(0)).to(dtype)
    explicit = _stream(Ac, [300], k=6, seed=2)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    a, b = implicit.result(), explicit.result()
    torch.testing.assert_close(a.S, b.S, rtol=tol, atol=0)
    torch.testing.assert_close(a.U, b.U, rtol=0, atol=tol * 10)
    torch.testing.assert_close(a.Vh, b.Vh, rtol=0, atol=tol * 10)
    assert abs(implicit.error_estimate() / explicit.error_estimate() - 1) < tol * 10
    # and it is PCA: the factors reproduce the centred matrix to the optimal error's level
    assert _rel_err(Ac.double(), a) <= 1.5 * _optimal(Ac, 6)


def test_lean_mode_equals_full_mode():
    A = _decaying(800, 70, 0.85, seed=7, offset=1.0)
    full = _stream(A, [400], k=5, seed=3, center=True).result()
    lean = _stream(A, [400], k=5, seed=3, center=True, keep_u=False)
    res = lean.result()
    assert res.U is None and lean._Y == []
    torch.testing.assert_close(res.S, full.S, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.Vh, full.Vh, rtol=0, atol=1e-9)


def test_state_dict_resume(tmp_path):
    A = _decaying(900, 50, 0.8, seed=8, offset=0.5)
    whole = _stream(A, [300, 600], k=5, seed=12, center=True)
    first = _stream(A[:450], [300], k=5, seed=12, center=True)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = StreamingSVD(50, 5, seed=12, center=True)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    resumed.update(A[450:600]).update(A[600:])
    a, b = whole.result(), resumed.result()
    torch.testing.assert_close(a.S, b.S, rtol=1e-11, atol=0)
    torch.testing.assert_close(a.U, b.U, rtol=0, atol=1e-10)
    assert abs(whole.error_estimate() - resumed.error_estimate()) < 1e-10
    with pytest.raises(ValueError, match="seed"):
        StreamingSVD(50, 5, seed=13, center=True).load_state_dict(first.state_dict())
    drawn = StreamingSVD(50, 5, center=True)  # seed=None: a random draw, replaced by the state's
    drawn.update(A[:10])  # its own test matrices were used once: the state replaces them too
    drawn.load_state_dict(first.state_dict())
    drawn.update(A[450:600]).update(A[600:])
    assert drawn.seed == 12
    torch.testing.assert_close(drawn.result().S, a.S, rtol=1e-11, atol=0)
    with pytest.raises(ValueError, match="state"):
        StreamingSVD(50, 5, seed=12).load_state_dict({"junk": 1})
    old = {**first.state_dict(), "version": 1}  # dense Gaussian Psi/Phi: another sketch of the same rows
    with pytest.raises(ValueError, match="version 1.*cannot resume"):
        StreamingSVD(50, 5, seed=12, center=True).load_state_dict(old)
    # version 2: separate [Psi A; Phi A], Theta A, 1^T A buffers and torch-drawn signs
    v2 = {**first.state_dict(), "version": 2}
    with pytest.raises(ValueError, match="version 2, this is version 5.*cannot resume"):
        StreamingSVD(50, 5, seed=12, center=True).load_state_dict(v2)
    # version 3: the row-side test matrices from torch's generator per chunk of 4096 rows
    v3 = {**first.state_dict(), "version": 3}
    with pytest.raises(ValueError, match="version 3, this is version 5.*cannot resume"):
        StreamingSVD(50, 5, seed=12, center=True).load_state_dict(v3)
    # version 4: one sketch_row_draws key for Psi, Phi and Theta (n_test moved the sign maps' draws)
    v4 = {**first.state_dict(), "version": 4}
    with pytest.raises(ValueError, match="version 4, this is version 5.*cannot resume"):
        StreamingSVD(50, 5, seed=12, center=True).load_state_dict(v4)
    assert first.state_dict()["version"] == 5


# ------------------------------------------------------------------------------------------- input kinds


def test_sparse_and_numpy_blocks_equal_dense():
    import scipy.sparse as sp

    dense = sp.random(600, 80, density=0.1, random_state=0, format="csr", dtype=np.float64)
    A = torch.from_numpy(dense.toarray())
    ref = _stream(A, [250], k=5, seed=4, center=True).result()
    kinds = {
        "torch_coo": [A[:250].to_sparse(), A[250:].to_sparse()],
        "torch_csr": [A[:250].to_sparse_csr(), A[250:].to_sparse_csr()],
        "scipy": [dense[:250], sp.coo_matrix(dense[250:])],
        "numpy": [dense[:250].toarray(), dense[250:].toarray()],
    }
    for name, blocks in kinds.items():
        sk = StreamingSVD(80, 5, seed=4, center=True)
        for block in blocks:
            sk.update(block)
        res = sk.result()
        torch.testing.assert_close(res.S, ref.S, rtol=1e-11, atol=0, msg=name)
        torch.testing.assert_close(res.U, ref.U, rtol=0, atol=1e-10, msg=name)


def test_rsvd_routes_streams(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    A = _decaying(1200, 40, 0.8, seed=9)
    ref = _stream(A, [], k=4, seed=5).result()

    def same(res):
        torch.testing.assert_close(res.S, ref.S, rtol=1e-11, atol=0)
        torch.testing.assert_close(res.U, ref.U, rtol=0, atol=1e-10)

    same(lowrank.rsvd((A[i : i + 300] for i in range(0, 1200, 300)), 4, seed=5))
    same(lowrank.rsvd([A[:700], A[700:].numpy()], 4, seed=5))

    class Blocks:  # an iterable that is not an iterator (as a DataLoader is)
        def __iter__(self):
            return iter([A[:100], A[100:]])

    same(lowrank.rsvd(Blocks(), 4, seed=5))
    np.save(tmp_path / "a.npy", A[:500].numpy())
    np.save(tmp_path / "b.npy", A[500:].numpy())
    same(lowrank.rsvd([tmp_path / "a.npy", str(tmp_path / "b.npy")], 4, seed=5))
    save_file({"x": A[:800].contiguous()}, tmp_path / "a.safetensors")
    save_file({"x": A[800:].contiguous()}, tmp_path / "b.safetensors")
    monkeypatch.setattr(sketch_mod, "READ_BLOCK_BYTES", 40 * 8 * 333)  # several reads per shard
    same(lowrank.rsvd([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], 4, seed=5))
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float64, shape=(1200, 40))
    mm[:] = A.numpy()
    monkeypatch.setattr(sketch_mod, "MEMMAP_STREAM_BYTES", 1)
    same(lowrank.rsvd(mm, 4, seed=5))
    # oversample sets the sketch size; multi-pass options are refused
    wider = lowrank.rsvd(iter([A]), 4, seed=5, oversample=20)
    assert _rel_err(A, wider) <= _rel_err(A, ref) * 1.0001
    for kwargs, match in (({"tol": 0.1}, "tol"), ({"n_iter": 2}, "n_iter"), ({"method": "krylov"}, "method")):
        with pytest.raises(ValueError, match=match):
            lowrank.rsvd(iter([A]), 4, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        lowrank.rsvd(iter([]), 4)
    with pytest.raises(ValueError, match=r"\.npy or \.safetensors"):
        lowrank.rsvd([str(tmp_path / "m.txt")], 4)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input():
    A = torch.randn(50, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="before|update"):
        StreamingSVD(10, 3).result()
    with pytest.raises(ValueError, match="n_features=10"):
        StreamingSVD(10, 3).update(torch.randn(5, 11))
    sk = StreamingSVD(10, 3, seed=0).update(A)
    with pytest.raises(TypeError, match="dtype"):
        sk.update(A.float())
    bad = A.clone()
    bad[3, 4] = float("nan")
    before = sk.state_dict()
    with pytest.raises(ValueError, match="NaN"):
        sk.update(bad)
    after = sk.state_dict()["sketches"]
    assert sk.n_rows == 50 and all(torch.equal(after[key], before["sketches"][key]) for key in after)
    huge = 1e200 * torch.randn(2, 10, dtype=torch.float64)  # finite, but Y^T Y overflows float64
    with pytest.raises(ValueError, match="too large"):
        sk.update(huge)
    after = sk.state_dict()["sketches"]
    assert sk.n_rows == 50 and all(torch.equal(after[key], before["sketches"][key]) for key in after)
    inf = A.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        StreamingSVD(10, 3).update(inf)
    with pytest.raises(TypeError, match="dtype"):
        StreamingSVD(10, 3).update(torch.ones(4, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="block"):
        StreamingSVD(10, 3).update([[1.0] * 10])
    with pytest.raises(ValueError, match="2-D"):
        StreamingSVD(10, 3).update(torch.ones(10))
    with pytest.raises(ValueError, match="k=4 exceeds"):
        StreamingSVD(10, 4).update(torch.randn(3, 10)).result()
    with pytest.raises(ValueError, match="k=11 exceeds"):
        StreamingSVD(10, 11)
    with pytest.raises(ValueError, match="sketch"):
        StreamingSVD(10, 5, sketch=4)
    with pytest.raises(ValueError, match="core"):
        StreamingSVD(10, 3, sketch=5, core=4)
    with pytest.raises(TypeError, match="k must be an int"):
        StreamingSVD(10, 2.5)
    with pytest.raises(TypeError, match="center"):
        StreamingSVD(10, 2, center=1)
    # an explicit dtype casts every block; an empty block adds nothing
    cast = StreamingSVD(10, 3, dtype=torch.float32, seed=0).update(A).update(A.float()).update(A[:0])
    assert cast.n_rows == 100 and cast.result().S.dtype == torch.float32


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    A = _decaying(3000, 100, 0.85, seed=10, offset=1.0, dtype=torch.float32)
    cpu = _stream(A, [1000], k=8, seed=1, center=True)
    gpu = StreamingSVD(100, 8, seed=1, center=True, device="cuda")
    gpu.update(A[:1000].cuda()).update(A[1000:].numpy())  # NumPy blocks are moved to the device
    a, b = cpu.result(), gpu.result()
    assert b.U.is_cuda and b.Vh.is_cuda
    torch.testing.assert_close(b.S.cpu(), a.S, rtol=1e-4, atol=0)
    torch.testing.assert_close(b.Vh.cpu(), a.Vh, rtol=0, atol=1e-3)
    assert abs(gpu.error_estimate() / cpu.error_estimate() - 1) < 1e-3


# ------------------------------------------------------------------------------------------- distributed


def _session_reduce(rank: int, world: int, out_dir: str, results: dict) -> None:
    A = _decaying(700, 40, 0.8, seed=1, offset=1.0)
    bounds = [0, 260, 700]
    lo, hi = bounds[rank], bounds[rank + 1]
    sk = StreamingSVD(40, 5, seed=7, center=True, row_offset=lo)
    for start in range(lo, hi, 100):
        sk.update(A[start : min(hi, start + 100)])
    with lowrank.distributed.comm_log() as log:
        lowrank.distributed.reduce_sketch(sk)
    results["result"] = sk.result()
    results["estimate"] = sk.error_estimate()
    results["calls"] = log.calls
    try:
        sk.update(A[:1])
    except ValueError as error:
        results["after"] = str(error)
    bad = StreamingSVD(40, 5, seed=7 + rank, row_offset=lo).update(A[lo:hi])
    try:
        lowrank.distributed.reduce_sketch(bad)
    except ValueError as error:
        results["mismatch"] = str(error)
    # found by a user test: sketches of different sizes (k differs) made gloo abort the process in the
    # all-reduce; overlapping row ranges were summed silently; a bad argument on one rank left the
    # other waiting in the collective. Each is now a ValueError/TypeError on every rank, in step.
    cases = {
        "k": lambda: StreamingSVD(40, 5 + rank, seed=7, row_offset=lo).update(A[lo:hi]),
        "overlap": lambda: StreamingSVD(40, 5, seed=7).update(A[lo:hi]),
        "type": lambda: StreamingSVD(40, 5, seed=7, row_offset=lo).update(A[lo:hi]) if rank == 0 else "x",
    }
    for name, make in cases.items():
        try:
            lowrank.distributed.reduce_sketch(make())
        except (TypeError, ValueError) as error:
            results[f"bad_{name}"] = f"{type(error).__name__}: {error}"


def test_distributed_reduce_equals_single_process(tmp_path):
    results = run_gloo(_session_reduce, 2, tmp_path)
    A = _decaying(700, 40, 0.8, seed=1, offset=1.0)
    single = _stream(A, [100, 500], k=5, seed=7, center=True)
    ref = single.result()
    U_parts = []
    for rank in range(2):
        res = results[rank]
        U, S, Vh = res["result"]
        torch.testing.assert_close(S, ref.S, rtol=1e-9, atol=0)
        torch.testing.assert_close(Vh, ref.Vh, rtol=0, atol=1e-9)
        assert abs(res["estimate"] - single.error_estimate()) < 1e-10
        assert res["calls"] == 2  # one all-gather of the 12-int64 header, one all-reduce of the sketches
        assert "already summed" in res["after"] and "differ" in res["mismatch"]
        assert res["bad_k"].startswith("ValueError") and "differ: k, sketch, core" in res["bad_k"]
        assert res["bad_overlap"].startswith("ValueError") and "overlap" in res["bad_overlap"]
        expected = "ValueError: invalid arguments on rank(s) [1]" if rank == 0 else "TypeError: sketch must"
        assert res["bad_type"].startswith(expected)
        U_parts.append(U)
    torch.testing.assert_close(torch.cat(U_parts), ref.U, rtol=0, atol=1e-9)


def test_read_only_arrays_are_read_without_a_warning(tmp_path):
    # np.load(..., mmap_mode="r") gives read-only arrays: torch.from_numpy warned "not writable" (an error
    # under -W error); the library only reads its inputs. A fresh interpreter: torch warns once per process.
    import subprocess
    import sys

    import numpy as np

    path = tmp_path / "a.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((300, 40)) @ np.diag(0.8 ** np.arange(40)))
    code = f"""
import numpy as np, torch, lowrank
A = np.load({str(path)!r}, mmap_mode="r")
sk = lowrank.StreamingSVD(40, 5, seed=0)
for i in range(0, 300, 70):
    sk.update(A[i:i + 70])
S = lowrank.rsvd(A, 5, seed=0).S
exact = np.linalg.svd(np.asarray(A), compute_uv=False)[:5]
assert np.allclose(S.numpy(), exact, rtol=1e-6), (S, exact)
assert np.allclose(sk.result().S.numpy(), exact, rtol=0.05), (sk.result().S, exact)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
