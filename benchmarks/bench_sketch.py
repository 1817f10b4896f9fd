"""One-pass streaming SVD (``lowrank.StreamingSVD``) on a row-block stream made on the fly, side by side with
the floor and scikit-learn's ``IncrementalPCA``.

The stream: ``A = U diag(sigma) V^T`` with ``U`` the first ``r`` columns of the orthonormal DCT-II basis
(rows computed per block, so ``A`` is never held whole), ``V`` a random ``n x r`` orthonormal matrix and
``sigma_i = 0.95^i + 0.01`` (``r = 100``; 400 with --full, more than the sketch size 161): the optimal
rank-k error is known exactly, uncentred (``sqrt(sum_{i >= k} sigma_i^2)``) and centred (DCT column 0
is the constant one, the others have zero mean: centring removes exactly ``sigma_0``).

- time: one pass of the stream through ``StreamingSVD.update`` + ``result()``; the floor is the same pass
  through one GEMM of each block with a Gaussian of the sketch width ``s`` (``A_b @ G``, ``G`` ``n x s``);
  "generation" is the pass alone (making the blocks), reported so that the sketch's own share is visible;
- error: ``||A - U S Vh||_F`` over the optimal rank-k error, measured in a second pass;
- memory: peak RSS (``VmHWM``) of a subprocess streaming through ``StreamingSVD``, minus that of the same
  subprocess only generating the blocks, minus the returned factors, over the matrix size ``4 m n`` bytes;
- IncrementalPCA (centred, ``partial_fit`` per block) against ``StreamingSVD(center=True)``: time and the
  projection error ``||A_c - A_c V^T V||_F`` over the optimal centred rank-k error.

``python -m benchmarks.bench_sketch [--full]``; the full stream is the issue's 100000 x 3000 fp32, blocks of
5000 rows, k = 40.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import torch

from benchmarks.common import BenchResult, SkipBenchmark, Table, measure, synchronize
from lowrank.sketch import StreamingSVD


def _log(message: str) -> None:
    print(f"  sketch: {message}", file=sys.stderr)


class Stream:
    """The row blocks of ``A = U diag(sigma) V^T`` (DCT rows for ``U``), made on the fly."""

    def __init__(self, m: int, n: int, block: int, device: str = "cpu", seed: int = 0, rank: int = 100):
        self.m, self.n, self.block, self.device = m, n, block, torch.device(device)
        self.r = min(rank, n, m)
        gen = torch.Generator().manual_seed(seed)
        V, _ = torch.linalg.qr(torch.randn(n, self.r, dtype=torch.float64, generator=gen))
        self.sigma = 0.95 ** torch.arange(self.r, dtype=torch.float64) + 0.01
        self.SVt = (self.sigma[:, None] * V.T).float().to(self.device)  # r x n
        self.freq = torch.arange(self.r, dtype=torch.float64, device=self.device)

    def __iter__(self):
        for start in range(0, self.m, self.block):
            stop = min(self.m, start + self.block)
            yield self.rows(start, stop)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        i = torch.arange(start, stop, dtype=torch.float64, device=self.device)
        U = torch.cos(math.pi * (i[:, None] + 0.5) * self.freq[None, :] / self.m) * math.sqrt(2.0 / self.m)
        U[:, 0] = math.sqrt(1.0 / self.m)
        return U.float() @ self.SVt

    def optimal(self, k: int, center: bool = False) -> float:
        tail = self.sigma[1:] if center else self.sigma
        return float(tail[k:].square().sum().sqrt())


def _sketch(stream: Stream, k: int, center: bool = False, keep_u: bool = True) -> StreamingSVD:
    sk = StreamingSVD(stream.n, k, seed=0, center=center, keep_u=keep_u, device=stream.device)
    for block in stream:
        sk.update(block)
    return sk


def _floor(stream: Stream, width: int) -> torch.Tensor:
    G = torch.randn(stream.n, width, device=stream.device)
    acc = None
    for block in stream:
        Y = block @ G
        acc = Y.sum(0) if acc is None else acc + Y.sum(0)
    return acc


def _generate(stream: Stream) -> float:
    total = 0.0
    for block in stream:
        total += float(block[0, 0])
    return total


def _factor_error(stream: Stream, U, S, Vh, center_mean=None) -> float:
    total, row = 0.0, 0
    for block in stream:
        b = block.double()
        if center_mean is not None:
            b = b - center_mean
        approx = (U[row : row + b.shape[0]].double() * S.double()) @ Vh.double()
        total += float((b - approx).square().sum())
        row += b.shape[0]
    return math.sqrt(total)


def _projection_error(stream: Stream, Vh, mean) -> float:
    """``||A_c - A_c V V^T||_F`` for orthonormal rows ``Vh``."""
    V = Vh.double().to(stream.device)
    total = 0.0
    for block in stream:
        b = block.double() - mean
        total += float((b - (b @ V.T) @ V).square().sum())
    return math.sqrt(total)


# ------------------------------------------------------------------------------------------- memory

_MEM_CODE = """
import json, sys, torch
torch.set_num_threads({threads})
from benchmarks.bench_sketch import Stream, _sketch, _generate
stream = Stream({m}, {n}, {block}, rank={rank})
mode = "{mode}"
out = {{}}
if mode == "generate":
    _generate(stream)
    out["factors"] = 0
else:
    sk = _sketch(stream, {k}, keep_u=(mode == "keep_u"))
    U, S, Vh = sk.result()
    out["factors"] = sum(t.numel() * t.element_size() for t in (U, S, Vh) if t is not None)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        out["hwm"] = int(line.split()[1]) * 1024
print(json.dumps(out))
"""


def _peak_memory(m: int, n: int, k: int, block: int, mode: str) -> dict:
    rank = 400 if m * n > 10**8 else 100
    code = _MEM_CODE.format(m=m, n=n, k=k, block=block, mode=mode, rank=rank, threads=torch.get_num_threads())
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_table(m: int, n: int, k: int, block: int) -> Table:
    try:
        open("/proc/self/status").close()
    except OSError:
        return Table("peak memory", ["mode"], [["/proc/self/status not available: not measured"]])
    base = _peak_memory(m, n, k, block, "generate")
    rows = []
    matrix = 4 * m * n
    for mode in ("lean", "keep_u"):
        run = _peak_memory(m, n, k, block, mode)
        extra = run["hwm"] - base["hwm"] - run["factors"]
        rows.append(
            [
                f"StreamingSVD({'keep_u=False' if mode == 'lean' else 'keep_u=True'})",
                f"{extra / 2**20:.1f} MiB",
                f"{100 * extra / matrix:.2f}%",
                f"{run['factors'] / 2**20:.1f} MiB",
            ]
        )
        _log(f"memory {mode}: {extra / 2**20:.1f} MiB beyond factors")
    return Table(
        title=f"Peak RSS beyond the returned factors, {m}x{n} fp32 stream ({matrix / 2**20:.0f} MiB), k={k}",
        columns=["candidate", "peak RSS - generation-only peak - factors", "of the matrix", "factors"],
        rows=rows,
        notes=[
            "VmHWM of a subprocess that streams the blocks through StreamingSVD, minus VmHWM of the same "
            f"subprocess that only generates them (blocks of {block} rows, "
            f"{4 * block * n / 2**20:.0f} MiB each)."
        ],
    )


# ------------------------------------------------------------------------------------------- run


def run(*, quick: bool = True, device: str = "cpu") -> BenchResult:
    m, n, k, block = (6000, 400, 10, 1000) if quick else (100000, 3000, 40, 5000)
    result = BenchResult(name="sketch")
    stream = Stream(m, n, block, device=device, rank=100 if quick else 400)
    probe = StreamingSVD(n, k)
    s, c = probe.sketch, probe.core
    _log(f"{m}x{n}, k={k}: sketch={s}, core={c}, n_test={probe.n_test}")
    timings = measure(
        {
            "generation only": lambda: _generate(stream),
            f"floor: one GEMM of width s={s}": lambda: _floor(stream, s),
            "StreamingSVD (update + result)": lambda: _sketch(stream, k).result(),
            "StreamingSVD(keep_u=False)": lambda: _sketch(stream, k, keep_u=False).result(),
        },
        device=device,
        warmup=1 if quick else 0,
        repeats=3,
    )
    sk = _sketch(stream, k)
    U, S, Vh = sk.result()
    err = _factor_error(stream, U, S, Vh)
    opt = stream.optimal(k)
    estimate = sk.error_estimate()
    gen_t = timings["generation only"].median
    floor_t = timings[f"floor: one GEMM of width s={s}"].median
    rows = []
    for name, timing in timings.items():
        rows.append(
            [
                name,
                timing,
                f"{timing.median / floor_t:.2f}x",
                f"{(timing.median - gen_t) / max(floor_t - gen_t, 1e-9):.2f}x"
                if name != "generation only"
                else "",
            ]
        )
    result.tables.append(
        Table(
            title=f"One pass over a {m}x{n} fp32 stream (blocks of {block}), k={k}, {device}",
            columns=["candidate", "time", "vs floor", "vs floor, generation excluded"],
            rows=rows,
            notes=[
                f"default sizes: sketch s={s} (4k+1), core c={c} (2s+1), n_test=10; error "
                f"||A - U S Vh||_F / optimal = {err / opt:.4f}; "
                f"error_estimate / true error = {estimate / err:.3f}",
                f"Per row StreamingSVD does one GEMM of width s = {s} (A @ Omega, as the floor), the "
                "float64 Gram Y^T Y (s^2 per row) and one pass of lowrank._ops.sparse_sign_add_ "
                "over the block for [Psi A; Phi A; Theta A; 1^T A]: 8 + 8 signed adds of the row "
                "(sparse sign maps) and q + 1 = 11 dense ones (Gaussian Theta, ones), gathered per "
                "target row in registers. Before the sparse maps the dense GEMM width was "
                f"2s + c + q + 1 = {2 * s + c + 11} columns.",
            ],
        )
    )
    result.records.append(
        {
            "case": f"{m}x{n} k={k}",
            "sketch": s,
            "core": c,
            "error_over_optimal": err / opt,
            "estimate_over_error": estimate / err,
            **{name: t for name, t in timings.items()},
        }
    )
    _log(f"error/optimal {err / opt:.4f}, estimate/true {estimate / err:.3f}")
    result.tables.append(_ipca_table(stream, k, device, gen_t))
    if torch.device(device).type == "cpu" and not quick:
        result.tables.append(_memory_table(m, n, k, block))
    elif quick:
        result.notes.append(
            "peak memory is measured with --full only (RSS noise exceeds 5% of a quick stream)"
        )
    return result


def _ipca_table(stream: Stream, k: int, device: str, gen_t: float) -> Table:
    try:
        from sklearn.decomposition import IncrementalPCA
    except ImportError as error:
        raise SkipBenchmark("scikit-learn is not installed") from error
    opt = stream.optimal(k, center=True)
    rows, times = [], {}
    wide = min(stream.n, 8 * k + 1)
    for label, sketch in (("default sizes", None), (f"sketch={wide} (8k+1)", wide)):
        synchronize(device)
        begin = time.perf_counter()
        sk = StreamingSVD(stream.n, k, sketch=sketch, seed=0, center=True, keep_u=False, device=stream.device)
        for block in stream:
            sk.update(block)
        _, _, Vh = sk.result()
        synchronize(device)
        times[label] = time.perf_counter() - begin
        mean = (sk._parts(sk._acc["sketch"])["colsum"] / sk.n_rows).to(stream.device)
        rows.append([f"StreamingSVD(center=True, keep_u=False), {label}", times[label], Vh, mean])
    begin = time.perf_counter()
    ipca = IncrementalPCA(n_components=k)
    for block in stream:
        ipca.partial_fit(block.cpu().numpy())
    t_ipca = time.perf_counter() - begin
    rows.append(
        [
            "sklearn IncrementalPCA(n_components=k), partial_fit per block",
            t_ipca,
            torch.from_numpy(ipca.components_),
            torch.from_numpy(ipca.mean_).double().to(stream.device),
        ]
    )
    table_rows = []
    for name, seconds, Vh, mean in rows:
        err = _projection_error(stream, Vh, mean) / opt
        table_rows.append([name, f"{seconds:.2f} s", f"{err:.4f}", f"{t_ipca / seconds:.1f}x"])
        _log(f"{name}: {seconds:.2f} s, projection error / optimal {err:.4f}")
    return Table(
        title=f"Centred (PCA) on the same stream, k={k}: StreamingSVD(center=True) vs sklearn IncrementalPCA",
        columns=["candidate", "time (one run)", "projection error / optimal", "speed-up vs IncrementalPCA"],
        rows=table_rows,
        notes=[
            f"All include generating the blocks ({gen_t:.2f} s alone); IncrementalPCA gets NumPy blocks.",
            "Projection error ||A_c - A_c V^T V||_F, each centred with its own mean.",
        ],
    )


if __name__ == "__main__":
    from benchmarks.report import standalone_main

    standalone_main(run, __doc__.splitlines()[0])
