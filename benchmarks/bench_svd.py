"""Randomized SVD: lowrank.rsvd against torch.svd_lowrank, scikit-learn, SciPy svds and the exact SVD.

Per matrix (synthetic with known spectra, so the optimal rank-k error is exact; a sparse one with a SciPy
ARPACK reference), time next to accuracy:

- ``excess``: ``||A - U S Vh||_F / ||A - A_k||_F - 1`` (0 is optimal), computed in float64 from
  ``||A||_F^2 - 2 tr(S U^T A V) + ||U S Vh||_F^2`` (no dense residual);
- ``sv err``: ``max_i |S_i - sigma_i| / sigma_i`` over the top k;
- ``GEMM floor``: the time of the passes over A the method makes (``A @ X`` and ``A^T @ Y`` at its block
  width, measured in the same run), and ``time / floor``.

Matrices are ``P1 D1 C^T diag(s) C D2 P2`` with ``C`` orthonormal DCT-II matrices, ``D`` random signs and
``P`` random permutations: dense, incoherent singular vectors, built in ``O(m n log)`` time.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch

import lowrank
from benchmarks.common import BenchResult, Plot, Table, fmt_time, measure, measure_apart


def _log(message: str) -> None:
    print(f"  svd: {message}", file=sys.stderr)


def synthetic(m: int, n: int, spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dense float32 ``m x n`` matrix with exactly the singular values ``spectrum`` (float64 on input)."""
    from scipy.fft import idct

    rng = np.random.default_rng(seed)
    r = min(m, n)
    M = np.zeros((m, n))
    M[np.arange(r), np.arange(r)] = spectrum
    M = idct(M, axis=0, norm="ortho")
    M = idct(M, axis=1, norm="ortho")
    M *= rng.choice([-1.0, 1.0], m)[:, None]
    M *= rng.choice([-1.0, 1.0], n)[None, :]
    M = M[rng.permutation(m)][:, rng.permutation(n)]
    return np.ascontiguousarray(M, dtype=np.float32)


def frobenius_errors(A, U, S, Vh, sigma: np.ndarray, fro_sq: float) -> tuple[float, float, float]:
    """(relative F-error, excess F-error over optimal, max relative singular-value error), float64."""
    k = S.shape[0]
    U, S, Vh = (
        t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)
        for t in (U, S, Vh)
    )
    AV = np.asarray(A.astype(np.float64) @ Vh.T)
    cross = float(np.sum(S * np.einsum("ij,ij->j", U, AV)))
    gram_v = (S[:, None] * (Vh @ Vh.T)) * S[None, :]
    approx_sq = float(np.sum((U.T @ U) * gram_v))
    err_sq = max(fro_sq - 2 * cross + approx_sq, 0.0)
    opt_sq = max(fro_sq - float(np.sum(sigma[:k] ** 2)), 1e-300)
    excess = np.sqrt(err_sq / opt_sq) - 1
    sv = float(np.max(np.abs(np.sort(S)[::-1] - sigma[:k]) / sigma[:k]))
    return float(np.sqrt(err_sq / fro_sq)), float(excess), sv


def _lowrank_configs(k: int, quick: bool) -> dict[str, dict]:
    """The lowrank points on the frontier (rsvd keyword arguments); passes = 2 n_iter + 2."""
    configs = {
        "lowrank fast (n_iter=1)": dict(n_iter=1),
        "lowrank default (auto)": dict(),
        "lowrank accurate (krylov n_iter=3)": dict(method="krylov", n_iter=3),
    }
    if not quick:
        configs["lowrank subspace (torch's config)"] = dict(method="subspace", oversample=10, n_iter=2)
    return configs


def _passes_and_width(k: int, cfg: dict, op) -> tuple[int, int]:
    """Passes over A and block width of ``rsvd(A, k, **cfg)`` (what ``lowrank.svd._resolve`` picks)."""
    from lowrank.svd import _resolve

    _, block, q = _resolve(
        op, k, cfg.get("method", "auto"), cfg.get("oversample"), cfg.get("n_iter"), cfg.get("block_size")
    )
    return 2 * q + 2, block


def _time_once(fn) -> tuple[float, object]:
    begin = time.perf_counter()
    out = fn()
    return time.perf_counter() - begin, out


def _case(label, A_np, A_t, sigma, fro_sq, k, device, quick, result, plots, exact_ok):
    from lowrank._linop import as_linop

    m, n = A_t.shape
    configs = _lowrank_configs(k, quick)
    fast = {name: (lambda cfg=cfg: lowrank.rsvd(A_t, k, seed=0, **cfg)) for name, cfg in configs.items()}
    fast["torch.svd_lowrank(q=k+10, niter=2)"] = lambda: torch.svd_lowrank(A_t, q=k + 10, niter=2)
    # slow alternatives are timed once (they take seconds; their spread does not change the picture)
    slow = {}
    try:
        from sklearn.utils.extmath import randomized_svd

        if device == "cpu":
            slow["sklearn randomized_svd (defaults)"] = lambda: randomized_svd(A_np, k, random_state=0)
    except ImportError:
        result.notes.append("scikit-learn missing: its column is skipped")
    try:
        from scipy.sparse.linalg import svds

        if device == "cpu":
            slow["scipy svds (ARPACK)"] = lambda: svds(A_np, k, random_state=0)
    except ImportError:
        result.notes.append("SciPy missing: svds skipped")
    if exact_ok and A_t.layout == torch.strided:
        slow["exact torch.linalg.svd"] = lambda: torch.linalg.svd(A_t, full_matrices=False)
    # GEMM floor: one forward + one adjoint pass at each width used, as lowrank makes them (its input
    # adapter's products) and as torch.svd_lowrank makes them (plain A @ X, A^T @ Y)
    op = as_linop(A_t, check_finite=False)
    widths = sorted({_passes_and_width(k, cfg, op)[1] for cfg in configs.values()})
    for w in widths:
        X, Y = torch.randn(n, w, device=device), torch.randn(m, w, device=device)
        fast[f"pass pair w={w}"] = lambda X=X, Y=Y: (op.matmul(X), op.rmatmul(Y))
    X, Y = torch.randn(n, k + 10, device=device), torch.randn(m, k + 10, device=device)
    if A_t.layout == torch.strided:
        fast["plain pass pair"] = lambda X=X, Y=Y: (A_t @ X, A_t.mT @ Y)
    else:
        At = A_t.t().to_sparse_csr() if A_t.layout == torch.sparse_csr else A_t.t()
        fast["plain pass pair"] = lambda X=X, Y=Y, At=At: (A_t @ X, At @ Y)
    timings = {
        name: t.median
        for name, t in measure(fast, device=device, warmup=1, repeats=3 if quick else 5).items()
    }
    outputs = {name: fn() for name, fn in fast.items() if not name.startswith(("pass", "plain"))}
    for name, fn in slow.items():
        timings[name], outputs[name] = _time_once(fn)
    pair = {w: timings[f"pass pair w={w}"] for w in widths}

    rows = []
    series: dict[str, list[tuple[float, float]]] = {}
    for name, out in outputs.items():
        if name.startswith("torch.svd_lowrank"):
            U, S, V = out
            U, S, Vh = U[:, :k], S[:k], V[:, :k].T
        elif name.startswith("scipy"):
            U, S, Vh = out
            order = np.argsort(S)[::-1]
            U, S, Vh = U[:, order], S[order], Vh[order]
        elif name.startswith("exact"):
            U, S, Vh = out[0][:, :k], out[1][:k], out[2][:k]
        else:
            U, S, Vh = out
        _, excess, sv = frobenius_errors(A_np, U, S, Vh, sigma, fro_sq)
        t = timings[name]
        floor = ""
        ratio = ""
        if name.startswith("lowrank"):
            passes, width = _passes_and_width(k, configs[name], op)
            f = passes / 2 * pair[width]
            floor, ratio = f"{fmt_time(f)} ({passes} passes, w={width})", f"{t / f:.2f}"
        elif name.startswith("torch.svd_lowrank"):
            f = 3 * timings["plain pass pair"]
            floor, ratio = f"{fmt_time(f)} (6 plain passes, w={k + 10})", f"{t / f:.2f}"
        rows.append([name, fmt_time(t), f"{excess:.2e}", f"{sv:.2e}", floor, ratio])
        result.records.append(
            dict(matrix=label, method=name, seconds=t, excess=excess, sv_error=sv, device=device, k=k)
        )
        series[name] = [(t, max(excess, 1e-16))]
    result.tables.append(
        Table(
            title=f"{label} (k={k}, fp32, {device}, {torch.get_num_threads()} threads)",
            columns=[
                "method",
                "time (median)",
                "excess F-error",
                "max rel. sv error",
                "GEMM floor",
                "time/floor",
            ],
            rows=rows,
            notes=[
                "lowrank and torch.svd_lowrank: median of "
                f"{3 if quick else 5} interleaved runs; scikit-learn, svds and the exact SVD: one run"
            ],
        )
    )
    slug = "".join(c if c.isalnum() else "_" for c in label)[:40]
    plots.append(
        Plot(
            file=f"svd_{slug}.png",
            title=f"accuracy vs time: {label}, k={k}",
            xlabel="seconds",
            ylabel="excess Frobenius error over optimal",
            series=series,
            logx=True,
            logy=True,
            kind="scatter",
        )
    )


def _fixed_precision_table(cases, device, result, quick):
    rows = []
    for label, A_t, sigma in cases:
        total = float(np.sum(sigma**2))
        tails = np.sqrt(np.maximum(total - np.cumsum(sigma**2), 0) / total)  # error of rank i+1
        for tol in (0.1, 0.05) if quick else (0.1, 0.05, 0.02):
            oracle = int(np.argmax(tails <= tol)) + 1 if np.any(tails <= tol) else len(sigma)
            begin = time.perf_counter()
            res = lowrank.rsvd(A_t, tol=tol, seed=0)
            seconds = time.perf_counter() - begin
            r = res.S.shape[0]
            err, _, _ = frobenius_errors(A_t.cpu().numpy(), *res, sigma, total)
            rows.append(
                [
                    label,
                    tol,
                    oracle,
                    r,
                    f"{r / oracle:.2f}",
                    f"{err:.4f}",
                    "yes" if err <= tol else "NO",
                    fmt_time(seconds),
                ]
            )
            result.records.append(dict(matrix=label, tol=tol, oracle_rank=oracle, rank=r, rel_error=err))
    result.tables.append(
        Table(
            title=f"fixed precision rsvd(A, tol=...) (randQB_EI), fp32, {device}",
            columns=[
                "matrix",
                "tol",
                "oracle rank",
                "rank found",
                "ratio",
                "rel. F-error",
                "tol met",
                "time",
            ],
            rows=rows,
            notes=["oracle rank: smallest rank whose optimal (exact SVD) error meets tol; goal ratio <= 1.3"],
        )
    )


def _flat_tail_with_noise(k: int):
    """Spectrum 1/(1+i) for the first k values, then a flat 0.02 tail, plus small seeded noise."""
    return lambda i: np.where(i < k, 1.0 / (1 + i), 0.02) + 0.005 * np.random.default_rng(1).random(i.shape)


def run(*, quick: bool, device: str) -> BenchResult:
    result = BenchResult(name="svd")
    plots: list[Plot] = []
    full_shapes = [
        ("4096x4096, s=0.99^i+1e-3", 4096, 4096, 64, lambda i: 0.99**i + 1e-3),
        ("20000x2000, s=0.98^i+1e-3", 20000, 2000, 50, lambda i: 0.98**i + 1e-3),
        ("4096x2048, s=0.8^i (fast)", 4096, 2048, 64, lambda i: 0.8**i),
        ("4096x2048, flat tail + noise", 4096, 2048, 64, _flat_tail_with_noise(64)),
    ]
    sparse_shape: tuple[int, int, int] | None
    if torch.device(device).type == "cuda" and quick:
        # What the GPU must answer: the SVD issue's two matrices at full size (a GPU takes them in
        # milliseconds); the CPU-only baselines (scikit-learn, ARPACK) and the sparse case are left out.
        shapes = full_shapes[:2]
        sparse_shape = None
    elif quick:
        shapes = [
            ("2048x2048, s=0.99^i+1e-3", 2048, 2048, 64, lambda i: 0.99**i + 1e-3),
            ("8000x1000, s=0.98^i+1e-3", 8000, 1000, 50, lambda i: 0.98**i + 1e-3),
            ("2048x1024, s=0.8^i (fast)", 2048, 1024, 32, lambda i: 0.8**i),
            ("2048x1024, flat tail + noise", 2048, 1024, 32, _flat_tail_with_noise(32)),
        ]
        sparse_shape = (10000, 2000, 20)
    else:
        shapes = full_shapes
        sparse_shape = (50000, 10000, 50)
    tol_cases = []
    for label, m, n, k, spec in shapes:
        sigma = np.sort(np.asarray(spec(np.arange(min(m, n))), dtype=np.float64))[::-1]
        _log(f"building {label}")
        A_np = synthetic(m, n, sigma, seed=m + n)
        A_t = torch.from_numpy(A_np).to(device)
        fro_sq = float(np.sum(sigma**2))
        _log(f"timing {label}")
        _case(
            label,
            A_np,
            A_t,
            sigma,
            fro_sq,
            k,
            device,
            quick,
            result,
            plots,
            exact_ok=not quick,
        )
        if n <= 2048 and "flat" not in label:
            tol_cases.append((label, A_t, sigma))
    if sparse_shape is not None:
        _sparse_case(sparse_shape, device, quick, result, plots)
    if torch.device(device).type == "cpu":
        _log("issue 19: small slow-decay dense, power-law sparse, sparse PCA")
        _small_and_sparse_table(quick, result)
    _log("fixed precision")
    _fixed_precision_table(tol_cases, device, result, quick)
    result.plots.extend(plots)
    if quick and sparse_shape is None:
        result.notes.append(
            "quick mode on CUDA: the issue's two dense matrices; no sparse case, no CPU baselines"
        )
    elif quick:
        result.notes.append("quick mode: scaled-down shapes, no exact SVD; --full runs the issue's shapes")
    result.notes.append(
        "torch.svd_lowrank makes 6 passes at width k+10 (niter=2); sklearn's defaults make 2*7+2 passes "
        "(n_iter=7 when k < 0.1 min(m, n), else 4) at width k+10 with LU renormalisation."
    )
    result.notes.append(
        "GEMM floor: lowrank rows use lowrank's own products (on CPU (X^T A^T)^T, 1.0-1.5x faster than "
        "A @ X), torch.svd_lowrank's row its plain A @ X and A^T @ Y. Run as a script: --full for the "
        "issue's shapes, --threads N to pin torch's thread count."
    )
    return result


def _sparse_case(sparse_shape, device, quick, result, plots) -> None:
    """Sparse CSR (density 1e-3 plus a diagonal); reference singular values from ARPACK, tight tolerance."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    m, n, k = sparse_shape
    S_np = sp.random(m, n, density=1e-3, random_state=0, format="csr", dtype=np.float32)
    S_np = S_np + sp.diags(np.linspace(5, 1, min(m, n)).astype(np.float32), shape=(m, n), format="csr")
    _log("sparse reference (ARPACK)")
    sigma = np.sort(svds(S_np.astype(np.float64), k, tol=1e-12, random_state=0)[1])[::-1]
    S_t = torch.sparse_csr_tensor(
        torch.from_numpy(S_np.indptr.astype(np.int64)),
        torch.from_numpy(S_np.indices.astype(np.int64)),
        torch.from_numpy(S_np.data),
        size=S_np.shape,
    ).to(device)
    fro_sq = float(S_np.multiply(S_np).sum(dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _case(
            f"sparse {m}x{n}, density 1e-3 + diag",
            S_np,
            S_t,
            sigma,
            fro_sq,
            k,
            device,
            quick,
            result,
            plots,
            exact_ok=False,
        )


if __name__ == "__main__":
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    out = run(quick="--full" not in sys.argv, device="cuda" if "--cuda" in sys.argv else "cpu")
    for table in out.tables:
        print(f"\n## {table.title}")
        print(" | ".join(table.columns))
        for row in table.rows:
            print(" | ".join(str(c) for c in row))
        for note in table.notes:
            print(f"  note: {note}")
    for note in out.notes:
        print(f"note: {note}")


# ------------------------------------------------------------------ issue 19: small and sparse matrices


def zipf_csr(m: int, n: int, density: float, seed: int = 0):
    """float32 CSR with exactly ``density m n`` entries at Zipf-distributed (p_i ~ 1/i, shuffled) rows and
    columns, standard normal values: power-law row and column degrees."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    nnz = int(density * m * n)
    pr, pc = 1.0 / np.arange(1, m + 1), 1.0 / np.arange(1, n + 1)
    rows = rng.permutation(m)[rng.choice(m, 3 * nnz, p=pr / pr.sum())]
    cols = rng.permutation(n)[rng.choice(n, 3 * nnz, p=pc / pc.sum())]
    _, first = np.unique(rows.astype(np.int64) * n + cols, return_index=True)
    keep = np.sort(first)[:nnz]
    A = sp.coo_array((rng.standard_normal(len(keep)), (rows[keep], cols[keep])), shape=(m, n)).tocsr()
    A.sort_indices()
    return A.astype(np.float32)


def _best_ratio(rows_of: dict, reference: str, error: dict, timing: dict) -> tuple[str, float]:
    """The fastest lowrank candidate whose error is at most the reference's, and reference time / its."""
    ok = [name for name in rows_of if name.startswith("lowrank") and error[name] <= error[reference]]
    if not ok:
        return "none reaches it", 0.0
    best = min(ok, key=lambda name: timing[name])
    return best, timing[reference] / timing[best]


def _default_cells(default: str, reference: str, goal: float, error: dict, timing: dict) -> list[str]:
    """The default's time and accuracy, its speed ratio to ``reference`` and whether it meets ``goal``
    (it must be at least as accurate as the reference to count)."""
    ratio = timing[reference] / timing[default]
    accurate = error[default] <= error[reference]
    return [
        f"{fmt_time(timing[default])}, excess {error[default]:.1e}",
        f"{ratio:.2f}x" + ("" if accurate else " (less accurate)"),
        "yes" if accurate and ratio >= goal else "NO",
    ]


def _small_and_sparse_table(quick: bool, result: BenchResult) -> None:
    """Issue 19's three cases, each with its goal ratio beside the measured one (CPU)."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.utils.extmath import randomized_svd

    repeats = 3 if quick else 7
    rows = []

    def excess(A, out, sigma, fro_sq):
        return frobenius_errors(A, *out, sigma, fro_sq)[1]

    def torch_out(out, k):
        U, S, V = out
        return U[:, :k], S[:k], V[:, :k].T

    # (a) small dense, slow decay; (b) power-law sparse
    dense_sigma = np.arange(1, 1501, dtype=np.float64) ** -0.7
    A_dense = synthetic(1500, 1500, dense_sigma, seed=7)
    A_sp = zipf_csr(30000, 2500, 2e-3)
    A64 = A_sp.astype(np.float64)
    sp_sigma = np.sqrt(np.clip(np.linalg.eigvalsh((A64.T @ A64).toarray())[::-1], 0, None))
    sp_torch = torch.sparse_csr_tensor(
        torch.from_numpy(A_sp.indptr.astype(np.int64)),
        torch.from_numpy(A_sp.indices.astype(np.int64)),
        torch.from_numpy(A_sp.data),
        size=A_sp.shape,
    )
    cases = [
        (
            "(a) dense 1500x1500, s_i = i^-0.7",
            A_dense,
            torch.from_numpy(A_dense),
            dense_sigma,
            64,
            {
                "lowrank default": {},
                "lowrank block_size=32, n_iter=3": dict(block_size=32, n_iter=3),
                "lowrank block_size=36, n_iter=3": dict(block_size=36, n_iter=3),
                "lowrank block_size=16, n_iter=6": dict(block_size=16, n_iter=6),
                "lowrank wide (method='krylov')": dict(method="krylov"),
            },
            [("torch.svd_lowrank(q=k+10, niter=2)", 1.5)],
        ),
        (
            "(b) sparse 30000x2500 Zipf rows/cols, density 2e-3",
            A_sp,
            sp_torch,
            sp_sigma,
            40,
            {
                "lowrank default": {},
                "lowrank block_size=16, n_iter=5": dict(block_size=16, n_iter=5),
                "lowrank block_size=16, n_iter=6": dict(block_size=16, n_iter=6),
                "lowrank block_size=12, n_iter=8": dict(block_size=12, n_iter=8),
                "lowrank wide (method='krylov')": dict(method="krylov"),
            },
            [("torch.svd_lowrank(q=k+10, niter=2)", 1.5), ("sklearn randomized_svd (defaults)", 4.0)],
        ),
    ]
    for label, A_np, A_t, sigma, k, configs, references in cases:
        fro_sq = float(np.sum(sigma**2))
        calls = {
            name: (lambda cfg=cfg, A=A_t, k=k: lowrank.rsvd(A, k, seed=0, **cfg))
            for name, cfg in configs.items()
        }

        def torch_call(A=A_t, k=k):
            torch.manual_seed(0)  # its draws come from the global generator: a fixed seed, as for the others
            return torch_out(torch.svd_lowrank(A, q=k + 10, niter=2), k)

        calls["torch.svd_lowrank(q=k+10, niter=2)"] = torch_call
        if any(ref.startswith("sklearn") for ref, _ in references):
            calls["sklearn randomized_svd (defaults)"] = lambda A=A_np, k=k: randomized_svd(
                A, k, random_state=0
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timing = {name: t.median for name, t in measure_apart(calls, warmup=1, repeats=repeats).items()}
            error = {name: excess(A_np, fn(), sigma, fro_sq) for name, fn in calls.items()}
        for ref, goal in references:
            best, ratio = _best_ratio(calls, ref, error, timing)
            rows.append(
                [
                    label,
                    f"{ref}: {fmt_time(timing[ref])}, excess {error[ref]:.1e}",
                    *_default_cells("lowrank default", ref, goal, error, timing),
                    f"{best}: {fmt_time(timing[best])}, excess {error[best]:.1e}" if ratio else best,
                    f"{ratio:.2f}x",
                    f">= {goal}x",
                    "yes" if ratio >= goal else "NO",
                ]
            )
        for name in calls:
            result.records.append(
                dict(table="issue19", matrix=label, method=name, seconds=timing[name], excess=error[name])
            )

    # (c) sparse PCA (implicit centring) vs scikit-learn's ARPACK PCA, on the data of bench_factorize's PCA
    # table (the 318 vs 257 ms)
    k = 20
    X = sp.random(20000, 2000, density=0.005, random_state=3, format="csr", dtype=np.float32)
    X = (X @ sp.diags((0.97 ** np.arange(2000)).astype(np.float32))).tocsr()
    D = X.astype(np.float64)
    mu = np.asarray(D.mean(axis=0)).ravel()
    gram = (D.T @ D).toarray() - X.shape[0] * np.outer(mu, mu)
    truth = np.linalg.eigvalsh(gram)[::-1][:k] / (X.shape[0] - 1)
    X_t = torch.sparse_csr_tensor(
        torch.from_numpy(X.indptr.astype(np.int64)),
        torch.from_numpy(X.indices.astype(np.int64)),
        torch.from_numpy(X.data),
        size=X.shape,
    )
    pca_configs = {
        "lowrank.pca default": {},
        "lowrank.pca n_iter=3, oversample=4": dict(n_iter=3, oversample=4),
        "lowrank.pca n_iter=4, oversample=0": dict(n_iter=4, oversample=0),
    }
    calls = {name: (lambda cfg=cfg: lowrank.pca(X_t, k, seed=0, **cfg)) for name, cfg in pca_configs.items()}
    arpack = "sklearn PCA(svd_solver='arpack')"
    calls[arpack] = lambda: PCA(k, svd_solver="arpack", random_state=0).fit(X)
    timing = {name: t.median for name, t in measure_apart(calls, warmup=1, repeats=repeats).items()}
    error = {}
    for name, fn in calls.items():
        out = fn()
        var = out.explained_variance_ if name == arpack else out.explained_variance.double().numpy()
        error[name] = float(np.abs(np.asarray(var, np.float64) - truth).max() / truth[0])
    ok = [n for n in pca_configs if error[n] <= 1.5 * error[arpack]]
    best = min(ok, key=lambda n: timing[n]) if ok else None
    ratio = timing[arpack] / timing[best] if best else 0.0
    default = "lowrank.pca default"
    default_ratio = timing[arpack] / timing[default]
    default_ok = error[default] <= 1.5 * error[arpack]
    rows.append(
        [
            "(c) sparse PCA 20000x2000 (0.5%), k=20, centred",
            f"{arpack}: {fmt_time(timing[arpack])}, var err {error[arpack]:.1e}",
            f"{fmt_time(timing[default])}, var err {error[default]:.1e}",
            f"{default_ratio:.2f}x" + ("" if default_ok else " (less accurate)"),
            "yes" if default_ok and default_ratio > 1 else "NO",
            f"{best}: {fmt_time(timing[best])}, var err {error[best]:.1e}" if best else "none reaches it",
            f"{ratio:.2f}x",
            "> 1x",
            "yes" if ratio > 1 else "NO",
        ]
    )
    for name in calls:
        result.records.append(
            dict(
                table="issue19", matrix="sparse PCA", method=name, seconds=timing[name], var_error=error[name]
            )
        )
    result.tables.append(
        Table(
            title=f"issue 19: small and sparse SVDs, sparse PCA (fp32, cpu, {torch.get_num_threads()} thr.)",
            columns=[
                "case",
                "reference",
                "lowrank default",
                "default ratio",
                "default meets goal",
                "fastest lowrank setting at least as accurate",
                "best ratio",
                "goal",
                "best meets goal",
            ],
            rows=rows,
            notes=[
                "Accuracy: (a), (b) excess Frobenius error ||A - U S Vh||_F / ||A - A_k||_F - 1 (exact "
                "reference spectra); (c) max |variance - exact| / variance_1 (exact: eigenvalues of the "
                "centred Gram in float64); a lowrank setting counts when its error is at most the "
                "reference's ((c): at most 1.5x ARPACK's, whose error is at the fp32 rounding floor and "
                "varies by run).",
                f"Medians of {repeats} interleaved runs (benchmarks.common.measure): torch candidates in "
                "one loop, scikit-learn's in another (NumPy's BLAS threads keep spinning after a call and "
                "slowed whichever torch call came next on 2 cores); "
                "torch.svd_lowrank draws from the global generator, seeded 0 before each call.",
                "'lowrank default': rsvd(A, k) / pca(X, k) with no tuning (the narrow-block branch of "
                "method='auto'; (a): blocks of ceil(k/2) + 8 = 40, n_iter=3, sized for torch's accuracy "
                "with a margin on nearly flat spectra too, where 32 and 36 fall short); 'wide': the rule "
                "before it (block k + max(4, k // 8), n_iter=2).",
            ],
        )
    )
