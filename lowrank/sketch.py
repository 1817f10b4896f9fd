"""Single-pass streaming SVD of a matrix that arrives in row blocks, with an a-posteriori error estimate.

:class:`StreamingSVD` keeps three linear sketches of ``A`` (``m x n``, rows streamed, ``m`` unknown in
advance) and reconstructs a rank-``k`` SVD from them after one pass (Tropp, Yurtsever, Udell & Cevher 2019,
"three-sketch" method):

- range sketch ``Y = A Omega`` (``m x s``; ``Omega`` is ``n x s``),
- co-range sketch ``W = Psi A`` (``s x n``; ``Psi`` is ``s x m``),
- core sketch ``Z = Phi A Xi`` (``c x c``; ``Phi`` is ``c x m``, ``Xi`` is ``n x c``), kept as ``Phi A``
  (``c x n``) and multiplied by ``Xi`` once, in :meth:`StreamingSVD.result`,
- test sketch ``E = Theta A`` (``q x n``) for the error estimate (their §6).

Test matrices: ``Omega``, ``Xi`` and ``Theta`` are standard Gaussian (the error estimate's ``chi^2``
argument needs a Gaussian ``Theta``); ``Psi`` and ``Phi`` are sparse sign maps (their §3.3.1): each
column, i.e. each streamed row, has ``zeta = min(8, d)`` nonzeros ``+-1`` at distinct uniform positions,
so a row is added, with a sign, to ``zeta`` rows of ``Psi A`` and of ``Phi A`` (``zeta n`` adds each,
:func:`lowrank._ops.sparse_sign_add_`) instead of entering a GEMM of width ``s + c``. Their scale is
irrelevant (``W`` only gives a basis, and ``Phi``'s scale cancels in the core solve).

The column-side test matrices (``Omega``, ``Xi``) are drawn once from the seed (torch's generator). The
row-side ones (``Psi``, ``Phi``, ``Theta``) act on rows that are not known in advance: the column for global
row ``i`` comes from a counter-based generator keyed by ``(seed, i)`` (:func:`lowrank._ops.sketch_row_draws`),
so it does not depend on how the stream is cut into blocks, and exactly the rows of each block are drawn
(``Psi``/``Phi`` and ``Theta`` from separate keys: ``n_test`` does not change the factorisation). All
test matrices are drawn on the CPU (Gaussians as float32 values; then cast and moved), so a stream gives the
same sketches, up to rounding, on every device and in both dtypes.

Memory: ``O((s + c + q) n)`` for the sketches (kept in float64), plus ``Y`` (``m x s`` in the
compute dtype) when ``keep_u=True`` so that ``U``'s rows can be returned in arrival order. With
``keep_u=False`` only what ``S`` and ``Vh`` need is kept: the Gram matrix ``Y^T Y`` and the products
``Phi Y`` and ``Theta Y`` (all ``O(s^2 + c s)``), never ``Y`` itself.

References
----------
J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Streaming low-rank matrix approximation with an
application to scientific simulation", SIAM J. Sci. Comput. 41(4), A2430-A2463, 2019 (arXiv:1902.08651);
sparse sign maps: their §3.3.1, and J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Practical sketching
algorithms for low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 38(4), 1454-1485, 2017.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from lowrank._linop import (
    _from_numpy_or_scipy,
    as_linop,
    check_seed,
    compute_dtype,
    no_autocast,
    python_number,
)
from lowrank._ops import range_gram, sketch_row_draws, sketch_row_draws_limit, sparse_sign_add_
from lowrank.svd import SVDResult

__all__ = ["StreamingSVD", "is_row_stream", "iter_row_blocks", "stream_rsvd"]

#: Rows per product when :meth:`StreamingSVD.result` applies its final ``k x k`` step to ``U``.
_U_CHUNK = 4096

#: np.memmap inputs of :func:`lowrank.rsvd` at least this large (bytes) are streamed in row blocks.
MEMMAP_STREAM_BYTES = 1 << 28

#: Target size (bytes) of the row blocks read from a memmap or a shard file.
READ_BLOCK_BYTES = 1 << 26

#: Nonzeros per column (streamed row) of the sparse sign maps ``Psi`` and ``Phi`` (at most their row
#: count): ``zeta = min(8, d)``, the value Tropp et al. (2019, §3.3.1) recommend.
SPARSITY = 8

# 5: the sign maps and Theta from separate sketch_row_draws keys (4: one key, n_test moved Psi and Phi);
# 4: row-side test matrices from sketch_row_draws (3: torch generators per chunk)
_STATE_VERSION = 5

#: Bytes of a block's rows per GEMM call of :meth:`StreamingSVD.update` on the CPU (see :func:`gemm_rows`).
GEMM_BYTES = 1 << 23


def gemm_rows(n: int, itemsize: int, rows: int | None = None) -> int:
    """Rows per chunk of the range GEMM ``A_b Omega`` on the CPU (:func:`lowrank._ops.range_gram`): about
    :data:`GEMM_BYTES` of the block, at least 256 rows; for a block of ``rows`` rows the chunks are made
    equal (``ceil(rows / chunks)`` rows for the ``chunks`` that target gives), and for a block with fewer
    such chunks than torch threads, one chunk per thread (at most ``rows // 16`` chunks, made equal too).
    Threads take runs of whole chunks, each chunk's GEMM on one thread (no barrier per chunk), so the result
    depends on the chunks alone: on the thread count only through that small-block rule. On ``5000 x 3000``
    float32 blocks (``s = 161``, 2 cores, quiet, 30 interleaved rounds) GEMM + Gram took 0.85x (1 thread) /
    0.98x (2 threads) the time of one GEMM call per block in chunks of 700 rows (8 MiB), 0.87x / 1.02x in
    chunks of 349, against 0.89x / 1.16x for the former path (chunked GEMM with one thread, one call with
    two, then one Gram call); 0.83x / 0.88x once each chunk's Gram came by halves. Equal chunks: 8 of 699
    rows (the last 107) left one thread 2796 rows and the other 2204; 8 of 625 took 0.89x against 0.97x (2
    threads, 30 interleaved rounds, the column sums included)."""
    step = max(256, GEMM_BYTES // max(1, n * itemsize))
    if rows is None or rows <= 0:
        return step
    chunks = -(-rows // step)
    threads = torch.get_num_threads()
    if threads > 1 and chunks < threads:  # one chunk per thread, at least 16 rows each, made equal
        chunks = max(1, min(threads, rows // 16))
    return -(-rows // chunks)


def _mix(*keys: int) -> int:
    """A 63-bit generator seed from integer keys (blake2b): neighbouring chunks get unrelated streams."""
    data = b"".join(int(key).to_bytes(16, "little", signed=True) for key in keys)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _sign_fix(PV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(PV * sign, sign)``: the largest-magnitude entry of each column (right vector) positive."""
    idx = PV.abs().argmax(dim=0, keepdim=True)
    sign = torch.where(torch.gather(PV, 0, idx) < 0, -1.0, 1.0).to(PV.dtype)
    return PV * sign, sign


def _check_state(sk: StreamingSVD, state: Any) -> None:
    """Everything :meth:`StreamingSVD.load_state_dict` reads, checked before it changes anything: a state
    with a missing or mistyped entry (a corrupted or hand-edited file) raises ``ValueError`` naming it and
    leaves ``sk`` as it was."""
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError("state is not a StreamingSVD.state_dict()")
    if state["version"] != _STATE_VERSION:
        return  # load_state_dict says which versions differ
    for name in (*sk._CONFIG, "n_rows", "dtype", "sketches", "Y"):
        if name not in state:
            raise ValueError(f"state lacks {name!r}")
    for name in sk._CONFIG:  # a state of another configuration says which setting differs, not a shape
        if name == "row_offset" or (name == "seed" and sk._seed_drawn):
            continue
        if state[name] != getattr(sk, name):
            raise ValueError(f"state has {name}={state[name]!r}, this instance {getattr(sk, name)!r}")
    counts = {name: python_number(state[name]) for name in ("n_rows", "row_offset")}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"state has {name}={state[name]!r}, expected an int >= 0")
    if counts["row_offset"] + counts["n_rows"] > sk._row_limit():
        raise ValueError(
            f"state has row_offset + n_rows = {counts['row_offset'] + counts['n_rows']}, beyond the last "
            f"global row + 1 = {sk._row_limit()} that the row-side test matrices reach"
        )
    reduced = python_number(state.get("reduced_rows"))  # absent in states saved before it was kept
    if reduced is not None and (isinstance(reduced, bool) or not isinstance(reduced, int) or reduced < 0):
        raise ValueError(f"state has reduced_rows={state['reduced_rows']!r}, expected None or an int >= 0")
    if state["dtype"] not in (None, "float32", "float64"):
        raise ValueError(f"state has dtype={state['dtype']!r}, expected 'float32' or 'float64'")
    sketches, Y = state["sketches"], state["Y"]
    if sketches is None:
        if counts["n_rows"] != 0 or Y is not None:
            raise ValueError("state has no sketches but rows or a range sketch Y")
        return
    if state["dtype"] is None:
        raise ValueError("state has sketches but dtype=None")
    if sk._dtype_fixed and state["dtype"] != str(sk.dtype).removeprefix("torch."):
        raise ValueError(f"state has dtype torch.{state['dtype']}, this instance {sk.dtype}")
    s, c, q, n = sk.sketch, sk.core, sk.n_test, sk.n_features
    shapes = {"sketch": (s + c + q + 1, n), "G": (s, s), "rowsum": (s + c + q,), "ysum": (s,)}
    if not isinstance(sketches, dict) or set(sketches) != set(shapes):
        got = sorted(sketches) if isinstance(sketches, dict) else type(sketches).__name__
        raise ValueError(f"state sketches must be a dict with keys {sorted(shapes)}, got {got}")
    for key, shape in shapes.items():
        value = sketches[key]
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.shape != shape:
            what = (
                f"{value.dtype} {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ValueError(f"state sketch {key!r} must be a floating tensor of shape {shape}, got {what}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"state sketch {key!r} holds NaN or Inf entries")
    if Y is not None:
        if (
            not isinstance(Y, torch.Tensor)
            or Y.dim() != 2
            or Y.shape[1] != s
            or not Y.dtype.is_floating_point
        ):
            what = f"{Y.dtype} {tuple(Y.shape)}" if isinstance(Y, torch.Tensor) else type(Y).__name__
            raise ValueError(f"state's range sketch Y must be a floating (rows x {s}) tensor, got {what}")
        if Y.shape[0] != counts["n_rows"] or not bool(torch.isfinite(Y).all()):
            raise ValueError("state's kept range sketch Y does not match its row count or is not finite")
    elif sk.keep_u and counts["n_rows"] > 0:
        raise ValueError("state's kept range sketch Y does not match its row count (keep_u=True, Y is None)")


class StreamingSVD:
    r"""One-pass rank-``k`` SVD of a matrix given as a stream of row blocks (Tropp et al. 2019).

    Parameters
    ----------
    n_features : int
        Number of columns ``n`` of every block.
    k : int
        Target rank, ``1 <= k <= n``.
    sketch : int, optional
        Range/co-range sketch size ``s`` (the paper's ``k``), ``k <= s <= n``. Default ``min(4k + 1, n)``.
    core : int, optional
        Core sketch size ``c`` (the paper's ``s``), ``c >= s``. Default ``2 s + 1``.
    n_test : int
        Rows ``q`` of the Gaussian test sketch behind :meth:`error_estimate` (default 10; 0 disables it).
    center : bool
        Factor ``A - 1 mu^T`` (``mu`` the column means of all rows seen): one-pass PCA. The means are
        applied implicitly at :meth:`result` time (the sketches are linear), never to the blocks.
    keep_u : bool
        Keep the range sketch ``Y`` (``m x s``) so that :meth:`result` returns ``U`` (rows in arrival
        order). ``False``: memory-lean mode, ``result().U`` is ``None``.
    dtype : torch.dtype, optional
        Compute dtype (float32 or float64). Default: the first block's (fp16/bf16 -> fp32); later blocks
        of another dtype raise ``TypeError``. Given explicitly, every block is cast to it.
    device : torch.device or str, optional
        Where the sketches live and the products run. Default: the first block's device; blocks
        elsewhere (NumPy, SciPy, other devices) are moved there.
    seed : int, optional
        Seed of all test matrices; ``None`` draws one (kept in :meth:`state_dict`).
    row_offset : int
        Global index of the first row this instance will see (default 0). Ranks of a distributed stream
        pass where their rows start, so that the sum of their sketches equals the sketch of the whole
        matrix (see :func:`lowrank.distributed.reduce_sketch`). Global rows must stay below
        ``(2**62 - 1) // W`` (``W = max(zeta_s + zeta_c + 1, ceil(n_test / 2))`` generator words per row:
        about ``2.7e17`` by default, so ``rank * 2**40`` offsets suit up to ~240000 ranks); ``ValueError``
        otherwise (here, or in :meth:`update` for the rows that would pass it).

    Notes
    -----
    Sketch sizes: the default ``s = 4k + 1``, ``c = 2s + 1`` is the paper's a priori rule without a storage
    budget for a rank-``k`` truncation (their eq. (5.3): ``k = 4r + alpha``, ``s = 2k + alpha``,
    ``alpha = 1`` for real matrices; their ``k`` is our ``s``, their ``s`` our ``c``). ``s = 2k + 1`` halves
    the cost and the memory of ``Y`` but measured up to 1.56x the optimal error at ``k = 10`` on a
    ``0.9^i`` spectrum (1.01x with the default; ``tests/test_sketch.py``).
    Per block of ``b`` rows the cost is one GEMM ``Y_b = A_b Omega`` (``2 b n s`` flops: the floor of any
    one-pass sketch of width ``s``) and the float64 Gram ``Y_b^T Y_b`` (``2 b s^2``; float64 so that small
    singular values keep the data's precision), both per row chunk of :func:`gemm_rows` rows on the CPU
    (:func:`lowrank._ops.range_gram`: threads take runs of whole chunks, each chunk's GEMM on one thread;
    ``Y`` goes to a buffer reused across blocks when ``U`` is not kept), and one pass of
    :func:`lowrank._ops.sparse_sign_add_` over the block for ``[Psi A; Phi A; Theta A; 1^T A]`` (``zeta_s +
    zeta_c = 16`` signed adds and ``q + 1`` dense multiply-adds per entry, summed per target row in
    registers); each row is read twice (the GEMM, the sign maps). :meth:`result` adds ``2 c (c + s) n`` for
    ``Z`` and ``Phi Y`` (kept, with ``Xi``, until the next update: :meth:`error_estimate` reuses it). Sparse
    blocks stay sparse (the test rows then enter as a dense ``b x (s + c + q + 1)`` matrix, cost proportional
    to the block's nonzeros). Measured on 2 CPU cores, quiet, ``5000 x 3000`` float32 blocks, ``k = 40``, in
    units of one GEMM ``A_b G`` per block (``F``, the issue's floor), 2 threads, paired per block: GEMM + Gram
    + column sums 0.92-0.98, sign maps with ``Theta``/ones 0.29-0.33, row draws
    (:func:`lowrank._ops.sketch_row_draws`) 0.03-0.04, :meth:`result` + :meth:`error_estimate` 0.05-0.09
    (0.10-0.14 with ``U``). The 100000-row stream (in-call time, generation excluded;
    ``benchmarks/bench_sketch.py --full``, each block paired with the floor): 1.41x ``F`` with ``U`` kept,
    1.40x lean at 2 threads (other runs 1.38-1.58x), 1.17-1.28x at 1 thread.

    Reconstruction (:meth:`result`, the paper's three-sketch formula, with ``Z = (Phi A) Xi`` and
    ``Phi Y = (Phi A) Omega`` formed there): ``P = orth(W^T)``; with ``Y = Q R`` the approximation is
    ``Q C P^T``, ``C = (Phi Q)^+ Z (P^T Xi)^+``, i.e. ``Y M P^T`` with ``M = (Phi Y)^+ Z (P^T Xi)^+``
    (``R`` cancels, so ``Y`` never has to be orthonormalised): the singular values and right vectors come
    from the eigen-decomposition of ``M^T (Y^T Y) M`` (``s x s``, float64), ``U = Y M V diag(1/S)``.
    Centring subtracts the rank-one corrections ``W - (Psi 1) mu^T``, ``Phi A - (Phi 1) mu^T``,
    ``Y - 1 (mu^T Omega)`` and
    ``Y^T Y - m (Omega^T mu)(mu^T Omega)`` (as ``1^T Y = m mu^T Omega``).

    Limits of one pass: when the stream's numerical rank far exceeds ``s`` (a flat spectrum), the core
    solve is noisy and the leading singular values of the reconstruction can exceed the true ones (1.6x
    seen for a rank-30 matrix at ``k = 5``) while the Frobenius error stays within the paper's bound; use a
    wider ``sketch``, or :func:`lowrank.rsvd` on data that can be read more than once. In float32 with
    column means far larger than the centred signal, centring loses accuracy (use float64).

    Error estimate (§6): ``||A - A_k||_F^2 ~ ||Theta (A - A_k)||_F^2 / q`` with ``Theta`` standard
    Gaussian; the ratio is a ``chi^2`` with at least ``q`` degrees of freedom over ``q``, so for ``q = 10``
    the estimate of the norm lies within a factor 2 of the truth with probability above 0.99.

    Signs: the largest-magnitude entry of each right singular vector (row of ``Vh``) is positive (``U``
    may not be kept, so the convention is on ``Vh``, unlike :func:`lowrank.rsvd`).

    Examples
    --------
    >>> sk = StreamingSVD(n_features=300, k=10, seed=0)
    >>> for block in blocks:  # doctest: +SKIP
    ...     sk.update(block)
    >>> U, S, Vh = sk.result()  # doctest: +SKIP
    >>> sk.error_estimate()  # doctest: +SKIP
    """

    def __init__(
        self,
        n_features: int,
        k: int,
        *,
        sketch: int | None = None,
        core: int | None = None,
        n_test: int = 10,
        center: bool = False,
        keep_u: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
        row_offset: int = 0,
    ) -> None:
        center, keep_u = python_number(center), python_number(keep_u)  # np.bool_ too
        if device is not None and not isinstance(device, torch.device):
            try:
                device = torch.device(device)
            except (TypeError, RuntimeError) as error:
                raise ValueError(
                    f"device must be a torch.device or a name such as 'cuda:0', got {device!r}"
                ) from error
        n = _check_int(n_features, "n_features", 1)
        k = _check_int(k, "k", 1)
        if k > n:
            raise ValueError(f"k={k} exceeds n_features={n}")
        s = min(4 * k + 1, n) if sketch is None else _check_int(sketch, "sketch", 1)
        if not k <= s <= n:
            raise ValueError(f"sketch must satisfy k <= sketch <= n_features ({k} <= . <= {n}), got {s}")
        c = 2 * s + 1 if core is None else _check_int(core, "core", 1)
        if c < s:
            raise ValueError(f"core must be >= sketch={s}, got {c}")
        q = _check_int(n_test, "n_test", 0)
        for name, flag in (("center", center), ("keep_u", keep_u)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if dtype is not None:
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
            dtype = compute_dtype(dtype, "dtype")
            if dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"dtype must be float32 or float64 (or fp16/bf16, computed in fp32), got {dtype}"
                )
        self._seed_drawn = seed is None  # a drawn seed is no setting: load_state_dict adopts the state's
        if seed is None:
            seed = secrets.randbits(62)
        seed = check_seed(seed, allow_generator=False)
        self.n_features, self.k, self.sketch, self.core, self.n_test = n, k, s, c, q
        self.center, self.keep_u, self.seed = center, keep_u, seed
        self.row_offset = _check_int(row_offset, "row_offset", 0)
        if self.row_offset >= self._row_limit():
            raise ValueError(
                f"row_offset must be < {self._row_limit()} (the global rows the row-side test matrices "
                f"reach for these sketch sizes), got {self.row_offset}"
            )
        self.dtype: torch.dtype | None = dtype
        self._dtype_fixed = dtype is not None
        self.device: torch.device | None = None if device is None else torch.device(device)
        self.n_rows = 0  # rows seen by this instance (the rows of U)
        self._reduced_rows: int | None = None  # rows of the summed sketch after a distributed reduce
        self._cols: torch.Tensor | None = None  # Omega, compute dtype, on the device
        self._xi32: torch.Tensor | None = None  # Xi as drawn (float32), on the device
        self._buffers: dict[str, torch.Tensor] = {}  # per-block scratch reused across blocks (CPU)
        self._factor_cache: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        self._Y: list[torch.Tensor] = []
        self._acc: dict[str, torch.Tensor] | None = None

    @property
    def rows_total(self) -> int:
        """Rows of the matrix the sketch describes: those seen here, or by all ranks after a reduce."""
        return self.n_rows if self._reduced_rows is None else self._reduced_rows

    # ------------------------------------------------------------------------------------ random draws

    def _col_draw(self) -> torch.Tensor:
        """``[Omega, Xi]``: ``n x (s + c)`` standard Gaussian, float32 on the CPU (one draw from the seed)."""
        gen = torch.Generator().manual_seed(_mix(self.seed, -1))
        # float32 on the CPU whatever torch's default dtype and device (a float64 default drew other values)
        size = (self.n_features, self.sketch + self.core)
        return torch.randn(size, generator=gen, dtype=torch.float32, device="cpu")

    def _draw_cols(self) -> None:
        """Draw ``[Omega, Xi]`` once: ``Omega`` kept in the compute dtype, ``Xi`` as drawn (float32)."""
        cols = self._col_draw()
        self._cols = cols[:, : self.sketch].to(device=self.device, dtype=self.dtype).contiguous()
        self._xi32 = cols[:, self.sketch :].to(device=self.device).contiguous()

    def _omega(self) -> torch.Tensor:
        """``Omega``: ``n x s``, the range test matrix, in the compute dtype on the stream's device (kept)."""
        if self._cols is None:
            self._draw_cols()
        return self._cols

    def _xi(self) -> torch.Tensor:
        """``Xi``: ``n x c``, the core test matrix, float64 (kept as drawn, in float32: ``4 n c`` bytes)."""
        if self._xi32 is None:
            self._draw_cols()
        return self._xi32.double()

    def _forget_derived(self) -> None:
        """Drop everything derived from the seed, dtype or device (after they change in load_state_dict)."""
        self._cols, self._xi32, self._buffers = None, None, {}
        self._factor_cache = None

    def _row_limit(self) -> int:
        """One past the last global row index the row-side test matrices reach
        (:func:`lowrank._ops.sketch_row_draws_limit` of the sign maps' and ``Theta``'s draws: ~2.7e17 for
        ``n_test <= 34``)."""
        zetas = (min(SPARSITY, self.sketch), min(SPARSITY, self.core))
        return min(sketch_row_draws_limit(zetas, 0), sketch_row_draws_limit((), self.n_test))

    def _row_test(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Global rows ``start:stop`` of the row-side test matrices (on the stream's device):

        - ``"rows"``/``"signs"``: ``(stop - start) x (zeta_s + zeta_c)``, the nonzeros of ``[Psi; Phi]^T``:
          each row goes, with a random sign, to ``zeta_s`` distinct rows of ``Psi`` (``[0, s)``) and to
          ``zeta_c`` distinct rows of ``Phi`` (``[s, s + c)``: the rows of ``[Psi A; Phi A]``);
        - ``"dense"``: ``(stop - start) x (q + 1)`` float64, ``[Theta^T, 1]`` (standard Gaussian as float32
          values, then ones: ``Theta A`` and ``1^T A`` come out of the same pass as ``Psi A``, ``Phi A``).
        """
        s, q, c = self.sketch, self.n_test, self.core
        # the sign maps and Theta from keys of their own: a row's words are laid out per call, so one call
        # for both made n_test move Psi's and Phi's draws (a stream's U, S, V changed with n_test)
        zetas = (min(SPARSITY, s), min(SPARSITY, c))
        rows, signs, _ = sketch_row_draws(_mix(self.seed, -2), start, stop - start, (s, c), zetas, 0)
        gauss = sketch_row_draws(_mix(self.seed, -3), start, stop - start, (), (), q)[2]
        dense = torch.ones(stop - start, q + 1, dtype=torch.float64, device="cpu")
        dense[:, :q] = gauss
        if self.device is not None and self.device.type != "cpu":
            rows, signs, dense = (t.to(self.device) for t in (rows, signs, dense))
        return {"rows": rows, "signs": signs, "dense": dense}

    # ------------------------------------------------------------------------------------------ update

    def _init_state(self, block_dtype: torch.dtype, block_device: torch.device) -> None:
        if self.dtype is None:
            self.dtype = block_dtype
        if self.device is None:
            self.device = block_device
        s, c, q, n = self.sketch, self.core, self.n_test, self.n_features
        f64 = {"dtype": torch.float64, "device": self.device}
        self._acc = {
            # [Psi A; Phi A; Theta A; 1^T A] (s + c + q + 1) x n, one pass of the sparse sign op per block;
            # Z = Phi A Xi, Phi Y = Phi A Omega and Theta Y = Theta A Omega are formed at result time
            "sketch": torch.zeros(s + c + q + 1, n, **f64),
            "G": torch.zeros(s, s, **f64),  # Y^T Y
            "rowsum": torch.zeros(s + c + q, **f64),  # [Psi 1; Phi 1; Theta 1] (kept when centring)
            "ysum": torch.zeros(s, **f64),  # 1^T A Omega, as computed
        }

    def _parts(self, sketch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the stacked sketch: ``W = Psi A``, ``PhiA``, ``E = Theta A``, ``colsum = 1^T A``."""
        s, c, q = self.sketch, self.core, self.n_test
        parts = {"W": sketch[:s], "PhiA": sketch[s : s + c], "E": sketch[s + c : s + c + q]}
        return {**parts, "colsum": sketch[-1]}

    def _as_block(self, block: Any):
        """The block as a LinOp in the stream's dtype, on its device (dtype/shape checked)."""
        if isinstance(block, np.ndarray) or _is_sparse(block):
            block = _from_numpy_or_scipy(block, "block")
        if not isinstance(block, torch.Tensor):
            raise TypeError(
                "block must be a 2-D torch tensor (dense or sparse), ndarray or scipy.sparse matrix, got "
                + type(block).__name__
            )
        if block.dim() != 2:
            raise ValueError(f"block must be 2-D (rows x n_features), got shape {tuple(block.shape)}")
        if block.shape[1] != self.n_features:
            raise ValueError(f"block has {block.shape[1]} columns, expected n_features={self.n_features}")
        dtype = compute_dtype(block.dtype, "block")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"block must have a real float32/float64 (or fp16/bf16) dtype, got {block.dtype}")
        if self._acc is None:
            self._init_state(dtype, block.device)
        elif dtype != self.dtype and not self._dtype_fixed:
            raise TypeError(
                f"block has dtype {dtype}, but the stream is {self.dtype} (StreamingSVD(dtype=...) casts "
                "every block)"
            )
        block = block.to(device=self.device, dtype=self.dtype)
        if block.layout == torch.strided:
            return block
        return as_linop(block, name="block", check_finite=False, allow_batch=False)

    @no_autocast
    def update(self, block: Any) -> StreamingSVD:
        """Add a block of rows (``b x n``): dense tensor, ``torch.sparse``, ndarray or ``scipy.sparse``.

        Rows are appended after those seen so far. The block is read once (two products); NaN/Inf in it
        raise ``ValueError`` before anything is added, so a bad block leaves the state as it was. A block
        that requires grad is read detached (the sketch is not differentiable).

        Raises
        ------
        ValueError
            Wrong number of columns, empty block, NaN/Inf entries, rows past the last global row the
            row-side test matrices reach (see ``row_offset``).
        TypeError
            Unsupported type, non-real-float dtype, or a dtype other than the stream's (``dtype=None``).
        """
        if isinstance(block, torch.Tensor) and block.requires_grad:
            block = block.detach()  # the sketches are data, not part of an autograd graph
        if self._reduced_rows is not None:
            raise ValueError("update() after lowrank.distributed.reduce_sketch: the sketch is already summed")
        if getattr(block, "ndim", None) == 2 and block.shape[0] == 0 and block.shape[1] == self.n_features:
            return self  # an empty block adds nothing
        A = self._as_block(block)
        b = A.shape[0]
        s, c = self.sketch, self.core
        start = self.row_offset + self.n_rows
        if start + b > self._row_limit():
            raise ValueError(
                f"this block's rows reach global row {start + b - 1} (row_offset={self.row_offset} plus "
                f"{self.n_rows + b} rows), beyond the last row the row-side test matrices reach, "
                f"{self._row_limit() - 1}: give the ranks smaller row offsets"
            )
        R = self._row_test(start, start + b)
        strided = isinstance(A, torch.Tensor)
        acc = self._acc
        if strided:  # Y = A Omega (the one GEMM), its float64 Gram matrix and column sums, per row chunk
            Y = self._y_buffer(b)
            step = gemm_rows(A.shape[1], A.element_size(), b)
            ysum = torch.empty(s, dtype=torch.float64, device=self.device)
            G = acc["G"] + range_gram(A, self._omega(), step, out=Y, colsum=ysum)
        else:
            Y = A.matmul(self._omega())
            Yd = Y.double()
            G = torch.addmm(acc["G"], Yd.mT, Yd)  # Y^T Y, float64 (products of float32 entries are exact)
            ysum = Yd.sum(dim=0)
        # one check (one sync) before anything is added: NaN/Inf in A reach A Omega (a Gaussian has no
        # zero entry); Y^T Y squares the entries, so a float64 block can overflow it, and a stream of tiny
        # float64 data (below ~1e-120) can underflow it (to 0 below ~1e-160: S = 0 without a word)
        scale = torch.stack([ysum.sum(), G.abs().amax()])
        tiny = (ysum.abs().amax() > 0) & (torch.diagonal(G).amax() < 2.0**-800)
        if not bool(torch.isfinite(scale).all() & ~tiny):
            if not bool(torch.isfinite(ysum.sum())):
                raise ValueError("block contains NaN or Inf entries (or its products overflow)")
            if bool(tiny):
                raise ValueError(
                    "block entries are too small: the sketch's Gram matrix Y^T Y underflows float64 "
                    "(entries below ~1e-120 in every block so far); rescale the data (the SVD of c A is c "
                    "times that of A)"
                )
            raise ValueError(
                "block entries are too large: the sketch's Gram matrix Y^T Y overflows float64 (entries "
                "beyond ~1e150); rescale the data (the SVD of c A is c times that of A)"
            )
        if strided:  # [Psi A; Phi A; Theta A; 1^T A] in one pass over A: (zeta_s + zeta_c + q + 1) b n adds
            sparse_sign_add_(acc["sketch"], A, R["rows"], R["signs"], R["dense"])
        else:  # a sparse block: the test rows as one dense b x (s + c + q + 1) matrix, one sparse product
            maps = torch.zeros(b, s + c, dtype=self.dtype, device=self.device)
            maps.scatter_(1, R["rows"], R["signs"].to(self.dtype))
            acc["sketch"] += A.rmatmul(torch.cat([maps, R["dense"].to(self.dtype)], dim=1)).double().mT
        acc["G"] = G
        if self.center:
            rowsum = acc["rowsum"]
            rowsum[: s + c].index_add_(0, R["rows"].reshape(-1), R["signs"].reshape(-1))
            rowsum[s + c :] += R["dense"][:, :-1].sum(dim=0)
        acc["ysum"] += ysum
        if self.keep_u:
            self._Y.append(Y)
        self.n_rows += b
        self._factor_cache = None
        return self

    def _y_buffer(self, rows: int) -> torch.Tensor:
        """Where ``Y = A Omega`` of a dense block goes: a new tensor when ``U`` is kept, else a ``rows x s``
        buffer kept across blocks (grown to the largest block seen): no allocation, and no fresh pages to
        fault in, per block."""
        if self.keep_u:
            return torch.empty(rows, self.sketch, dtype=self.dtype, device=self.device)
        buf = self._buffers.get("Y")
        if buf is None or buf.shape[0] < rows or buf.dtype != self.dtype or buf.device != self.device:
            buf = torch.empty(rows, self.sketch, dtype=self.dtype, device=self.device)
            self._buffers["Y"] = buf
        return buf[:rows]

    # ------------------------------------------------------------------------------------------ result

    def _centered(self) -> dict[str, torch.Tensor]:
        """The sketches of ``A`` (or of ``A - 1 mu^T`` when centring), float64: ``W``, ``PhiA``, ``E``,
        ``colsum``, ``G`` (and ``omega`` = ``mu^T Omega`` when centring)."""
        acc = {**self._parts(self._acc["sketch"]), "G": self._acc["G"]}
        if not self.center:
            return acc
        s, c, q = self.sketch, self.core, self.n_test
        m = self.rows_total
        mu = acc["colsum"] / m
        # mu^T Omega taken as the mean of the rows of Y as computed (equal in exact arithmetic): the
        # centred Gram matrix G - m wy wy^T is then exactly that of the stored rows minus their mean,
        # whatever the rounding of the products (it matters when |mu| >> the spread)
        wy = self._acc["ysum"] / m
        rowsum = self._acc["rowsum"]
        centred = self._acc["sketch"][: s + c + q] - torch.outer(rowsum, mu)
        acc.update(W=centred[:s], PhiA=centred[s : s + c], E=centred[s + c :])
        acc["G"] = acc["G"] - m * torch.outer(wy, wy)
        acc["omega"] = wy
        return acc

    def _formed(self) -> dict[str, torch.Tensor]:
        """:meth:`_centered` with the products formed at result time (float64): ``Z = (Phi A) Xi``
        (``c x c``), ``PhiY = (Phi A) Omega`` (``c x s``), ``ThetaY = (Theta A) Omega``, and ``Xi``."""
        acc = self._centered()
        Xi, Omega = self._xi(), self._omega().double()  # Omega exactly as in update() (a float32 draw)
        # 2 c (c + s) n flops, here rather than per row (two products: no n x (c + s) concatenation)
        PhiA = acc["PhiA"]
        acc.update(Xi=Xi, Z=PhiA @ Xi, PhiY=PhiA @ Omega, ThetaY=acc["E"] @ Omega)
        return acc

    def _factors(self) -> dict[str, torch.Tensor]:
        """``MV`` (``M V``), ``PV`` (``P V``), ``S`` for the top ``k``, with ``omega`` (centring), ``E`` and
        ``ThetaY`` for the error estimate (float64). Kept until the state changes (update, load,
        distributed reduce): :meth:`result` then :meth:`error_estimate` reconstruct once."""
        if self._acc is None or self.rows_total == 0:
            raise ValueError("result() needs at least one update() with a non-empty block")
        k = self.k
        if k > self.rows_total:
            raise ValueError(f"k={k} exceeds the number of rows seen ({self.rows_total})")
        key = (self.n_rows, self.rows_total)
        if self._factor_cache is not None and self._factor_cache[0] == key:
            return self._factor_cache[1]
        acc = self._formed()
        P = torch.linalg.qr(acc["W"].mT).Q  # n x s
        Xi, Z = acc["Xi"], acc["Z"]
        M = torch.linalg.pinv(acc["PhiY"]) @ Z @ torch.linalg.pinv(P.mT @ Xi)  # s x s
        H = M.mT @ acc["G"] @ M
        evals, evecs = torch.linalg.eigh((H + H.mT) / 2)
        evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
        S = evals.clamp_min(0).sqrt()
        MV, PV = M @ evecs, P @ evecs
        PV, sign = _sign_fix(PV)
        out = {"MV": MV * sign, "PV": PV, "S": S, "E": acc["E"].clone(), "ThetaY": acc["ThetaY"]}
        if self.center:
            out["omega"] = acc["omega"]
        self._factor_cache = (key, out)
        return out

    @no_autocast
    def result(self) -> SVDResult:
        """The rank-``k`` SVD of all rows seen: ``(U, S, Vh)`` in the compute dtype, on the stream's device.

        ``U`` is ``m x k`` with rows in arrival order (``None`` when ``keep_u=False``), ``S`` is ``(k,)``
        descending, ``Vh`` is ``k x n``. Cost: ``O(n s^2 + c^3)`` plus ``2 m s k`` for ``U``.

        Raises
        ------
        ValueError
            Before any update, or when ``k`` exceeds the number of rows seen.
        """
        f = self._factors()
        MV, PV, S = f["MV"], f["PV"], f["S"]
        if not self.keep_u:
            return SVDResult(None, S.to(self.dtype), PV.mT.to(self.dtype).contiguous())
        tiny = torch.finfo(torch.float64).tiny
        T = MV / S.clamp_min(tiny)  # s x k: U = Y_c T
        shift = (f["omega"] @ T).to(self.dtype) if self.center else None
        Tc = T.to(self.dtype)
        U = torch.empty(self.n_rows, self.k, dtype=self.dtype, device=self.device)
        gram = torch.zeros(self.k, self.k, dtype=torch.float64, device=self.device)
        row = 0
        for Yb in self._Y:
            Ub = U[row : row + Yb.shape[0]]
            torch.matmul(Yb, Tc, out=Ub)
            if shift is not None:
                Ub -= shift
            Ud = Ub.double()
            gram += Ud.mT @ Ud
            row += Yb.shape[0]
        # One CholeskyQR step (Fukaya et al. 2014) restores the orthonormality that U = Y_c T loses to
        # rounding (~ eps * sigma_1 / sigma_k): U S Vh = (U R^-1)(R S Vh), then the SVD of the k x k R S.
        # Skipped after a distributed reduce: U's rows are spread over the ranks (a global Gram would cost
        # another collective); U = Y_c T is then orthonormal to ~ eps * (sigma_1 / sigma_k)^2.
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0 and self._reduced_rows is None:
            R = L.mT
            U2, S, V2h = torch.linalg.svd(R * S, full_matrices=False)  # R diag(S) = U2 diag(S) V2h
            PV, sign = _sign_fix(PV @ V2h.mT)
            step = torch.linalg.solve_triangular(R, U2 * sign, upper=True).to(self.dtype)
            for start in range(0, self.n_rows, _U_CHUNK):
                U[start : start + _U_CHUNK] = U[start : start + _U_CHUNK] @ step
        Vh = PV.mT.to(self.dtype).contiguous()
        return SVDResult(U, S.to(self.dtype), Vh)

    @no_autocast
    def error_estimate(self) -> float:
        """A-posteriori estimate of ``||A - U diag(S) Vh||_F`` (centred ``A`` when ``center=True``).

        ``sqrt(||Theta (A - A_k)||_F^2 / q)`` from the Gaussian test sketch ``Theta A`` (Tropp et al. 2019,
        §6.1); within a factor 2 of the true error with probability above 0.99 for the default ``q = 10``.

        Raises
        ------
        ValueError
            ``n_test=0``, or no rows seen.
        """
        if self.n_test == 0:
            raise ValueError("error_estimate() needs n_test >= 1")
        f = self._factors()
        residual = f["E"] - (f["ThetaY"] @ f["MV"]) @ f["PV"].mT
        return float(residual.square().sum().div(self.n_test).sqrt())

    # --------------------------------------------------------------------------------------- state

    _CONFIG = ("n_features", "k", "sketch", "core", "n_test", "center", "keep_u", "seed", "row_offset")

    def state_dict(self) -> dict[str, Any]:
        """The whole state (configuration, seed, rows seen, sketches, kept ``Y``): ``torch.save``-able."""
        state: dict[str, Any] = {name: getattr(self, name) for name in self._CONFIG}
        state["version"] = _STATE_VERSION
        state["n_rows"] = self.n_rows
        state["reduced_rows"] = self._reduced_rows  # rows of all ranks after a distributed reduce, else None
        state["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        state["dtype_fixed"] = self._dtype_fixed
        state["sketches"] = None if self._acc is None else {key: t.clone() for key, t in self._acc.items()}
        state["Y"] = torch.cat(self._Y) if self._Y else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> StreamingSVD:
        """Resume from :meth:`state_dict` (this instance's configuration must match; device is kept).

        An instance made with ``seed=None`` takes the state's seed (its own was a random draw, not a
        setting); a seed given explicitly must match.

        Raises
        ------
        ValueError
            Configuration mismatch, or a malformed state (then this instance is left as it was).
        """
        _check_state(self, state)
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"state is a StreamingSVD.state_dict() of version {state['version']!r}, this is version "
                f"{_STATE_VERSION} (the test matrices changed: a stream cannot resume across versions)"
            )
        self._factor_cache = None
        if self._seed_drawn and state["seed"] != self.seed:
            self.seed = check_seed(state["seed"], allow_generator=False)
            self._forget_derived()
        reduced = python_number(state.get("reduced_rows"))
        self._reduced_rows = None if reduced is None else int(reduced)
        if state["sketches"] is None:
            self._acc, self._Y, self.n_rows = None, [], 0
            return self
        dtype = getattr(torch, state["dtype"])
        device = self.device if self.device is not None else state["sketches"]["G"].device
        self.dtype, self.device = dtype, device
        self._forget_derived()
        self._init_state(dtype, device)
        for key, value in state["sketches"].items():  # keys and shapes checked by _check_state
            self._acc[key].copy_(value)
        self.row_offset = state["row_offset"]
        self.n_rows = int(state["n_rows"])
        Y = state["Y"]
        self._Y = [Y.to(device=device, dtype=dtype)] if (self.keep_u and Y is not None) else []
        return self

    # ----------------------------------------------------------------- buffers (for distributed sums)

    def _sum_buffers(self) -> list[torch.Tensor]:
        """The summable sketches in a fixed order (what :func:`lowrank.distributed.reduce_sketch` adds)."""
        self._factor_cache = None  # the caller sums into these buffers
        if self._acc is None:
            if self.dtype is None:
                raise ValueError("a rank that saw no rows needs StreamingSVD(dtype=...) to contribute zeros")
            self._init_state(self.dtype, self.device or torch.device("cpu"))
        return [self._acc[key] for key in sorted(self._acc)]


# ------------------------------------------------------------------------------------------ streams


def is_row_stream(A: Any) -> bool:
    """Whether :func:`lowrank.rsvd` treats ``A`` as a stream of row blocks: an iterable without a ``shape``
    (iterator, generator, DataLoader, ...), a list or tuple of blocks or of ``.npy``/``.safetensors``
    paths, or a NumPy memmap of at least :data:`MEMMAP_STREAM_BYTES` bytes."""
    if isinstance(A, np.memmap):
        return A.ndim == 2 and A.nbytes >= MEMMAP_STREAM_BYTES
    if isinstance(A, (torch.Tensor, np.ndarray, str, bytes, Mapping)):  # a dict iterates its keys
        return False
    if isinstance(A, (list, tuple)):
        return len(A) > 0 and all(
            isinstance(x, (str, os.PathLike, torch.Tensor, np.ndarray)) or _is_sparse(x) for x in A
        )
    # iterators, generators and other iterables without a shape (e.g. a DataLoader of row blocks)
    return isinstance(A, Iterable) and not hasattr(A, "shape")


def _is_sparse(x: Any) -> bool:
    return type(x).__module__.startswith("scipy.sparse")


def _rows_per_block(n: int, itemsize: int) -> int:
    return max(1, READ_BLOCK_BYTES // max(1, n * itemsize))


def _array_blocks(array: Any) -> Iterator[Any]:
    if array.ndim != 2:
        raise ValueError(f"a streamed array must be 2-D, got shape {tuple(array.shape)}")
    step = _rows_per_block(array.shape[1], array.dtype.itemsize)
    for start in range(0, array.shape[0], step):
        yield np.asarray(array[start : start + step])


def _shard_shape(path: str) -> tuple[int, ...]:
    """The shape of a shard's array, from its header only (``ValueError`` naming the shard otherwise)."""
    if not path.endswith((".npy", ".safetensors")):
        raise ValueError(f"shard paths must end in .npy or .safetensors, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"A: shard {path!r} does not exist (or is not a file)")
    if path.endswith(".npy"):
        try:
            return tuple(np.load(path, mmap_mode="r").shape)
        except (OSError, ValueError) as error:
            raise ValueError(f"A: shard {path!r} is not a readable .npy array ({error})") from None
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as error:  # pragma: no cover - safetensors is optional
        raise ImportError("reading .safetensors shards needs the safetensors package") from error
    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) != 1:
                raise ValueError(f"shard {path!r} must hold exactly one tensor, got {len(keys)}")
            return tuple(handle.get_slice(keys[0]).get_shape())
    except (OSError, RuntimeError, SafetensorError) as error:  # a truncated or foreign file
        raise ValueError(f"A: shard {path!r} is not a readable .safetensors file ({error})") from None


def _check_shards(items: Any) -> None:
    """Before anything is read: every shard path of a list exists and holds a 2-D array as wide as the
    first shard (or block) of the list, so that a missing or foreign shard fails at once, named, rather
    than after the shards before it were read."""
    if not isinstance(items, (list, tuple)):
        return
    first: tuple[str, int] | None = None
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            shape = _shard_shape(os.fspath(item))
            name = f"shard {os.fspath(item)!r}"
            if len(shape) != 2:
                raise ValueError(f"A: {name} must hold a 2-D array, got shape {shape}")
        elif getattr(item, "ndim", None) == 2:
            name, shape = f"item {i} (a {type(item).__name__})", tuple(item.shape)
        else:
            continue  # sketched as given (update says what is wrong with it)
        if first is None:
            first = (name, shape[1])
        elif shape[1] != first[1]:
            raise ValueError(f"A: {name} has {shape[1]} columns, {first[0]} has {first[1]}")


def _shard_blocks(path: str | os.PathLike) -> Iterator[Any]:
    path = os.fspath(path)
    if path.endswith(".npy"):
        yield from _array_blocks(np.load(path, mmap_mode="r"))
        return
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError as error:  # pragma: no cover - safetensors is optional
            raise ImportError("reading .safetensors shards needs the safetensors package") from error
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) != 1:
                raise ValueError(f"shard {path!r} must hold exactly one tensor, got {len(keys)}")
            piece = handle.get_slice(keys[0])
            shape = piece.get_shape()
            if len(shape) != 2:
                raise ValueError(f"shard {path!r} must hold a 2-D tensor, got shape {tuple(shape)}")
            step = _rows_per_block(shape[1], 8)
            for start in range(0, shape[0], step):
                yield piece[start : start + step]
        return
    raise ValueError(f"shard paths must end in .npy or .safetensors, got {path!r}")


def iter_row_blocks(A: Any) -> Iterator[Any]:
    """The row blocks of a stream accepted by :func:`is_row_stream` (memmaps and shards read lazily)."""
    if isinstance(A, np.memmap):
        yield from _array_blocks(A)
        return
    items: Iterable[Any] = A
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            yield from _shard_blocks(item)
        elif isinstance(item, np.memmap):
            yield from _array_blocks(item)
        else:
            yield item


@no_autocast
def stream_rsvd(
    A: Any,
    k: int | None,
    *,
    tol: float | None = None,
    oversample: int | None = None,
    n_iter: int | None = None,
    method: str = "auto",
    seed: int | torch.Generator | None = None,
    center: bool = False,
) -> SVDResult:
    """:func:`lowrank.rsvd` of a row-block stream: one pass through :class:`StreamingSVD`.

    ``oversample`` sets the sketch size ``k + oversample`` (default: StreamingSVD's ``min(4k + 1, n)``);
    ``tol``, ``n_iter > 0`` and ``method`` other than ``"auto"`` need several passes and raise ``ValueError``.
    A list of shard paths is checked before anything is read (file headers only): a missing, unreadable,
    non-2-D shard or one of another width than the first raises ``ValueError`` naming it.
    """
    if tol is not None:
        raise ValueError("tol (fixed precision) needs several passes; a row-block stream allows one")
    if n_iter not in (None, 0):
        raise ValueError(f"n_iter={n_iter} needs several passes; a row-block stream allows one (n_iter=0)")
    if method != "auto":
        raise ValueError(f"method={method!r} needs several passes; a row-block stream allows one")
    if k is None:
        raise ValueError("k is required")
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=seed))
    _check_shards(A)
    blocks = iter_row_blocks(A)
    sk = None
    for i, block in enumerate(blocks):
        if sk is None:
            if not (isinstance(block, (torch.Tensor, np.ndarray)) or _is_sparse(block)):
                # a list of lists, numbers: no shape to read (was an AttributeError here)
                raise TypeError(
                    "A: row blocks must be torch tensors, ndarrays or scipy.sparse matrices, got "
                    + type(block).__name__
                )
            n = block.shape[1] if block.ndim == 2 else -1
            if n < 1:
                raise ValueError(f"row blocks must be 2-D, got shape {tuple(block.shape)}")
            sketch = None if oversample is None else min(n, k + _check_int(oversample, "oversample", 0))
            sk = StreamingSVD(n, k, sketch=sketch, seed=seed, center=center)
        try:
            sk.update(block)
        except (TypeError, ValueError) as error:  # say which block (a stream has no other names)
            hint = ""
            if sk.dtype is not None and "but the stream is" in str(error):
                hint = "; rsvd computes in the first block's dtype: give all blocks one dtype"
            kind = TypeError if isinstance(error, TypeError) else ValueError
            raise kind(f"A: row block {i}: {error}{hint}") from None
    if sk is None or sk.n_rows == 0:  # no blocks, or only empty ones
        raise ValueError("the row-block stream is empty (A gave no rows)")
    return sk.result()
