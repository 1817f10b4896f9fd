"""One input adapter for every factorization in lowrank.

``as_linop(A)`` turns a dense torch tensor (optionally batched, ``(..., m, n)``), a ``torch.sparse``
COO/CSR/CSC matrix, a NumPy array, a ``scipy.sparse`` matrix or a user linear operator (an object with
``shape``, ``dtype``, ``matmul(X)`` and ``rmatmul(X)``; ``scipy.sparse.linalg.LinearOperator`` works
through its ``matmat``/``rmatmat``) into a :class:`LinOp`: an object with ``shape``, ``batch_shape``,
``dtype`` (the *compute* dtype: fp16/bf16 are computed in fp32), ``device``, ``matmul(X) = A @ X`` and
``rmatmul(Y) = A^T @ Y`` (``A^H`` for complex inputs), plus the few reductions the algorithms need
(column means, squared Frobenius norm, densification).

Everything that factorizes goes through this module, so that a new input kind works everywhere at once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "LinOp",
    "TransposedOp",
    "as_linop",
    "check_seed",
    "check_tensor",
    "compute_dtype",
    "no_autocast",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# ------------------------------------------------------------------------------------ shared entry guards

_F = TypeVar("_F", bound=Callable[..., Any])

#: device types whose autocast state is switched off at the public entries of the math routines
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _any_autocast() -> bool:
    """One cheap call when no autocast region is active (the common case); per-device checks otherwise."""
    probe = getattr(torch._C, "_is_any_autocast_enabled", None)
    if probe is None:  # pragma: no cover - older torch
        return any(torch.is_autocast_enabled(dev) for dev in _AUTOCAST_DEVICES)
    return bool(probe())


def no_autocast(fn: _F) -> _F:
    """Decorator for every public numerical routine: run it with autocast switched off.

    Inside a ``torch.autocast`` region, matmuls would silently run in fp16/bf16 and ops such as LU refuse
    bf16, so factorizations lose their accuracy (or fail) and return low-precision tensors. The routines
    compute in the dtype their input asks for (fp16/bf16 inputs in fp32, see :func:`compute_dtype`), so
    autocast is disabled for every device type on which it is active: the device of the input is not
    known before the input is parsed (NumPy, scipy.sparse, operators), and the routines only compute on
    it, so this equals disabling it for the input's device. No cost outside autocast regions (the state
    is read, no context entered).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _any_autocast():
            return fn(*args, **kwargs)
        active = [dev for dev in _AUTOCAST_DEVICES if torch.is_autocast_enabled(dev)]
        if not active:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for dev in active:
                stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: seeds are 64-bit signed integers in torch's generators: 0 <= seed < 2**63
_SEED_LIMIT = 1 << 63


def python_number(value: Any) -> Any:
    """A NumPy bool, integer or floating scalar as the Python ``bool`` / ``int`` / ``float`` of the same
    value (NumPy scalars are numbers to users: ``k=np.int64(8)``, ``tol=np.float32(1e-3)``); anything else
    unchanged, for the argument checks to judge (which still refuse a bool where a number is meant)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def check_seed(
    seed: Any, *, allow_generator: bool = True, name: str = "seed"
) -> int | torch.Generator | None:
    """Validate a ``seed`` argument once, for every routine that takes one.

    Accepts ``None``, a Python or NumPy integer in ``[0, 2**63)`` and (when ``allow_generator``) a
    ``torch.Generator``; returns it (NumPy integers as ``int``).

    Raises
    ------
    TypeError
        Not an integer (bool and float included) or generator, naming ``name``.
    ValueError
        Negative or ``>= 2**63`` (torch's generators take 64-bit signed seeds), naming ``name``.
    """
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        if allow_generator:
            return seed
        raise TypeError(f"{name} must be None or an int, got a torch.Generator")
    if isinstance(seed, np.integer) and not isinstance(seed, np.bool_):
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        kinds = "None, an int or a torch.Generator" if allow_generator else "None or an int"
        raise TypeError(f"{name} must be {kinds}, got {type(seed).__name__}")
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def check_tensor(
    value: Any,
    name: str,
    *,
    sparse: bool = False,
    complex_ok: bool = True,
) -> torch.Tensor:
    """Up-front checks of a tensor argument that the routine takes as a tensor: type, device, layout, dtype.

    Raises ``TypeError`` naming ``name`` for a non-tensor, a ``torch.sparse`` tensor where ``sparse`` is
    False, a complex one where ``complex_ok`` is False, or a non-floating dtype; ``ValueError`` for a
    tensor on the ``meta`` device (it has no entries to factor).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_not_meta(value, name)
    if value.layout != torch.strided and not sparse:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.is_complex() and not complex_ok:
        raise TypeError(f"{name} must be real, got complex dtype {value.dtype}")
    if not (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    return value


def check_not_meta(value: torch.Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` for a tensor on the ``meta`` device (shapes only, no data)."""
    if value.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device (it has no data to compute with); materialise it first"
        )


def compute_dtype(dtype: torch.dtype, name: str = "A") -> torch.dtype:
    """The dtype the algorithms run in for an input of ``dtype``: fp16/bf16 and the 8-bit float formats ->
    fp32, complex32 -> complex64 (torch has no linear algebra in those), else itself.

    Raises ``TypeError`` (naming ``name``) for non-floating dtypes.
    """
    if dtype in _LOW_PRECISION or (dtype.is_floating_point and dtype.itemsize == 1):
        return torch.float32
    if dtype == torch.complex32:
        return torch.complex64
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {dtype}")
    return dtype


def _torch_dtype(dtype: Any, name: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}.dtype={dtype!r} is not a dtype that torch understands") from error


def _adjoint(X: torch.Tensor) -> torch.Tensor:
    return X.mH if X.is_complex() else X.mT


class LinOp:
    """A matrix seen only through products: ``matmul(X) = A @ X``, ``rmatmul(Y) = A^H @ Y``.

    Attributes
    ----------
    shape : tuple[int, int]
        ``(m, n)`` of the (each, when batched) matrix.
    batch_shape : torch.Size
        Leading batch dimensions (empty unless a batched dense tensor was given).
    dtype : torch.dtype
        Compute dtype (fp32 for fp16/bf16 inputs).
    device : torch.device
    """

    shape: tuple[int, int]
    batch_shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    #: True when a NaN/Inf check of the entries has been done (or was impossible and is left to results)
    is_dense: bool = False

    def matmul(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def matmul_into(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``A @ X`` written into ``out`` (shape ``(*batch, m, b)``) where the operator can, else a fresh
        tensor: use the returned one. Loops that make one long product per iteration pass the same buffer
        every time; a fresh long buffer per product cost more in page faults than a sparse product."""
        return self.matmul(X)

    def rmatmul_into(self, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``A^H @ Y`` into ``out`` where the operator can (see :meth:`matmul_into`)."""
        return self.rmatmul(Y)

    def column_mean(self) -> torch.Tensor:
        """Column means, shape ``(*batch, n, 1)``: ``A^T 1 / m`` (one product for implicit matrices)."""
        m = self.shape[0]
        ones = torch.ones(*self.batch_shape, m, 1, dtype=self.dtype, device=self.device)
        return self.rmatmul(ones) / m

    def fro_norm_sq(self) -> torch.Tensor:
        """Squared Frobenius norm, shape ``batch_shape``, in float64 when the dtype is real float32/64.

        Implicit operators are applied to identity blocks (``n`` columns in all): exact but costs one full
        sweep; give the operator a ``fro_norm_sq()`` method (or attribute) to skip it.
        """
        m, n = self.shape
        total = torch.zeros(self.batch_shape, dtype=torch.float64, device=self.device)
        block = 256
        for start in range(0, n, block):
            stop = min(n, start + block)
            eye = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols = self.matmul(eye)
            total = total + cols.abs().double().square().sum(dim=(-2, -1))
        return total

    def to_dense(self) -> torch.Tensor:
        """The matrix densified, ``(*batch, m, n)``, compute dtype (``n`` products if implicit)."""
        n = self.shape[1]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return self.matmul(eye)


class DenseOp(LinOp):
    """A dense (possibly batched) tensor."""

    is_dense = True

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.shape = (A.shape[-2], A.shape[-1])
        self.batch_shape = A.shape[:-2]
        self.dtype = A.dtype
        self.device = A.device

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        if self.column_major_products:
            return (X.mT @ self.A.mT).mT
        return self.A @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        if self.column_major_products:
            return (Y.mT @ self.A).mT
        return _adjoint(self.A) @ Y

    def rmatmul_into(self, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``A^H Y`` written into ``out`` for a 2-D real matrix on CPU, in the layout of :meth:`rmatmul`'s
        products: a column-major ``out`` (``out.mT`` contiguous, a slice of columns of a column-major
        buffer) with transposed products, else one with unit column stride (a slice of columns of a
        row-major buffer); a fresh tensor otherwise."""
        if Y.dim() == 2 and Y.dtype == self.dtype and self.A.dim() == 2 and not self.dtype.is_complex:
            if self.column_major_products and out.mT.is_contiguous():
                torch.mm(Y.mT, self.A, out=out.mT)
                return out
            if not self.column_major_products and self.device.type == "cpu" and out.stride(-1) == 1:
                torch.mm(self.A.mT, Y, out=out)
                return out
        return self.rmatmul(Y)

    @property
    def column_major_products(self) -> bool:
        """Whether :meth:`matmul` / :meth:`rmatmul` compute the transposed product and return column-major
        blocks (else the direct product, row-major blocks); iterations keep their bases in the same layout
        (no transposing copies)."""
        # On CPU, the transposed product (X^T A^T)^T, whose output is a row-major (b, m) block seen as a
        # column-major (m, b) one, measured 1.0-1.5x faster than A @ X for thin X in fp32 with one thread
        # (1000-20000 rows, b = 16-150; 1500^2, b = 40: 3.3 / 3.0 against 3.7 / 4.0 ms for A X / A^T Y) and
        # 1.3-4x in fp64 with one and two threads. fp32 with two threads is the exception: MKL splits the
        # direct product better (1500^2, b = 40: 1.6 / 1.75 ms direct against 2.0 / 1.9 ms transposed,
        # quiet; 8000 x 1000: 6.9-7.4 against 11.7 ms, loaded, best of 40), so those products stay direct
        # (row-major blocks); more threads were not measured. Column-major blocks are also what LAPACK
        # wants (QR copies either way). Real dtypes only (complex keeps A^H).
        if self.device.type != "cpu" or self.dtype.is_complex:
            return False
        return self.dtype != torch.float32 or torch.get_num_threads() == 1

    def column_mean(self) -> torch.Tensor:
        """Column means (conjugated, as ``A^H 1 / m``), ``(*batch, n, 1)``, accumulated in fp64: an fp32
        sum of m entries is off by up to ``m eps`` relative, and every centred product inherits that error
        times the mean (what decides the accuracy of PCA on data whose variance is small next to it)."""
        A = self.A
        wide = torch.complex128 if A.is_complex() else torch.float64
        mean = (A.sum(dim=-2, dtype=wide) / self.shape[0]).to(self.dtype)
        return (mean.conj() if A.is_complex() else mean)[..., :, None]

    def fro_norm_sq(self) -> torch.Tensor:
        A = self.A
        if A.dtype in (torch.float32, torch.float64):
            return torch.linalg.vector_norm(A, dim=(-2, -1), dtype=torch.float64).square()
        return torch.linalg.vector_norm(A, dim=(-2, -1)).square()

    def to_dense(self) -> torch.Tensor:
        return self.A


class SparseOp(LinOp):
    """A 2-D ``torch.sparse`` matrix; the transpose is stored once in CSR for fast ``rmatmul``."""

    def __init__(self, A: torch.Tensor):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = A.to_sparse_csr() if A.layout != torch.sparse_csr else A
            self.At = _csr_adjoint(csr)
        self.A = csr
        self._input = A  # the stored values are coalesced only when the Frobenius norm is asked for
        self._coo: torch.Tensor | None = None
        self.shape = (A.shape[0], A.shape[1])
        self.batch_shape = torch.Size()
        self.dtype = A.dtype
        self.device = A.device

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.A @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.At @ Y

    def matmul_into(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(self.A, X, out=out)

    def rmatmul_into(self, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(self.At, Y, out=out)

    def fro_norm_sq(self) -> torch.Tensor:
        values = self.coalesced().values()
        return torch.linalg.vector_norm(values.to(torch.float64)).square()

    def coalesced(self) -> torch.Tensor:
        """The input as a coalesced COO tensor (duplicates summed), built once per operator (PCA asks
        for it twice: the centred sum of squares and the Frobenius norm)."""
        if self._coo is None:
            self._coo = self._input.to_sparse_coo().coalesce()
        return self._coo

    def to_dense(self) -> torch.Tensor:
        return self.A.to_dense()


def _csr_adjoint(csr: torch.Tensor) -> torch.Tensor:
    """``A^T`` (``A^H`` for complex) of a CSR matrix, as CSR.

    On CPU with SciPy installed: SciPy's counting-sort CSR -> CSC conversion (linear time), measured
    0.6 ms against 10 ms for torch's sort-based ``to_sparse_csc`` (20000x2000, 200k non-zeros, 2-core
    CPU); elsewhere the CSC of A read as CSR of A^T (1.7x faster than transposing the COO).
    """
    m, n = csr.shape
    csc = None
    if csr.device.type == "cpu":
        try:
            import scipy.sparse as sp
        except ImportError:  # pragma: no cover - scipy is optional
            sp = None
        if sp is not None:
            values = csr.values().detach().resolve_conj().numpy()
            converted = sp.csr_array(
                (values, csr.col_indices().numpy(), csr.crow_indices().numpy()), shape=(m, n)
            ).tocsc()
            pointers = torch.from_numpy(converted.indptr.astype(np.int64))
            indices = torch.from_numpy(converted.indices.astype(np.int64))
            values = torch.from_numpy(converted.data)
            csc = (pointers, indices, values)
    if csc is None:
        converted = csr.to_sparse_csc()
        csc = (converted.ccol_indices(), converted.row_indices(), converted.values())
    pointers, indices, values = csc
    values = values.conj() if values.is_complex() else values
    return torch.sparse_csr_tensor(
        pointers, indices, values, size=(n, m), check_invariants=False, device=pointers.device
    )


class CallbackOp(LinOp):
    """A user linear operator: ``matmul``/``rmatmul`` (or ``matmat``/``rmatmat``), NumPy or torch results."""

    def __init__(self, A: Any, name: str):
        shape = tuple(int(s) for s in A.shape)
        if len(shape) != 2:
            raise ValueError(f"{name}.shape must be (m, n), got {A.shape!r}")
        if min(shape) < 0:
            raise ValueError(f"{name}.shape must hold non-negative sizes, got {A.shape!r}")
        # scipy's LinearOperator(shape, matvec=...) made without rmatvec/rmatmat has no adjoint; every
        # factorization here needs A^T products, so say so now rather than fail inside scipy.
        if all(getattr(A, f"_CustomLinearOperator__{a}_impl", 0) is None for a in ("rmatvec", "rmatmat")):
            raise ValueError(
                f"{name} is a scipy LinearOperator without an adjoint (give rmatvec or rmatmat): the "
                "randomized methods need products with A^T as well as A"
            )
        self.obj = A
        self.name = name
        self.shape = (shape[0], shape[1])
        self.batch_shape = torch.Size()
        self.dtype = compute_dtype(_torch_dtype(A.dtype, name), name)
        device = getattr(A, "device", None)
        self.device = torch.device(device) if isinstance(device, (str, torch.device)) else torch.device("cpu")
        if hasattr(A, "matmul") and hasattr(A, "rmatmul"):
            self._fwd, self._adj = A.matmul, A.rmatmul
        else:
            self._fwd, self._adj = A.matmat, A.rmatmat
        self._numpy_in = not (hasattr(A, "matmul") and hasattr(A, "rmatmul"))

    def _call(self, fn, X: torch.Tensor, rows: int, what: str) -> torch.Tensor:
        arg = X.cpu().numpy() if self._numpy_in else X
        try:
            out = fn(arg)
        except NotImplementedError as err:  # e.g. scipy's "rmatvec is not defined"
            raise ValueError(f"{self.name}.{what} is not implemented ({err}); it is needed here") from err
        if not isinstance(out, torch.Tensor):
            # contiguous: NumPy views with negative strides (np.flipud(...)) have no torch view
            out = torch.as_tensor(np.ascontiguousarray(out))
        out = out.to(device=self.device, dtype=self.dtype)
        if out.shape != (rows, X.shape[-1]):
            raise ValueError(
                f"{self.name}.{what} returned shape {tuple(out.shape)}, expected {(rows, X.shape[-1])}"
            )
        return out

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self._call(self._fwd, X, self.shape[0], "matmul")

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self._call(self._adj, Y, self.shape[1], "rmatmul")

    def fro_norm_sq(self) -> torch.Tensor:
        given = getattr(self.obj, "fro_norm_sq", None)
        if given is not None:
            value = given() if callable(given) else given
            return torch.as_tensor(value, dtype=torch.float64, device=self.device)
        return super().fro_norm_sq()


class CenteredOp(LinOp):
    """``A - 1 mu^T`` (``mu`` the column means) applied implicitly: sparse inputs stay sparse."""

    def __init__(self, base: LinOp):
        self.base = base
        self.shape = base.shape
        self.batch_shape = base.batch_shape
        self.dtype = base.dtype
        self.device = base.device
        self.is_dense = base.is_dense
        self.mean = base.column_mean()  # (*batch, n, 1)

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        # A X - 1 (mu^T X)
        return self.base.matmul(X) - _adjoint(self.mean) @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        # A^T Y - mu (1^T Y)
        return self.base.rmatmul(Y) - self.mean @ Y.sum(dim=-2, keepdim=True)

    def matmul_into(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        Y = self.base.matmul_into(X, out)
        shift = _adjoint(self.mean) @ X
        return Y.sub_(shift) if Y is out else Y - shift

    def rmatmul_into(self, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        Z = self.base.rmatmul_into(Y, out)
        shift = self.mean @ Y.sum(dim=-2, keepdim=True)
        return Z.sub_(shift) if Z is out else Z - shift

    def column_mean(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def fro_norm_sq(self) -> torch.Tensor:
        m = self.shape[0]
        mean_sq = self.mean.abs().to(torch.float64).square().sum(dim=(-2, -1))
        return (self.base.fro_norm_sq().to(torch.float64) - m * mean_sq).clamp_min(0)

    def to_dense(self) -> torch.Tensor:
        return self.base.to_dense().to(self.dtype) - _adjoint(self.mean)


class TransposedOp(LinOp):
    """``A^H`` of a 2-D operator: ``matmul`` and ``rmatmul`` swapped, shape reversed.

    Wraps whatever ``base`` is, a :class:`CenteredOp` included: the transpose of ``A - 1 mu^T`` is
    ``A^H - conj(mu) 1^T``, so centring ``A``'s columns is centring the rows of the transpose and needs
    nothing more than the swap. ``column_mean`` here is then the row means of ``base`` (one product).
    """

    def __init__(self, base: LinOp):
        if len(base.batch_shape):
            raise ValueError("TransposedOp needs a 2-D operator")
        self.base = base
        self.shape = (base.shape[1], base.shape[0])
        self.batch_shape = base.batch_shape
        self.dtype = base.dtype
        self.device = base.device
        self.is_dense = base.is_dense

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.base.rmatmul(X)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.base.matmul(Y)

    def matmul_into(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.base.rmatmul_into(X, out)

    def rmatmul_into(self, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.base.matmul_into(Y, out)

    def fro_norm_sq(self) -> torch.Tensor:
        return self.base.fro_norm_sq()

    def to_dense(self) -> torch.Tensor:
        return _adjoint(self.base.to_dense())


def rescale_extreme(op: LinOp) -> tuple[LinOp, int]:
    """``(op / 2^e, e)`` for a stored (dense or sparse) float64/complex128 matrix whose largest entry
    lies outside ``[2^-400, 2^400]``; ``(op, 0)`` otherwise.

    Frobenius norms and variances are sums of squares, formed in float64: for entries beyond ``~1e154``
    they overflow to inf and below ``~1e-154`` they underflow towards 0 (a float64 matrix of norm 1e-300
    had a squared norm of exactly 0), so that tolerances and ratios computed from them are garbage.
    Dividing by a power of two near the largest entry is exact (up to entries that were already negligible
    next to it) and brings every square into range; callers multiply their singular values back by ``2^e``.
    Float32 (and narrower) data never need it (their squares are taken in float64). Implicit operators are
    returned as given. Costs one pass over the stored values, plus a scaled copy when it applies.
    """
    if op.dtype not in (torch.float64, torch.complex128):
        return op, 0
    if isinstance(op, DenseOp):
        values = op.A
    elif isinstance(op, SparseOp):
        values = op.A.values()
    else:
        return op, 0
    if values.numel() == 0:
        return op, 0
    big = float(values.abs().amax())
    if big == 0.0 or not math.isfinite(big) or 2.0**-400 <= big <= 2.0**400:
        return op, 0
    exponent = math.frexp(big)[1]
    if isinstance(op, DenseOp):
        return DenseOp(times_power_of_two(op.A, -exponent)), exponent
    return SparseOp(times_power_of_two(op._input, -exponent)), exponent


def times_power_of_two(X: torch.Tensor, exponent: int) -> torch.Tensor:
    """``X * 2^exponent`` (exact unless entries leave the normal range), in two factors so that neither
    overflows when ``|exponent|`` exceeds 1023."""
    half = exponent // 2
    return X * math.ldexp(1.0, half) * math.ldexp(1.0, exponent - half)


def _coo_without_dense_dims(A: torch.Tensor) -> torch.Tensor:
    """A 2-D hybrid COO tensor (``to_sparse(sparse_dim=1)``: whole rows stored as dense values) as a plain
    COO matrix of the same entries (torch converts only ``sparse_dim == 2`` tensors to CSR)."""
    A = A.coalesce()
    rows, n = A.indices()[0], A.shape[1]
    cols = torch.arange(n, device=A.device).repeat(rows.numel())
    indices = torch.stack([rows.repeat_interleave(n), cols])
    values = A.values().reshape(-1)
    return torch.sparse_coo_tensor(indices, values, tuple(A.shape), is_coalesced=True, device=A.device)


def _check_finite(values: torch.Tensor, name: str) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")


def as_linop(A: Any, *, name: str = "A", check_finite: bool = True, allow_batch: bool = True) -> LinOp:
    """Adapt any supported matrix to a :class:`LinOp` in its compute dtype.

    Parameters
    ----------
    A : Tensor, ndarray, scipy.sparse matrix, or linear operator
        Dense tensors may be batched ``(..., m, n)``; everything else is 2-D.
    name : str
        The argument name used in error messages.
    check_finite : bool
        Check the entries for NaN/Inf (one read of the data; sparse: of the stored values). Dense
        inputs are cheaper to check on the results of the first product, so the SVD code passes False
        and checks there.
    allow_batch : bool
        Accept ``(..., m, n)`` dense inputs.

    Raises
    ------
    TypeError
        Unsupported type or non-floating dtype.
    ValueError
        Wrong number of dimensions, empty dimensions, NaN/Inf entries.
    """
    if isinstance(A, LinOp):  # already adapted (a routine handing its operator on to another)
        return A
    if isinstance(A, np.ndarray) or _is_scipy_sparse(A):
        A = _from_numpy_or_scipy(A, name)
    if isinstance(A, torch.Tensor):
        check_not_meta(A, name)
        if A.layout == torch.strided:
            if A.dim() < 2 or (A.dim() > 2 and not allow_batch):
                raise ValueError(
                    f"{name} must be a {'(..., m, n)' if allow_batch else '(m, n)'} matrix, "
                    f"got shape {tuple(A.shape)}"
                )
            _check_nonempty(A.shape[-2:], name)
            A = A.to(compute_dtype(A.dtype, name))  # before the checks: no isfinite for 8-bit floats
            if check_finite:
                _check_finite(A, name)
            return DenseOp(A)
        if A.layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc):
            if A.dim() != 2:
                raise ValueError(f"{name}: sparse inputs must be 2-D, got shape {tuple(A.shape)}")
            _check_nonempty(A.shape, name)
            if A.layout == torch.sparse_coo and A.dense_dim() > 0:
                A = _coo_without_dense_dims(A)
            dtype = compute_dtype(A.dtype, name)
            A = A.to(dtype)
            if check_finite:
                _check_finite(A.values() if A.layout != torch.sparse_coo else A.coalesce().values(), name)
            return SparseOp(A)
        raise TypeError(f"{name}: unsupported tensor layout {A.layout}")
    if hasattr(A, "shape") and hasattr(A, "dtype"):
        if (hasattr(A, "matmul") and hasattr(A, "rmatmul")) or (
            hasattr(A, "matmat") and hasattr(A, "rmatmat")
        ):
            op = CallbackOp(A, name)
            _check_nonempty(op.shape, name)
            return op
    raise TypeError(
        f"{name} must be a torch tensor (dense or sparse), a NumPy array, a scipy.sparse matrix, or a linear "
        f"operator with shape, dtype, matmul(X) and rmatmul(X); got {type(A).__name__}"
    )


def _is_scipy_sparse(A: Any) -> bool:
    if not type(A).__module__.startswith("scipy.sparse"):
        return False
    import scipy.sparse as sp

    return sp.issparse(A)


def _check_nonempty(shape, name: str) -> None:
    if any(int(s) == 0 for s in shape):
        raise ValueError(f"{name} has an empty dimension (shape {tuple(shape)})")


def _view_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without torch's "not writable" UserWarning for read-only arrays (``np.load(...,
    mmap_mode="r")``, a streamed memmap): lowrank reads its inputs and never writes them, as for tensors."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _from_numpy_or_scipy(A: Any, name: str) -> torch.Tensor:
    if isinstance(A, np.ndarray):
        if not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.complexfloating)):
            raise TypeError(f"{name} must have a floating dtype, got NumPy dtype {A.dtype}")
        if not A.dtype.isnative:  # torch views native byte order only (big-endian '>f8' files): one copy
            A = A.astype(A.dtype.newbyteorder("="))
        return _view_numpy(np.ascontiguousarray(A))
    import scipy.sparse as sp

    if not sp.issparse(A):
        raise TypeError(f"{name}: unsupported scipy object {type(A).__name__}")
    if not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.complexfloating)):
        raise TypeError(f"{name} must have a floating dtype, got {A.dtype}")
    if A.ndim != 2:
        raise ValueError(f"{name}: sparse inputs must be 2-D")
    csr = sp.csr_array(A)
    csr.sort_indices()
    return torch.sparse_csr_tensor(
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data),
        size=csr.shape,
        check_invariants=False,
        device="cpu",  # where the arrays are, not torch's default device (`with torch.device("cuda")`)
    )
