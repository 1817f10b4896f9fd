"""The factorization routines against what users would run instead, side by side in one process.

- NMF: ``lowrank.nmf`` (HALS) vs ``sklearn.decomposition.NMF`` (coordinate descent, its defaults), with
  the objective each reaches and the time lowrank needs to reach sklearn's objective (within 1%);
- PCA: ``lowrank.pca`` vs sklearn ``PCA`` (randomized / full) on dense data, and on sparse data vs sklearn
  ``PCA(svd_solver="arpack")`` (centred) and ``TruncatedSVD`` (uncentred, what LSA users run);
- interpolative decomposition / CUR: ``lowrank.interpolative`` and ``lowrank.cur`` vs
  ``scipy.linalg.interpolative.interp_decomp`` (randomized and deterministic), error / optimal rank-k error;
- Nyström: ``lowrank.nystrom`` vs ``scipy.sparse.linalg.eigsh`` (Lanczos) on a PSD kernel matrix;
- ALS completion: time and recovery error (no usual alternative in scipy/sklearn);
- tall-skinny QR: ``lowrank.cholesky_qr`` vs ``torch.linalg.qr`` (time, orthogonality).

Every "error / optimal" is ``‖A − Â‖_F`` divided by the best rank-k error from the exact SVD.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch

import lowrank
from benchmarks.common import BenchResult, Table, Timing, fmt_time, measure_apart, synchronize


def _log(message: str) -> None:
    print(f"  factorize: {message}", file=sys.stderr)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _sklearn():
    try:
        import sklearn.decomposition as decomposition
    except ImportError:
        return None
    return decomposition


# ------------------------------------------------------------------------------------------------ NMF


def _nmf_table(device: str, quick: bool, dtype: torch.dtype, result: BenchResult) -> Table:
    import scipy.sparse as sp

    decomposition = _sklearn()
    rng = np.random.default_rng(0)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    cases = []
    m, n, k = (1000, 600, 20) if quick else (3000, 2000, 30)
    dense = (rng.random((m, k)) @ rng.random((k, n)) + 0.1 * rng.random((m, n))).astype(np_dtype)
    cases.append((f"dense {m}x{n}, k={k}", dense, torch.from_numpy(dense).to(device)))
    m, n, k = (3000, 1500, 20) if quick else (20000, 5000, 30)
    sparse = sp.random(m, n, density=0.02, random_state=1, format="csr", dtype=np_dtype)
    cases.append(
        (f"sparse {m}x{n} (2%), k={k}", sparse, torch.from_numpy(sparse.toarray()).to_sparse_csr().to(device))
    )
    long_iter = 300 if quick else 1000
    configs = {"defaults": {}, f"tol=1e-6, max_iter={long_iter}": {"tol": 1e-6, "max_iter": long_iter}}
    rows = []
    for label, X_np, X_torch in cases:
        k = int(label.rsplit("k=", 1)[1])
        dense_np = (X_np.toarray() if sp.issparse(X_np) else X_np).astype(np.float64)

        def objective(W, H, dense_np=dense_np):
            W = W if isinstance(W, np.ndarray) else _to_numpy(W)
            H = H if isinstance(H, np.ndarray) else _to_numpy(H)
            return 0.5 * float(np.linalg.norm(dense_np - W @ H) ** 2)

        for setting, kw in configs.items():
            tight = bool(kw)
            if tight and quick and sp.issparse(X_np):
                continue
            # the long runs take seconds each: time them once; the short ones are interleaved and repeated
            warmup, repeats = (0, 1) if tight else (1, 3 if quick else 5)
            synchronize(device)
            begin = time.perf_counter()
            W, H, history = lowrank.nmf(X_torch, k, seed=0, return_history=True, **kw)
            synchronize(device)
            single = time.perf_counter() - begin
            candidates = {} if tight else {"lowrank": lambda X=X_torch, k=k: lowrank.nmf(X, k, seed=0)}
            sk_obj = sk_iters = target = None
            if decomposition is not None:

                def run_sklearn(X=X_np, k=k, kw=kw):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model = decomposition.NMF(k, random_state=0, **kw)
                        W = model.fit_transform(X)
                    return model, W

                model, W_sk = run_sklearn()
                sk_obj, sk_iters = objective(W_sk, model.components_), model.n_iter_
                target = next((i + 1 for i, value in enumerate(history) if value <= 1.01 * sk_obj), None)
                candidates["sklearn"] = run_sklearn
                if target is not None:
                    candidates["lowrank to sklearn obj"] = lambda X=X_torch, k=k, t=target: lowrank.nmf(
                        X, k, seed=0, max_iter=t, tol=0.0
                    )
            times = measure_apart(candidates, device=device, warmup=warmup, repeats=repeats)
            if tight:
                times["lowrank"] = Timing(single, single, single, 1)
            ours_obj = objective(W, H)
            row = [label, setting]
            if sk_obj is not None:
                row += [fmt_time(times["sklearn"].median), f"{sk_obj:.5g} ({sk_iters} it)"]
            else:
                row += ["n/a", "n/a"]
            to_target = times.get("lowrank to sklearn obj")
            if to_target is not None:
                W, H = lowrank.nmf(X_torch, k, seed=0, max_iter=target, tol=0.0)
                row += [
                    f"{fmt_time(to_target.median)} ({target} it, {objective(W, H) / sk_obj:.4f}x)",
                    f"{times['sklearn'].median / to_target.median:.1f}x",
                ]
            else:
                row += ["not reached", "n/a"]
            row += [fmt_time(times["lowrank"].median), f"{ours_obj:.5g} ({len(history)} it)"]
            rows.append(row)
            for name, timing in times.items():
                result.records.append(
                    {"table": "nmf", "case": label, "setting": setting, "candidate": name, **timing.as_dict()}
                )
            result.records.append(
                {
                    "table": "nmf",
                    "case": label,
                    "setting": setting,
                    "objective_lowrank": ours_obj,
                    "objective_sklearn": sk_obj,
                    "iterations_to_sklearn_objective": target,
                }
            )
            _log(f"nmf {label} {setting} done")
    return Table(
        title=f"NMF, {str(dtype).removeprefix('torch.')}, {device}: objective ½‖X − WH‖² and median time",
        columns=[
            "data",
            "tol / max_iter (both)",
            "sklearn NMF",
            "sklearn objective",
            "lowrank to ≤1.01x sklearn's objective",
            "speed-up",
            "lowrank (same settings)",
            "lowrank objective",
        ],
        rows=rows,
        notes=[
            "sklearn: solver='cd' (coordinate descent = HALS), init='nndsvda', its own stopping rule. "
            "lowrank: HALS with Gillis-Glineur inner sweeps, NNDSVD init, stops on the relative "
            "objective decrease.",
            "'to ≤1.01x' reruns lowrank with max_iter = the first iteration whose objective is within 1% of "
            "sklearn's final one (from lowrank's history); in brackets that objective over sklearn's.",
            "Long (tol=1e-6) runs are timed once (quick mode: dense case only); the others interleaved, "
            "median of 3 (quick) or 5 runs.",
        ],
    )


# ------------------------------------------------------------------------------------------------ PCA


def _pca_table(device: str, quick: bool, dtype: torch.dtype, result: BenchResult) -> Table:
    import scipy.sparse as sp

    decomposition = _sklearn()
    rng = np.random.default_rng(2)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    repeats = 3 if quick else 5
    rows = []
    k = 20
    m, n = (4000, 400) if quick else (20000, 1000)
    dense = (
        rng.standard_normal((m, n)) @ (rng.standard_normal((n, n)) * np.logspace(0, -3, n)[:, None])
    ).astype(np_dtype) + 1.0
    m2, n2 = (20000, 2000) if quick else (100000, 5000)
    sparse = sp.random(m2, n2, density=0.005, random_state=3, format="csr", dtype=np_dtype)
    sparse = (sparse @ sp.diags((0.97 ** np.arange(n2)).astype(np_dtype))).tocsr()

    def exact_variances(X):
        D = X.toarray() if sp.issparse(X) else X
        D = D.astype(np.float64)
        D = D - D.mean(axis=0)
        return np.linalg.eigvalsh(D.T @ D)[::-1][:k] / (D.shape[0] - 1)

    for label, X_np, X_torch in (
        (f"dense {m}x{n}", dense, torch.from_numpy(dense).to(device)),
        (f"sparse {m2}x{n2} (0.5%)", sparse, torch.from_numpy(sparse.toarray()).to_sparse_csr().to(device)),
    ):
        truth = exact_variances(X_np)
        candidates = {"lowrank.pca": lambda X=X_torch: lowrank.pca(X, k, seed=0)}
        outputs = {"lowrank.pca": lambda X=X_torch: _to_numpy(lowrank.pca(X, k, seed=0).explained_variance)}
        if decomposition is not None:
            if sp.issparse(X_np):
                sk = {
                    "sklearn PCA arpack": lambda X=X_np: decomposition.PCA(k, svd_solver="arpack").fit(X),
                    "sklearn TruncatedSVD": lambda X=X_np: decomposition.TruncatedSVD(k, random_state=0).fit(
                        X
                    ),
                }
            else:
                sk = {
                    "sklearn PCA randomized": lambda X=X_np: decomposition.PCA(
                        k, svd_solver="randomized", random_state=0
                    ).fit(X),
                    "sklearn PCA full": lambda X=X_np: decomposition.PCA(k, svd_solver="full").fit(X),
                }
            candidates.update(sk)
            for name, fn in sk.items():
                outputs[name] = lambda fn=fn: np.asarray(fn().explained_variance_, dtype=np.float64)
        times = measure_apart(candidates, device=device, warmup=1, repeats=repeats)
        for name, timing in times.items():
            variances = outputs[name]()
            error = float(np.abs(variances - truth).max() / truth[0])
            note = " (uncentred)" if "Truncated" in name else ""
            rows.append([label, name + note, fmt_time(timing.median), f"{error:.1e}"])
            result.records.append(
                {"table": "pca", "case": label, "candidate": name, **timing.as_dict(), "error": error}
            )
        _log(f"pca {label} done")
    return Table(
        title=f"PCA, k={k}, {str(dtype).removeprefix('torch.')}, {device}: median time and accuracy",
        columns=["data", "method", "time", "max |var − exact var| / var₁"],
        rows=rows,
        notes=[
            "lowrank.pca: method='auto' (randomized, block Krylov through lowrank.rsvd; sparse data centred "
            "implicitly). The exact variances come from the eigenvalues of the centred Gram matrix.",
            "TruncatedSVD does not centre: its 'variance' is of the uncentred projection, so its error "
            "column measures how far that is from PCA, not a numerical error.",
        ],
    )


# ---------------------------------------------------------------------------------- ID / CUR / Nyström


def _decaying(m: int, n: int, decay: float, seed: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0, decay, n)
    return ((U * s) @ V.T).astype(dtype), s


def _skeleton_table(device: str, quick: bool, dtype: torch.dtype, result: BenchResult) -> Table:
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    m, n, k = (2000, 1000, 50) if quick else (6000, 3000, 100)
    A, s = _decaying(m, n, -8, 4, np_dtype)
    A64 = A.astype(np.float64)
    best = float(np.sqrt((s[k:] ** 2).sum()))
    A_torch = torch.from_numpy(A).to(device)
    repeats = 3 if quick else 5

    def id_error(idx, P):
        return float(np.linalg.norm(A64 - A64[:, idx[:k]] @ P)) / best

    candidates = {
        "lowrank.interpolative": lambda: lowrank.interpolative(A_torch, k, seed=0),
        "lowrank.interpolative exact": lambda: lowrank.interpolative(A_torch, k, method="exact"),
        "lowrank.cur": lambda: lowrank.cur(A_torch, k, seed=0),
    }

    def err_ours(method):
        idx, proj = lowrank.interpolative(A_torch, k, seed=0, method=method)
        return id_error(idx.cpu().numpy(), _to_numpy(lowrank.interpolation_matrix(idx, proj)))

    def err_cur():
        C, U, R, _, _ = lowrank.cur(A_torch, k, seed=0)
        return float(np.linalg.norm(A64 - _to_numpy(C) @ _to_numpy(U) @ _to_numpy(R))) / best

    errors = {
        "lowrank.interpolative": lambda: err_ours("randomized"),
        "lowrank.interpolative exact": lambda: err_ours("exact"),
        "lowrank.cur": err_cur,
    }
    try:
        import scipy.linalg.interpolative as sli

        A_c = np.asfortranarray(A64)
        candidates["scipy interp_decomp (randomized)"] = lambda: sli.interp_decomp(A_c, k)
        candidates["scipy interp_decomp (rand=False)"] = lambda: sli.interp_decomp(A_c, k, rand=False)

        def err_scipy(rand):
            idx, proj = sli.interp_decomp(A_c, k, rand=rand)
            return id_error(idx, sli.reconstruct_interp_matrix(idx, proj))

        errors["scipy interp_decomp (randomized)"] = lambda: err_scipy(True)
        errors["scipy interp_decomp (rand=False)"] = lambda: err_scipy(False)
    except ImportError:
        result.notes.append("scipy missing: interpolative decomposition alternatives skipped")
    times = measure_apart(candidates, device=device, warmup=1, repeats=repeats)
    rows = []
    for name, timing in times.items():
        error = errors[name]()
        rows.append([f"{m}x{n}, k={k}", name, fmt_time(timing.median), f"{error:.3f}"])
        result.records.append(
            {"table": "skeleton", "candidate": name, **timing.as_dict(), "error_over_optimal": error}
        )

    # Nyström on a PSD matrix vs Lanczos
    n_psd, k_psd = (2000, 50) if quick else (6000, 100)
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((n_psd, n_psd)))
    lam = np.logspace(0, -6, n_psd)
    P = ((Q * lam) @ Q.T).astype(np_dtype)
    P = (P + P.T) / 2
    P_torch = torch.from_numpy(P).to(device)
    best_psd = float(np.sqrt((lam[k_psd:] ** 2).sum()))
    P64 = P.astype(np.float64)
    candidates = {"lowrank.nystrom": lambda: lowrank.nystrom(P_torch, k_psd, seed=0)}

    def err_nys():
        U, L = lowrank.nystrom(P_torch, k_psd, seed=0)
        U = _to_numpy(U)
        return float(np.linalg.norm(P64 - (U * _to_numpy(L)) @ U.T)) / best_psd

    errors = {"lowrank.nystrom": err_nys}
    try:
        import scipy.sparse.linalg as spla

        candidates["scipy eigsh (Lanczos)"] = lambda: spla.eigsh(P, k_psd)
        v0 = np.random.default_rng(0).standard_normal(n_psd)

        def err_eigsh():
            w, V = spla.eigsh(P64, k_psd, v0=v0)
            return float(np.linalg.norm(P64 - (V * w) @ V.T)) / best_psd

        errors["scipy eigsh (Lanczos)"] = err_eigsh
    except ImportError:
        pass
    times = measure_apart(candidates, device=device, warmup=1, repeats=repeats)
    for name, timing in times.items():
        error = errors[name]()
        rows.append([f"PSD {n_psd}, k={k_psd}", name, fmt_time(timing.median), f"{error:.3f}"])
        result.records.append(
            {"table": "nystrom", "candidate": name, **timing.as_dict(), "error_over_optimal": error}
        )
    _log("interpolative / cur / nystrom done")
    return Table(
        title=f"Interpolative decomposition, CUR, Nyström, {str(dtype).removeprefix('torch.')}, {device}",
        columns=["matrix", "method", "time", "error / optimal rank-k error"],
        rows=rows,
        notes=[
            "Test matrices: singular values (eigenvalues) logspace(0, -8) (resp. (0, -6)), random singular "
            "vectors. 1.000 would be the truncated SVD itself.",
            "lowrank.nystrom: one product with an (n, k+10) block (single pass); eigsh: Lanczos to "
            "convergence.",
        ],
    )


# ------------------------------------------------------------------------------------- ALS and TSQR


def _als_qr_table(device: str, quick: bool, dtype: torch.dtype, result: BenchResult) -> Table:
    rows = []
    m, n, k = (2000, 1500, 10) if quick else (10000, 8000, 20)
    g = torch.Generator().manual_seed(6)
    X = (
        torch.randn(m, k, generator=g, dtype=torch.float64)
        @ torch.randn(k, n, generator=g, dtype=torch.float64)
    ).to(device, dtype)
    mask = (torch.rand(m, n, generator=g) < 0.3).to(device)
    begin = time.perf_counter()
    U, V, history = lowrank.als(X, mask, k, seed=0, return_history=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    error = float(torch.linalg.matrix_norm(U @ V.T - X) / torch.linalg.matrix_norm(X))
    rows.append(
        [
            f"ALS completion {m}x{n}, rank {k}, 30% observed",
            "lowrank.als",
            fmt_time(elapsed),
            f"rel. error {error:.1e} after {len(history['train_rmse'])} sweeps",
        ]
    )
    result.records.append(
        {"table": "als", "seconds": elapsed, "relative_error": error, "sweeps": len(history["train_rmse"])}
    )

    mq, nq = (50000, 64) if quick else (1000000, 128)
    Y = torch.randn(mq, nq, generator=g, dtype=torch.float64).to(device, dtype)
    candidates = {
        "torch.linalg.qr": lambda: torch.linalg.qr(Y),
        "lowrank.cholesky_qr": lambda: lowrank.cholesky_qr(Y),
    }
    times = measure_apart(candidates, device=device, warmup=1, repeats=3 if quick else 7)
    eye = torch.eye(nq, dtype=dtype, device=device)
    for name, timing in times.items():
        Q, _ = candidates[name]()
        orth = float(torch.linalg.matrix_norm(Q.T @ Q - eye))
        rows.append([f"tall-skinny QR {mq}x{nq}", name, fmt_time(timing.median), f"‖QᵀQ − I‖_F = {orth:.1e}"])
        result.records.append({"table": "tsqr", "candidate": name, **timing.as_dict(), "orthogonality": orth})
    _log("als / qr done")
    return Table(
        title=f"ALS completion and tall-skinny QR, {str(dtype).removeprefix('torch.')}, {device}",
        columns=["problem", "method", "time", "accuracy"],
        rows=rows,
        notes=["ALS is timed once (one end-to-end run with the default spectral init and stopping rule)."],
    )


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    cuda = torch.device(device).type == "cuda"
    dtype = torch.float32 if cuda else torch.float64
    result = BenchResult(name="factorize")
    torch.manual_seed(0)
    result.tables.append(_nmf_table(device, quick, dtype, result))
    result.tables.append(_pca_table(device, quick, dtype, result))
    result.tables.append(_skeleton_table(device, quick, dtype, result))
    result.tables.append(_als_qr_table(device, quick, dtype, result))
    if cuda:
        result.notes.append("On CUDA lowrank runs on the GPU in float32; sklearn/scipy run on the CPU.")
    return result


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
