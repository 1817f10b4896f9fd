"""Python faces of the compiled ``torch.ops.lowrank`` operators.

Loads ``lowrank._C`` (which registers the op schemas, their CPU/CUDA kernels and their Meta kernels for
fake tensors and ``torch.compile``) and registers autograd for each op.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_REBUILD_HINT = (
    "Rebuild it against the installed torch from the repository root with\n"
    "    pip install --no-build-isolation -e .\n"
    "(build isolation would compile against a different torch; set LOWRANK_CUDA=0 to skip the CUDA sources)."
)

try:
    from lowrank import _C  # noqa: F401  (importing registers torch.ops.lowrank.*)
except ImportError as error:  # missing, or an ABI mismatch shows up as an undefined symbol
    raise ImportError(
        f"lowrank's compiled extension lowrank._C could not be loaded ({error}).\n{_REBUILD_HINT}"
    ) from error

_built_for = getattr(_C, "torch_version", None)
_running = torch.__version__.split("+")[0]
if _built_for is not None and _built_for != _running:
    raise ImportError(
        f"lowrank._C was built against torch {_built_for} but torch {_running} is installed.\n{_REBUILD_HINT}"
    )

#: True when the extension was compiled with its CUDA kernels.
WITH_CUDA: bool = bool(getattr(_C, "with_cuda", 0))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Fused LoRA linear layer: ``y = x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T (+ bias)``.

    The low-rank adaptation of Hu et al. (2021) applied in one operator, with ``nn.Linear`` layouts.

    Parameters
    ----------
    x : Tensor, shape (..., in_features)
        Input; any number of leading dimensions (including none, and empty batches).
    weight : Tensor, shape (out_features, in_features)
        The (usually frozen) base weight.
    lora_A : Tensor, shape (r, in_features)
        The down-projection ("shrink"), r >= 1.
    lora_B : Tensor, shape (out_features, r)
        The up-projection ("expand").
    scale : float, default 1.0
        Multiplier of the LoRA term (``alpha / r`` in LoRA, ``alpha / sqrt(r)`` in rsLoRA). A 1-element
        tensor is read once as a float (a constant: no gradient; one that requires grad raises TypeError).
    bias : Tensor, shape (out_features,), optional
        Base bias.

    Returns
    -------
    Tensor, shape (..., out_features)
        Same dtype and device as ``x``.

    Notes
    -----
    All tensors share one dtype (float32, float16, bfloat16; float64 on CPU) and one device. Products
    accumulate in float32 for the half types. On CPU, up to 4 rows stream ``weight`` once in one threaded
    pass that adds the LoRA term (AVX2); more rows write ``bias + scale * (x @ lora_A.T) @ lora_B.T`` into
    the output in one pass over four-row tiles (AVX2; BLAS for float64), then the base GEMM accumulates
    into it (one BLAS call, as ``F.linear``). On CUDA, small token counts (M <= 16) use a kernel that
    streams ``weight`` once with 16-byte loads and adds the LoRA term in the same pass; larger M use cuBLAS.
    ``scale == 0`` computes exactly the base layer on every device (the factors are not read, so a
    non-finite adapter cannot leak in through ``0 * inf``).

    Inside ``torch.autocast`` the op follows ``F.linear``: ``x``, ``weight``, the factors and ``bias`` are
    cast to the autocast dtype of their device (float64 tensors are left alone), so bf16 activations with
    float32 parameters work; the result is in the autocast dtype.

    Autograd gives gradients for ``x``, ``lora_A``, ``lora_B`` and, when they require grad, ``weight``
    and ``bias``. The backward saves only the inputs and recomputes the r-wide ``u = x @ lora_A.T``
    (2 M r in FLOPs, r/out of the forward), so no activation beyond ``x`` is kept.

    Raises
    ------
    ValueError
        Shapes that do not match (named in the message), ``r = 0``, or tensors on different devices.
    TypeError
        A non-tensor argument, dtypes that differ or are not floating point, a ``scale`` that is not a real
        number or 1-element real tensor, or a ``scale`` tensor that requires grad.

    References
    ----------
    E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.

    Examples
    --------
    >>> x = torch.randn(4, 64); W = torch.randn(32, 64)
    >>> A = torch.randn(8, 64); B = torch.randn(32, 8)
    >>> y = lowrank.lora_linear(x, W, A, B, scale=2.0)
    >>> torch.allclose(y, x @ W.T + 2.0 * (x @ A.T) @ B.T, atol=1e-4)
    True
    """
    Tensor = torch.Tensor
    if not (
        isinstance(x, Tensor)
        and isinstance(weight, Tensor)
        and isinstance(lora_A, Tensor)
        and isinstance(lora_B, Tensor)
        and (bias is None or isinstance(bias, Tensor))
    ):
        _raise_not_tensor("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    scale = _check_scale("lora_linear", scale)
    if _no_grad_needed(x, weight, lora_A, lora_B, bias):
        # Inference: straight to the device kernel, past the (Python) autograd layer of the op. Measured
        # on 4096x4096 fp32 at one token, that layer cost ~1.5% of the call (benchmarks/bench_lora.py);
        # the unboxed entry (lora_linear_inference) also skips torch.ops' boxing (~3 us a call).
        out = lora_linear_inference(x, weight, lora_A, lora_B, scale, bias)
        if out is not None:
            return out
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.lowrank.lora_linear.default(x, weight, lora_A, lora_B, scale, bias)
    return torch.ops.lowrank.lora_linear.default(x, weight, lora_A, lora_B, scale, bias)


#: ``lora_linear_inference(x, weight, lora_A, lora_B, scale, bias)``: ``lowrank::lora_linear`` without its
#: autograd layer through the dispatcher's unboxed path (C++), or None where the call needs the general path
#: (x not a plain tensor, mixed dtypes/devices, autograd needed, autocast or a torch-function mode on).
#: LoRALinear's cached inference path calls it; ``scale`` must be a Python float.
lora_linear_inference = _C.lora_linear_inference  # csrc/lora_linear_python.cpp


def _raise_not_tensor(op: str, **arguments: object) -> None:
    """TypeError naming the first argument that is not a tensor (``bias`` may be None)."""
    for name, value in arguments.items():
        if not isinstance(value, torch.Tensor) and not (value is None and name == "bias"):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_scale(op: str, scale: object) -> float:
    """``scale`` as a float; TypeError naming it unless a real number or a 1-element real tensor."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.is_complex():
            raise TypeError(
                f"{op}: scale must be a real number or a 1-element real tensor, got a {scale.dtype} tensor "
                f"of shape {tuple(scale.shape)}"
            )
        if scale.requires_grad and torch.is_grad_enabled():
            # It is read once as a constant: training it through this op would silently give it no gradient.
            raise TypeError(
                f"{op}: scale is a tensor that requires grad, but the op takes scale as a constant and "
                "gives it no gradient; pass scale.detach() (or a float), or scale the factors instead "
                "(lora_linear_multi takes trainable per-adapter scales)"
            )
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__}")
    return float(scale)


def _no_grad_needed(*tensors: torch.Tensor | None) -> bool:
    """True outside torch.compile when autograd would record nothing for these inputs."""
    if torch.compiler.is_compiling():
        return False  # let the compiler see the op with its autograd formula
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, scale, bias = inputs
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B)


# Rows per block of the float16 backward's float32 r-wide products (bounds its float32 copies of x and
# grad_out to this many rows).
_FP16_BACKWARD_ROWS = 2048


class _LoRATermFP16(torch.autograd.Function):
    """``scale (x A^T) B^T`` for float16 with the r-wide ``u`` in float32 (see :func:`lora_term`)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale):
        ctx.scale = scale
        ctx.save_for_backward(x, lora_A, lora_B)
        x2 = x.reshape(-1, x.shape[-1])
        A32, B32 = lora_A.float(), lora_B.float()
        out = torch.empty(x2.shape[0], lora_B.shape[0], dtype=x.dtype, device=x.device)
        for start in range(0, x2.shape[0], _FP16_BACKWARD_ROWS):
            u = torch.mm(x2[start : start + _FP16_BACKWARD_ROWS].float(), A32.t()).mul_(scale)
            out[start : start + _FP16_BACKWARD_ROWS] = torch.mm(u, B32.t())
        return out.reshape(*x.shape[:-1], lora_B.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B = ctx.saved_tensors
        need_x, need_a, need_b, _ = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_out.reshape(x2.shape[0], lora_B.shape[0])
        grad_x, grad_a, grad_b = _lora_backward_fp16(
            x2, g2, None, lora_A, lora_B, ctx.scale, need_x, need_a, need_b
        )
        return None if grad_x is None else grad_x.reshape(x.shape), grad_a, grad_b, None


def lora_term(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (x @ lora_A.T) @ lora_B.T`` alone (the adapter's term where it sees another input than the
    base layer, e.g. ``dropout(x)``), differentiable. float16 keeps the r-wide ``u = x A^T`` in float32, as
    :func:`lora_linear` does (a float16 ``u`` overflows beyond 65504 where the result is finite); other
    dtypes are two ``F.linear`` calls."""
    if x.dtype == torch.float16 and not torch.compiler.is_compiling():
        return _LoRATermFP16.apply(x, lora_A, lora_B, float(scale))
    return F.linear(F.linear(x, lora_A), lora_B) * scale


def _lora_backward_fp16(x2, g2, weight, lora_A, lora_B, scale, need_x, need_a, need_b):
    """The LoRA part of the backward for float16, with the r-wide ``u = x A^T`` and ``g B`` in float32.

    float16 tops out at 65504: ``u`` (a sum over in_features) can overflow where the forward (which keeps
    ``u`` in float32) and the gradients themselves are finite, and then ``grad_B = s g^T u`` came back inf or
    NaN for every step (a loss scaler cannot help: ``u`` does not depend on the loss scale). bfloat16 has
    float32's range and takes the plain path. Blocks of rows bound the float32 copies of x and grad_out.
    """
    f32 = torch.float32
    A32, B32 = lora_A.to(f32), lora_B.to(f32)
    grad_x = None
    if need_x:  # weight None: the LoRA term alone (lora_term)
        grad_x = torch.mm(g2, weight) if weight is not None else x2.new_zeros(x2.shape)
    grad_a = torch.zeros(A32.shape, dtype=f32, device=A32.device) if need_a else None
    grad_b = torch.zeros(B32.shape, dtype=f32, device=B32.device) if need_b else None
    for start in range(0, x2.shape[0], _FP16_BACKWARD_ROWS):
        x32 = x2[start : start + _FP16_BACKWARD_ROWS].to(f32)
        g32 = g2[start : start + _FP16_BACKWARD_ROWS].to(f32)
        if need_x or need_a:
            gu = torch.mm(g32, B32).mul_(scale)
            if need_x:
                block = grad_x[start : start + _FP16_BACKWARD_ROWS]
                block.copy_(torch.mm(gu, A32).add_(block))
            if need_a:
                grad_a.addmm_(gu.t(), x32)
        if need_b:
            grad_b.addmm_(g32.t(), torch.mm(x32, A32.t()), alpha=scale)
    return (
        grad_x,
        None if grad_a is None else grad_a.to(lora_A.dtype),
        None if grad_b is None else grad_b.to(lora_B.dtype),
    )


def _lora_linear_backward(ctx, grad_out):
    x, weight, lora_A, lora_B = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    g2 = grad_out.reshape(rows, weight.shape[0])
    grad_x = grad_w = grad_a = grad_b = grad_bias = None
    if x.dtype == torch.float16 and (need_x or need_a or need_b):
        grad_x, grad_a, grad_b = _lora_backward_fp16(
            x2, g2, weight, lora_A, lora_B, ctx.scale, need_x, need_a, need_b
        )
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        need_x = need_a = need_b = False
    grad_u = None
    if need_x or need_a:
        grad_u = torch.mm(g2, lora_B)  # (M, r): d/du of scale * u B^T, without the scale
        if ctx.scale != 1.0:
            grad_u = grad_u * ctx.scale
    if need_x:
        # dx = g W + (scale g B) A, the r-wide term accumulated into the base product in place.
        grad_x = torch.mm(g2, weight).addmm_(grad_u, lora_A).reshape(x.shape)
    if need_a:
        grad_a = torch.mm(grad_u.t(), x2)
    if need_b:
        u = torch.mm(x2, lora_A.t())  # recomputed: r columns, cheaper than keeping it alive
        grad_b = torch.mm(g2.t(), u)
        if ctx.scale != 1.0:
            grad_b = grad_b * ctx.scale
    if need_w:
        grad_w = torch.mm(g2.t(), x2)
    if need_bias:
        grad_bias = g2.sum(0)
    return grad_x, grad_w, grad_a, grad_b, None, grad_bias


torch.library.register_autograd(
    "lowrank::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context
)


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""LoRA linear layer over a mixed-adapter batch: each row uses its own adapter (or none).

    ``y[i] = x[i] @ weight.T + scales[a] * (x[i] @ lora_A[a].T) @ lora_B[a].T (+ bias)`` for
    ``a = adapter_ids[i] >= 0``, and ``y[i] = x[i] @ weight.T (+ bias)`` for ``adapter_ids[i] == -1``.
    One call serves a batch of requests that use different LoRA adapters (Hu et al., 2021) of the same
    base layer, as in multi-tenant serving (punica's BGMV/SGMV kernels, S-LoRA).

    Parameters
    ----------
    x : Tensor, shape (..., in_features)
        Input rows; any number of leading dimensions (including none, and empty batches).
    weight : Tensor, shape (out_features, in_features)
        The shared base weight.
    lora_A : Tensor, shape (num_adapters, r, in_features)
        The stacked down-projections. Adapters of smaller rank are zero-padded to the largest rank ``r``:
        padded rows of ``A[a]`` (and the matching columns of ``B[a]``) are zero and contribute nothing, at
        a cost proportional to ``r``.
    lora_B : Tensor, shape (num_adapters, out_features, r)
        The stacked up-projections (padded with zero columns like ``lora_A``).
    adapter_ids : Tensor of int64 or int32, shape (M,) or x.shape[:-1]
        The adapter of each row, ``-1`` for "base layer only". ``(M,)`` indexes the rows of ``x`` flattened
        over its leading dimensions (row-major); an array shaped like ``x.shape[:-1]`` is read the same way.
        Out-of-range ids raise ValueError (on CUDA's gather path: a device-side assertion, see Notes).
    scales : Tensor, shape (num_adapters,)
        Floating-point multiplier of each adapter's term (``alpha / r`` in LoRA, ``alpha / sqrt(r)`` in
        rsLoRA). Any floating dtype; on the same device as ``x``. A zero scale gives exactly the base layer
        for that adapter's rows (its factors are not read, so a non-finite adapter cannot leak in as
        ``0 * inf``).
    bias : Tensor, shape (out_features,), optional
        Base bias, applied to every row.

    Returns
    -------
    Tensor, shape (..., out_features)
        Same dtype and device as ``x``.

    Notes
    -----
    ``x``, ``weight``, ``lora_A``, ``lora_B`` and ``bias`` share one dtype (float32, float16, bfloat16;
    float64 on CPU); all tensors, ``adapter_ids`` and ``scales`` included, share one device.

    The rows are grouped by adapter with a counting sort of the ids (O(M + N)), then one base GEMM covers
    every row and each adapter present adds its term with a shrink and an expand GEMM on its rows, in place
    when its rows are contiguous (e.g. concatenated requests), gathered and scattered back otherwise. Cost:
    the base ``2 M in out`` FLOPs plus ``2 M r (in + out)``, and reading each *present* adapter's
    ``r (in + out)`` weights once. On CUDA, batches of up to 64 rows (decode), or with fewer than 64 rows
    per adapter on average, add the LoRA terms with two gather kernels in the style of punica's BGMV (each
    row reads its adapter's A and B, no sort; repeats hit L2) after one cuBLAS base GEMM; other batches use
    the grouped segment path with cuBLAS per adapter (SGMV-style).

    On CUDA the choice is made from the shapes alone: batches of at most 64 rows, or with fewer than 64 rows
    per stacked adapter (``M < 64 * num_adapters``), take the gather kernels, which never read
    ``adapter_ids`` on the host -- no synchronisation, and the call can be captured in a CUDA graph and
    replayed with new ids (every batch takes them while capturing). They validate the ids on the device:
    an out-of-range id trips a device-side assertion (as torch's own indexing kernels do), reported as a
    RuntimeError by the next synchronising call and leaving the CUDA context unusable, so validate ids
    built from user input beforehand (:func:`lowrank.mixed_adapter_batch` builds them from adapter names,
    valid by construction). Larger batches take the segment path, which copies the ids to the host (one
    small synchronising copy) and raises ValueError there, as on the CPU.

    Autograd gives gradients for ``x``, ``lora_A``, ``lora_B`` and ``scales`` (training several adapters in
    one batch; adapters absent from the batch get zero gradient), and for ``weight`` and ``bias`` when they
    require grad. The backward is one compiled op (``lowrank::lora_linear_multi_backward``) that groups the
    rows again and runs per-adapter segment GEMMs; it saves only the inputs. With ``create_graph=True``
    (double backward, e.g. a gradient penalty) the backward is built from differentiable torch ops instead,
    one group of rows per adapter present.

    Inside ``torch.autocast`` the op follows ``F.linear``: ``x``, ``weight``, the factors and ``bias`` are
    cast to the autocast dtype of their device (float64 left alone); ``scales`` and ``adapter_ids`` keep
    theirs.

    References
    ----------
    E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    L. Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024, arXiv:2310.18547.
    Y. Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024, arXiv:2311.03285.

    Examples
    --------
    >>> x = torch.randn(3, 64); W = torch.randn(32, 64)
    >>> A = torch.randn(2, 8, 64); B = torch.randn(2, 32, 8)
    >>> ids = torch.tensor([1, -1, 0]); s = torch.tensor([0.5, 2.0])
    >>> y = lowrank.lora_linear_multi(x, W, A, B, ids, s)
    >>> torch.allclose(y[0], x[0] @ W.T + 2.0 * (x[0] @ A[1].T) @ B[1].T, atol=1e-4)
    True
    """
    tensors = (x, weight, lora_A, lora_B, adapter_ids, scales)
    if not (
        all(isinstance(t, torch.Tensor) for t in tensors) and (bias is None or isinstance(bias, torch.Tensor))
    ):
        _raise_not_tensor(
            "lora_linear_multi",
            x=x,
            weight=weight,
            lora_A=lora_A,
            lora_B=lora_B,
            adapter_ids=adapter_ids,
            scales=scales,
            bias=bias,
        )
    if _no_grad_needed(x, weight, lora_A, lora_B, scales, bias):  # inference: past the autograd layer
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.lowrank.lora_linear_multi.default(
                x, weight, lora_A, lora_B, adapter_ids, scales, bias
            )
    return torch.ops.lowrank.lora_linear_multi.default(x, weight, lora_A, lora_B, adapter_ids, scales, bias)


def _lora_linear_multi_setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, adapter_ids, scales, bias = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, adapter_ids, scales)


def _lora_linear_multi_backward_graph(grad_out, x, weight, lora_A, lora_B, adapter_ids, scales):
    """The multi-adapter backward in differentiable torch ops, for ``create_graph=True`` (double backward).

    The same formulas as ``lowrank::lora_linear_multi_backward`` (whose kernel is not differentiable), one
    group of rows per adapter present in the batch: a Python loop over adapters, not rows. Returns
    ``(grad_x, grad_A, grad_B, grad_scales)``; adapters absent from the batch get zero gradients.
    """
    rows = x.shape[:-1].numel()
    x2 = x.reshape(rows, x.shape[-1])
    g2 = grad_out.reshape(rows, weight.shape[0])
    ids = adapter_ids.reshape(rows)
    grad_x = torch.mm(g2, weight)
    if lora_A.shape[0] == 0:  # no adapters stacked (every id is -1)
        zeros = torch.zeros_like
        return grad_x.reshape(x.shape), zeros(lora_A), zeros(lora_B), zeros(scales)
    grad_a = [torch.zeros_like(lora_A[0])] * lora_A.shape[0]
    grad_b = [torch.zeros_like(lora_B[0])] * lora_B.shape[0]
    grad_s = [scales.new_zeros(())] * scales.shape[0]
    for a in ids.unique().tolist():  # the ids were checked by the forward
        if a < 0:
            continue
        index = (ids == a).nonzero().squeeze(1)
        xa, ga = x2.index_select(0, index), g2.index_select(0, index)
        s = scales[a].to(x.dtype)
        gu = torch.mm(ga, lora_B[a])  # (M_a, r), unscaled
        u = torch.mm(xa, lora_A[a].t())
        grad_x = grad_x.index_add(0, index, torch.mm(gu, lora_A[a]) * s)
        grad_a[a] = torch.mm(gu.t(), xa) * s
        grad_b[a] = torch.mm(ga.t(), u) * s
        grad_s[a] = (gu * u).sum().to(scales.dtype)
    return grad_x.reshape(x.shape), torch.stack(grad_a), torch.stack(grad_b), torch.stack(grad_s)


def _lora_linear_multi_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, adapter_ids, scales = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_s, need_bias = ctx.needs_input_grad
    grad_x = grad_w = grad_a = grad_b = grad_s = grad_bias = None
    if torch.is_grad_enabled() and (need_x or need_a or need_b or need_s):
        # create_graph=True: the compiled backward is not differentiable, so build the graph from torch ops.
        grad_x, grad_a, grad_b, grad_s = _lora_linear_multi_backward_graph(
            grad_out, x, weight, lora_A, lora_B, adapter_ids, scales
        )
        grad_x = grad_x if need_x else None
        grad_a = grad_a if need_a else None
        grad_b = grad_b if need_b else None
        grad_s = grad_s if need_s else None
    elif need_x or need_a or need_b or need_s:
        grad_x, grad_a, grad_b, grad_s = torch.ops.lowrank.lora_linear_multi_backward.default(
            grad_out, x, weight, lora_A, lora_B, adapter_ids, scales, [need_x, need_a, need_b, need_s]
        )
        grad_x = grad_x if need_x else None
        grad_a = grad_a if need_a else None
        grad_b = grad_b if need_b else None
        grad_s = grad_s if need_s else None
    if need_w or need_bias:
        rows = x.shape[:-1].numel()  # not reshape(-1, ...): that fails for empty x with in or out = 0
        g2 = grad_out.reshape(rows, weight.shape[0])
        if need_w:
            grad_w = torch.mm(g2.t(), x.reshape(rows, x.shape[-1]))
        if need_bias:
            grad_bias = g2.sum(0)
    return grad_x, grad_w, grad_a, grad_b, None, grad_s, grad_bias


torch.library.register_autograd(
    "lowrank::lora_linear_multi", _lora_linear_multi_backward, setup_context=_lora_linear_multi_setup_context
)


def lora_linear_quantized(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Fused LoRA linear layer over a quantized frozen base: ``y = x W_q^T + scale (x A^T) B^T (+ bias)``.

    ``W_q = weight_scale[:, None] * qweight`` is the weight stored as int8 or float8_e4m3fn with one float32
    scale per output row (see :func:`lowrank.quantize_weight`); it is never formed whole.

    Parameters
    ----------
    x : Tensor, shape (..., in_features)
        float32, bfloat16, float16 or float64; any number of leading dimensions (empty batches too).
    qweight : Tensor, shape (out_features, in_features), dtype int8 or float8_e4m3fn
        The quantized base weight (frozen: it gets no gradient).
    weight_scale : Tensor, shape (out_features,), dtype float32
        Per-output-row scales.
    lora_A : Tensor, shape (r, in_features)
        Down-projection, r >= 1, dtype of ``x``.
    lora_B : Tensor, shape (out_features, r)
        Up-projection, dtype of ``x``.
    scale : float, default 1.0
        Multiplier of the LoRA term (``alpha / r``). A 1-element tensor is read once as a float (a constant:
        no gradient; one that requires grad raises TypeError). ``scale == 0`` computes exactly the base
        layer (the factors are not read, so a non-finite adapter cannot leak in through ``0 * inf``).
    bias : Tensor, shape (out_features,), optional
        Dtype of ``x``.

    Returns
    -------
    Tensor, shape (..., out_features)
        Dtype and device of ``x``.

    Raises
    ------
    ValueError
        Shapes do not match, or the tensors are on different devices.
    TypeError
        Unsupported dtypes (``qweight`` not int8/float8_e4m3fn, ``weight_scale`` not float32, factors or
        bias not in the dtype of ``x``), a non-tensor argument, or a ``scale`` tensor that requires grad.

    Notes
    -----
    CPU: with at most 16 rows (decode) and a row-contiguous ``qweight``, one threaded pass reads each
    quantized row once (1 byte per weight), widens it to float32 in registers (AVX2 where available),
    applies ``weight_scale`` once after the dot and adds the LoRA term (``u = x A^T`` computed first) in the
    same pass. With more rows the product is compute-bound: the threads split ``qweight`` into blocks of
    128 rows, dequantize each into a per-thread float32 buffer (float64 for float64 ``x``) and multiply it
    into its slice of ``y`` with BLAS; the dequantized weight never exists whole. Accumulation is float32
    (float64 for float64 ``x``).

    CUDA (compiled and reviewed, not yet measured on a GPU): up to 16 rows, a streaming kernel reads
    ``qweight`` once with 16-byte loads (16 weights per lane), widens in registers, applies ``weight_scale``
    once per row after the dot and adds the LoRA term before the warp reduction; more rows dequantize blocks
    of 2048 rows to the activation dtype (a temporary, rounded to that dtype) and use cuBLAS.

    Inside ``torch.autocast`` the op follows ``F.linear``: ``x``, the factors and ``bias`` are cast to the
    autocast dtype of their device (float64 left alone); ``qweight`` and ``weight_scale`` are not cast.

    Autograd gives gradients for ``x``, ``lora_A``, ``lora_B``, ``bias`` and ``weight_scale``. ``dx =
    (g * weight_scale) qweight + scale (g B) A`` runs the op itself on ``qweight`` transposed (a view,
    dequantized block by block) with a zero rank-1 adapter, so no dequantized weight is kept across the step;
    the backward saves only the inputs. For bfloat16/float16 ``g * weight_scale`` is rounded to that dtype.

    References
    ----------
    E. J. Hu et al., "LoRA", arXiv:2106.09685. T. Dettmers et al., "QLoRA: Efficient Finetuning of
    Quantized LLMs", NeurIPS 2023, arXiv:2305.14314 (LoRA training over a frozen quantized base).

    Examples
    --------
    >>> W = torch.randn(32, 64); q, s = lowrank.quantize_weight(W, "int8")
    >>> x = torch.randn(4, 64); A = torch.randn(8, 64); B = torch.randn(32, 8)
    >>> y = lowrank.lora_linear_quantized(x, q, s, A, B, scale=2.0)
    >>> Wq = lowrank.dequantize(q, s)
    >>> torch.allclose(y, x @ Wq.T + 2.0 * (x @ A.T) @ B.T, atol=1e-4)
    True
    """
    tensors = (x, qweight, weight_scale, lora_A, lora_B)
    if not (
        all(isinstance(t, torch.Tensor) for t in tensors) and (bias is None or isinstance(bias, torch.Tensor))
    ):
        _raise_not_tensor(
            "lora_linear_quantized",
            x=x,
            qweight=qweight,
            weight_scale=weight_scale,
            lora_A=lora_A,
            lora_B=lora_B,
            bias=bias,
        )
    scale = _check_scale("lora_linear_quantized", scale)
    op = torch.ops.lowrank.lora_linear_quantized.default
    if _no_grad_needed(x, weight_scale, lora_A, lora_B, bias):  # inference: past the autograd layer
        with torch._C._AutoDispatchBelowAutograd():
            return op(x, qweight, weight_scale, lora_A, lora_B, scale, bias)
    return op(x, qweight, weight_scale, lora_A, lora_B, scale, bias)


def _lora_linear_quantized_setup_context(ctx, inputs, output):
    x, qweight, weight_scale, lora_A, lora_B, scale, bias = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, qweight, weight_scale, lora_A, lora_B)


def _quantized_base(x2: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x2 @ (weight_scale[:, None] * qweight).T`` through the op, with a zero rank-1 adapter."""
    zero_A = x2.new_zeros(1, qweight.shape[1])
    zero_B = x2.new_zeros(qweight.shape[0], 1)
    return torch.ops.lowrank.lora_linear_quantized.default(
        x2, qweight, weight_scale, zero_A, zero_B, 0.0, None
    )


def _lora_linear_quantized_backward(ctx, grad_out):
    x, qweight, weight_scale, lora_A, lora_B = ctx.saved_tensors
    need_x, _, need_s, need_a, need_b, _, need_bias = ctx.needs_input_grad
    rows = x.shape[:-1].numel()
    x2 = x.reshape(rows, x.shape[-1])
    g2 = grad_out.reshape(rows, qweight.shape[0])
    grad_x = grad_s = grad_a = grad_b = grad_bias = None
    grad_u = None
    if need_x or need_a:
        grad_u = torch.mm(g2, lora_B)
        if ctx.scale != 1.0:
            grad_u = grad_u * ctx.scale
    if need_x:
        # dx = (g * s) Q + grad_u A: the op on Q^T (a view; unit scales), then the r-wide term in place.
        ones = weight_scale.new_ones(qweight.shape[1])
        gs = g2 * weight_scale.to(g2.dtype)
        grad_x = _quantized_base(gs, qweight.t(), ones).addmm_(grad_u, lora_A).reshape(x.shape)
    if need_a:
        grad_a = torch.mm(grad_u.t(), x2)
    if need_b:
        u = torch.mm(x2, lora_A.t())
        grad_b = torch.mm(g2.t(), u)
        if ctx.scale != 1.0:
            grad_b = grad_b * ctx.scale
    if need_s:
        # d/ds_n = sum_m g[m, n] (x_m . Q_n): the base product with unit scales.
        ones = weight_scale.new_ones(qweight.shape[0])
        grad_s = (g2 * _quantized_base(x2, qweight, ones)).sum(0).to(weight_scale.dtype)
    if need_bias:
        grad_bias = g2.sum(0)
    return grad_x, None, grad_s, grad_a, grad_b, None, grad_bias


torch.library.register_autograd(
    "lowrank::lora_linear_quantized",
    _lora_linear_quantized_backward,
    setup_context=_lora_linear_quantized_setup_context,
)


def sparse_sign_add_(
    out: torch.Tensor,
    block: torch.Tensor,
    rows: torch.Tensor,
    signs: torch.Tensor,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``out[rows[i, t], :] += signs[i, t] * block[i, :]`` for all ``i < b``, ``t < zeta``, in place; with
    ``dense`` (``b x p``) also ``out[d - p:] += dense^T block``.

    The product ``S @ block`` of a sparse ``d x b`` matrix ``S`` with ``zeta`` nonzeros per column (row
    ``rows[i, t]`` of column ``i`` holds ``signs[i, t]``) and a dense block, accumulated into ``out``: the
    sparse sign test matrices of Tropp, Yurtsever, Udell & Cevher (2019, §3.3) applied to streamed rows
    (:class:`lowrank.StreamingSVD`). ``dense`` adds a few dense test rows (a Gaussian test sketch, a row of
    ones for the column sums) in the same pass over ``block``.

    Parameters
    ----------
    out : Tensor, shape (d, n), float64, contiguous
        Accumulator, updated in place.
    block : Tensor, shape (b, n), float32 or float64
        Dense rows (any strides; rows that are not unit-stride are copied once).
    rows : Tensor, shape (b, zeta), int64
        Target rows of ``out``, each in ``[0, d - p)``; repeats within a row of ``rows`` add twice.
    signs : Tensor, shape (b, zeta), float64
        Weights (``+-1`` for a sign map).
    dense : Tensor, shape (b, p), float64, optional
        Dense weights of the last ``p`` rows of ``out``: ``out[d - p + t] += sum_i dense[i, t] block[i]``.

    Returns
    -------
    Tensor
        ``out``.

    Raises
    ------
    ValueError
        Shapes that do not match, an entry of ``rows`` outside ``[0, d - p)``, a non-contiguous ``out``, an
        ``out`` that overlaps another argument in memory, or tensors on different devices.
    TypeError
        A non-tensor argument or a dtype other than the above.

    Notes
    -----
    Cost ``(zeta + p) b n`` multiply-adds, one read of ``block``. On CPU the compiled kernel
    (``csrc/cpu/sparse_sign.cpp``) sorts the nonzeros by target row per panel of 256 rows and gathers: per
    column tile of 256 bytes, each target row's panel rows are summed in registers from an L2-resident
    copy of the panel (the dense rows likewise, 12 at a time), then added once to a tile buffer; threads
    run over column tiles, and the order of every sum is fixed by the rows alone (independent of the
    thread count; sums within a call are rounded in the block's dtype, across calls in float64). Other
    devices use ``zeta`` calls of ``index_add_`` and one ``addmm_`` (float64 products; on CUDA the atomic
    adds make the order, hence the last bits, vary from run to run).
    """
    if dense is None:
        _raise_not_tensor("sparse_sign_add_", out=out, block=block, rows=rows, signs=signs)
    else:
        _raise_not_tensor("sparse_sign_add_", out=out, block=block, rows=rows, signs=signs, dense=dense)
    if out.device.type == "cpu":
        return torch.ops.lowrank.sparse_sign_add_.default(out, block, rows, signs, dense)
    # other devices: the op's checks through the Meta kernel, then the torch fallback
    args = [out, block, rows, signs] + ([] if dense is None else [dense])
    torch.ops.lowrank.sparse_sign_add_.default(
        *(t.to("meta") if t.device.type != "meta" else t for t in args)
    )
    if out.device.type == "meta":
        return out
    if any(t.device != out.device for t in args):
        raise ValueError(
            "sparse_sign_add_: all tensors must be on one device, got "
            + ", ".join(
                f"{name} on {t.device}" for name, t in zip(("out", "block", "rows", "signs", "dense"), args)
            )
        )
    for name, tensor in zip(("block", "rows", "signs", "dense"), args[1:]):  # the CPU kernel's check
        if _spans_overlap(out, tensor):
            raise ValueError(f"sparse_sign_add_: out must not overlap {name} in memory")
    p = 0 if dense is None else dense.shape[1]
    ds = out.shape[0] - p
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= ds):
        raise ValueError(f"sparse_sign_add_: every entry of rows must lie in [0, {ds})")
    src = block.to(torch.float64)
    for t in range(rows.shape[1]):
        out.index_add_(0, rows[:, t], src * signs[:, t, None])
    if p:
        out[ds:].addmm_(dense.mT, src)
    return out


def sketch_row_draws_limit(zetas: Sequence[int], n_gauss: int) -> int:
    """One past the last global row :func:`sketch_row_draws` can draw with these ``zetas`` and ``n_gauss``:
    ``(2**62 - 1) // W`` with ``W = sum(zetas) + ceil(sum(zetas) / 64) + ceil(n_gauss / 2)`` words per row
    (the kernel's counter ``i W + j`` stays below ``2**62``, so no two rows share a word). About ``2.1e17``
    rows for :class:`lowrank.StreamingSVD`'s defaults (``W = 22``)."""
    nz = sum(zetas)
    return (2**62 - 1) // max(1, nz + -(-nz // 64) + -(-n_gauss // 2))


def sketch_row_draws(
    key: int, start: int, count: int, sizes: Sequence[int], zetas: Sequence[int], n_gauss: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The row-side test matrices of :class:`lowrank.StreamingSVD` for the global rows ``start`` to
    ``start + count - 1``.

    Row ``i``'s values depend on ``(key, i)`` alone (a counter-based generator: SplitMix64 of Steele, Lea &
    Flood 2014 read at position ``i W + j``, ``W`` words per row), so any cut of a stream into blocks, any
    thread count and any ``start`` give the same rows.

    Parameters
    ----------
    key : int
        Generator key, ``0 <= key < 2**63`` (from the stream's seed).
    start, count : int
        First global row and number of rows, ``>= 0``.
    sizes, zetas : sequence of int
        Groups of sparse sign columns: group ``g`` picks ``zetas[g]`` distinct targets uniformly from
        ``[o_g, o_g + sizes[g])`` (``o_g`` the sum of the earlier sizes; Floyd's algorithm, J. Bentley,
        "Programming pearls: a sample of brilliance", CACM 30(9), 1987), ``0 <= zetas[g] <= sizes[g]``.
    n_gauss : int
        Standard Gaussians per row (Marsaglia's polar method, one generator word per pair), rounded to
        float32.

    Returns
    -------
    rows : Tensor, shape (count, sum(zetas)), int64
        Target rows, group after group.
    signs : Tensor, shape (count, sum(zetas)), float64
        Independent fair ``+-1``.
    gauss : Tensor, shape (count, n_gauss), float64
        Standard Gaussian entries (float32 values).

    Raises
    ------
    ValueError
        Negative arguments, ``len(sizes) != len(zetas)``, a ``zetas[g]`` outside ``[0, sizes[g]]``, a
        ``key`` outside ``[0, 2**63)``, ``sum(sizes) >= 2**63``, or ``start + count`` beyond
        :func:`sketch_row_draws_limit`.
    TypeError
        A non-integer argument (``sizes`` and ``zetas`` included).

    Notes
    -----
    ``O(count (sum(zetas)^2 + n_gauss))`` work in one compiled loop (``csrc/cpu/sketch_draws.cpp``), threads
    over rows. ``StreamingSVD``'s draws for a 5000-row block at ``k = 40`` (its two calls: sign maps and
    ``Theta``) took 0.86-0.95 ms on 2 threads, 1.1-1.4 ms on 1 (min/median of 30, this project's 2-core
    VM), against 3.7-5.3 ms for the two 4096-row chunks of torch-generator draws such a block used to touch.
    """
    values = {"key": key, "start": start, "count": count, "n_gauss": n_gauss}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"sketch_row_draws: {name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"sketch_row_draws: {name} must be >= 0, got {value}")
    # Python ints from here: NumPy int64 sums such as start + count wrap around silently
    key, start, count, n_gauss = int(key), int(start), int(count), int(n_gauss)
    if key >= 1 << 63:
        raise ValueError(f"sketch_row_draws: key must be < 2**63, got {key}")
    groups = {}
    for name, seq in (("sizes", sizes), ("zetas", zetas)):
        entries = seq.tolist() if hasattr(seq, "tolist") else seq  # ndarray / tensor: their entries
        if isinstance(entries, str | bytes) or not hasattr(entries, "__iter__"):
            raise TypeError(f"sketch_row_draws: {name} must be a sequence of ints, got {type(seq).__name__}")
        entries = list(entries)
        for g, value in enumerate(entries):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"sketch_row_draws: {name}[{g}] must be an int, got {type(value).__name__}")
        groups[name] = [int(v) for v in entries]
    sizes, zetas = groups["sizes"], groups["zetas"]
    if len(sizes) != len(zetas):
        raise ValueError(f"sketch_row_draws: sizes has {len(sizes)} entries but zetas has {len(zetas)}")
    for g, (d, z) in enumerate(zip(sizes, zetas)):
        if not 0 <= z <= d:
            raise ValueError(f"sketch_row_draws: zetas[{g}] = {z} must lie in [0, sizes[{g}] = {d}]")
    if sum(sizes) >= 1 << 63:  # the targets are int64 offsets into the concatenated groups
        raise ValueError(f"sketch_row_draws: sum(sizes) must be < 2**63, got {sum(sizes)}")
    limit = sketch_row_draws_limit(zetas, n_gauss)
    if start + count > limit:
        raise ValueError(
            f"sketch_row_draws: start + count = {start + count} exceeds the generator's last row + 1 = "
            f"{limit} (for sum(zetas) = {sum(zetas)}, n_gauss = {n_gauss})"
        )
    cpu = torch.device("cpu")  # the op is CPU-only: not torch's default device (`with torch.device("cuda")`)
    rows = torch.empty(count, sum(zetas), dtype=torch.int64, device=cpu)
    signs = torch.empty(count, sum(zetas), dtype=torch.float64, device=cpu)
    gauss = torch.empty(count, n_gauss, dtype=torch.float64, device=cpu)
    torch.ops.lowrank.sketch_row_draws_.default(int(key), int(start), sizes, zetas, rows, signs, gauss)
    return rows, signs, gauss


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans (first to last element, bytes) of two strided tensors intersect."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def range_gram(
    block: torch.Tensor,
    omega: torch.Tensor,
    chunk_rows: int,
    gram: bool = True,
    *,
    out: torch.Tensor,
    colsum: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``out = block @ omega`` and the float64 Gram matrix ``out^T out``, in row chunks.

    The range sketch ``Y = A Omega`` of a streamed block and the Gram matrix that
    :class:`lowrank.StreamingSVD` keeps of it (Tropp, Yurtsever, Udell & Cevher 2019), read once per chunk.

    Parameters
    ----------
    block : Tensor, shape (b, n), float32 or float64
        Rows of ``A`` (any strides).
    omega : Tensor, shape (n, s), dtype of ``block``
        The test matrix.
    chunk_rows : int
        Rows per chunk, ``>= 1``; the result depends on it (the order of the sums), not on the thread count.
    gram : bool, default True
        False: the GEMM alone (same schedule), and a ``0 x 0`` result.
    out : Tensor, shape (b, s), dtype of ``block``, contiguous
        Receives ``block @ omega``.
    colsum : Tensor, shape (s,), float64, contiguous, optional
        Receives the column sums ``1^T out`` in float64 (of the Gram matrix's float64 copies of the chunks,
        summed in chunk order); needs ``gram=True``.

    Returns
    -------
    Tensor, shape (s, s), float64
        ``sum_c Y_c^T Y_c`` over the chunks ``Y_c`` of ``out`` (in float64: products of float32 entries are
        exact), summed in chunk order.

    Raises
    ------
    ValueError
        Shapes that do not match, ``chunk_rows < 1``, a non-contiguous ``out`` or ``colsum``, an ``out``
        that overlaps ``block`` or ``omega`` (or a ``colsum`` that overlaps any of them) in memory, tensors on
        different devices, ``colsum`` with ``gram=False``.
    TypeError
        A non-tensor argument, or dtypes other than the above.

    Notes
    -----
    Cost ``2 b n s`` (GEMM) + ``2 b s^2`` (float64 Gram) flops, ``block`` read once. On CPU
    (``csrc/cpu/range_gram.cpp``) each thread takes a run of whole chunks and runs their GEMMs on one thread
    each (no barrier per chunk, and a chunk of a few MiB stays in cache for its Gram matrix); on 2 cores
    (5000 x 3000 float32 blocks, s = 161, chunks of 700 rows) this took 0.98x the time of one 2-thread GEMM
    call for the pair, against 1.16x for one GEMM call plus one Gram call. Other devices: one GEMM and one
    float64 ``mm`` (``chunk_rows`` is then only checked).
    """
    _raise_not_tensor("range_gram", block=block, omega=omega, out=out)
    if colsum is not None:
        _raise_not_tensor("range_gram", colsum=colsum)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral):
        raise TypeError(f"range_gram: chunk_rows must be an int, got {type(chunk_rows).__name__}")
    if not isinstance(gram, bool):
        raise TypeError(f"range_gram: gram must be a bool, got {type(gram).__name__}")
    if block.device.type == "cpu":
        op = torch.ops.lowrank.range_gram.default
        return op(block, omega, int(chunk_rows), gram, out=out, colsum=colsum)
    # other devices: the op's checks through the Meta kernel, then torch
    torch.ops.lowrank.range_gram.default(
        block.to("meta"),
        omega.to("meta"),
        int(chunk_rows),
        gram,
        out=out.to("meta"),
        colsum=None if colsum is None else colsum.to("meta"),
    )
    if (
        omega.device != block.device
        or out.device != block.device
        or (colsum is not None and colsum.device != block.device)
    ):
        raise ValueError(
            f"range_gram: all tensors must be on one device, got block on {block.device}, omega on "
            f"{omega.device}, out on {out.device}"
            + ("" if colsum is None else f", colsum on {colsum.device}")
        )
    s = omega.shape[1] if gram else 0
    if block.device.type == "meta":
        return torch.empty(s, s, dtype=torch.float64, device="meta")
    for name, tensor in (("block", block), ("omega", omega)):  # the CPU kernel's check, for torch's GEMM
        if _spans_overlap(out, tensor):
            raise ValueError(f"range_gram: out must not overlap {name} in memory")
    if colsum is not None and any(_spans_overlap(colsum, t) for t in (block, omega, out)):
        raise ValueError("range_gram: colsum must not overlap block, omega or out in memory")
    torch.matmul(block, omega, out=out)
    if not gram:
        return torch.empty(0, 0, dtype=torch.float64, device=block.device)
    yd = out.double()
    if colsum is not None:
        colsum.copy_(yd.sum(dim=0))
    return yd.mT @ yd
