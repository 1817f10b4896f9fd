// Shared by every backend of lowrank::lora_linear_multi (mixed-adapter batches): argument checks, output
// shape, grouping of rows by adapter (a counting sort on the host), and the composite (BLAS-backed)
// segment path that the CPU kernel and the large-M CUDA path both use.
//
// y[i] = x[i] W^T + scales[a] (x[i] A[a]^T) B[a]^T (+ bias)   for a = adapter_ids[i] >= 0,
// y[i] = x[i] W^T (+ bias)                                     for adapter_ids[i] == -1.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "shape_int.h"

namespace lowrank {

template <typename Int>
struct LoraMultiShapeT {
  Int rows;  // M: number of rows of x once its leading dims are flattened
  Int in_features;
  Int out_features;
  Int rank;                    // r: the (padded) rank shared by every adapter
  Int num_adapters;            // N
  std::vector<Int> out_sizes;  // x.shape[:-1] + (out_features,)
};
using LoraMultiShape = LoraMultiShapeT<int64_t>;

// Validates the arguments of lora_linear_multi (and of its backward) and returns the problem sizes.
// Shape/device errors raise ValueError and dtype errors TypeError in Python; each message names the
// argument. check_devices compares every tensor's device with x's (the Meta kernel too: a real tensor mixed with a
// meta one is an error). The values of adapter_ids are checked where they are read (group_rows_by_adapter).
// Int: int64_t in the real kernels, c10::SymInt in the Meta kernels (shape_int.h).
template <typename Int = int64_t>
inline LoraMultiShapeT<Int> check_lora_linear_multi_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         const at::Tensor& adapter_ids, const at::Tensor& scales,
                                                         const c10::optional<at::Tensor>& bias, bool check_devices) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", weight.dim(),
                    "-D shape ", sizes_of<Int>(weight));
  TORCH_CHECK_VALUE(lora_A.dim() == 3, op, ": lora_A must be 3-D (num_adapters, r, in_features), got ", lora_A.dim(),
                    "-D shape ", sizes_of<Int>(lora_A));
  TORCH_CHECK_VALUE(lora_B.dim() == 3, op, ": lora_B must be 3-D (num_adapters, out_features, r), got ", lora_B.dim(),
                    "-D shape ", sizes_of<Int>(lora_B));
  const Int in = size_of<Int>(x, -1);
  const Int out = size_of<Int>(weight, 0);
  const Int n = size_of<Int>(lora_A, 0);
  const Int r = size_of<Int>(lora_A, 1);
  Int rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= size_of<Int>(x, d);
  TORCH_CHECK_VALUE(size_of<Int>(weight, 1) == in, op, ": weight has shape ", sizes_of<Int>(weight),
                    " but x has in_features=", in, "; expected weight of shape (out_features, ", in, ")");
  TORCH_CHECK_VALUE(r >= 1, op, ": lora_A must have rank r >= 1 (pad smaller ranks with zeros), got shape ",
                    sizes_of<Int>(lora_A));
  TORCH_CHECK_VALUE(size_of<Int>(lora_A, 2) == in, op, ": lora_A has shape ", sizes_of<Int>(lora_A),
                    " but x has in_features=", in, "; expected lora_A of shape (num_adapters, r, ", in, ")");
  TORCH_CHECK_VALUE(size_of<Int>(lora_B, 0) == n && size_of<Int>(lora_B, 1) == out && size_of<Int>(lora_B, 2) == r, op,
                    ": lora_B has shape ", sizes_of<Int>(lora_B), " but expected (num_adapters, out_features, r) = (",
                    n, ", ", out, ", ", r, ")");
  TORCH_CHECK_VALUE(scales.dim() == 1 && size_of<Int>(scales, 0) == n, op,
                    ": scales must have shape (num_adapters,) = (", n, ",), got ", sizes_of<Int>(scales));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(scales.scalar_type()), op, ": scales must be a floating-point tensor, got ",
                   scales.scalar_type());
  TORCH_CHECK_TYPE(adapter_ids.scalar_type() == at::kLong || adapter_ids.scalar_type() == at::kInt, op,
                   ": adapter_ids must be an int64 or int32 tensor, got ", adapter_ids.scalar_type());
  // adapter_ids: one id per row, either flat (M,) or shaped like x's leading dims.
  const auto x_sizes = sizes_of<Int>(x);
  const auto lead = x_sizes.slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(
      (adapter_ids.dim() == 1 && size_of<Int>(adapter_ids, 0) == rows) || sizes_of<Int>(adapter_ids) == lead, op,
      ": adapter_ids must hold one id per row of x: shape (", rows, ",) or x.shape[:-1] = ", lead, ", got ",
      sizes_of<Int>(adapter_ids));
  const auto check_same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but x has dtype ", x.scalar_type(), "; x, weight, lora_A, lora_B and bias share one dtype");
  };
  check_same_dtype(weight, "weight");
  check_same_dtype(lora_A, "lora_A");
  check_same_dtype(lora_B, "lora_B");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && size_of<Int>(*bias, 0) == out, op, ": bias must have shape (", out,
                      ",), got ", sizes_of<Int>(*bias));
    check_same_dtype(*bias, "bias");
  }
  if (check_devices) {
    const auto check_same_device = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                        "; all tensors (adapter_ids and scales included) must be on one device");
    };
    check_same_device(weight, "weight");
    check_same_device(lora_A, "lora_A");
    check_same_device(lora_B, "lora_B");
    check_same_device(adapter_ids, "adapter_ids");
    check_same_device(scales, "scales");
    if (bias.has_value()) check_same_device(*bias, "bias");
  }
  std::vector<Int> out_sizes(x_sizes.begin(), x_sizes.end());
  out_sizes.back() = out;
  return {rows, in, out, r, n, std::move(out_sizes)};
}

// Rows of the batch grouped by adapter. Two layouts:
//  * contiguous: every adapter's rows already form one run in the original row order (a single adapter,
//    requests concatenated one after another, or all rows distinct). Segment k is rows
//    [start[k], start[k] + length[k]) of x itself: no gather or scatter is needed.
//  * sorted: otherwise. `perm` (int64, host) lists the rows that have an adapter, stably sorted by adapter
//    (a counting sort, O(M + N)); segment k is perm[start[k] : start[k] + length[k]].
// Rows with id -1 belong to no segment. Adapters with no rows have no segment.
struct AdapterGroups {
  bool contiguous = true;
  int64_t grouped_rows = 0;      // M': rows with an adapter
  std::vector<int64_t> adapter;  // adapter of each segment
  std::vector<int64_t> start;    // first row (contiguous) or first position in perm (sorted)
  std::vector<int64_t> length;   // rows in the segment
  at::Tensor perm;               // sorted layout only: (M',) int64 on the host
};

template <typename id_t>
inline AdapterGroups group_rows_by_adapter_impl(const id_t* ids, int64_t rows, int64_t num_adapters, const char* op) {
  AdapterGroups groups;
  std::vector<int64_t> counts(static_cast<size_t>(num_adapters), 0);
  int64_t runs = 0, distinct = 0;
  int64_t previous = -1;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t a = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(a >= -1 && a < num_adapters, op, ": adapter_ids[", i, "] = ", a,
                      " is out of range; ids must be -1 (base only) or in [0, num_adapters) = [0, ", num_adapters, ")");
    if (a >= 0) {
      if (counts[a] == 0) ++distinct;
      ++counts[a];
      if (a != previous) ++runs;
      ++groups.grouped_rows;
    }
    previous = a;
  }
  if (runs == distinct) {  // each adapter in one run: segments are slices of x
    int64_t i = 0;
    while (i < rows) {
      const int64_t a = static_cast<int64_t>(ids[i]);
      int64_t j = i + 1;
      while (j < rows && static_cast<int64_t>(ids[j]) == a) ++j;
      if (a >= 0) {
        groups.adapter.push_back(a);
        groups.start.push_back(i);
        groups.length.push_back(j - i);
      }
      i = j;
    }
    return groups;
  }
  groups.contiguous = false;
  std::vector<int64_t> next(static_cast<size_t>(num_adapters), 0);
  int64_t offset = 0;
  for (int64_t a = 0; a < num_adapters; ++a) {
    next[a] = offset;
    if (counts[a] > 0) {
      groups.adapter.push_back(a);
      groups.start.push_back(offset);
      groups.length.push_back(counts[a]);
    }
    offset += counts[a];
  }
  groups.perm = at::empty({groups.grouped_rows}, at::TensorOptions().dtype(at::kLong));
  int64_t* perm = groups.perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t a = static_cast<int64_t>(ids[i]);
    if (a >= 0) perm[next[a]++] = i;
  }
  return groups;
}

// Groups the rows by adapter and checks every id (ValueError naming adapter_ids and the first bad position).
// ids_cpu: adapter ids on the host (any shape; read in row-major order).
inline AdapterGroups group_rows_by_adapter(const at::Tensor& ids_cpu, int64_t num_adapters, const char* op) {
  const at::Tensor ids = ids_cpu.contiguous();
  if (ids.scalar_type() == at::kInt) {
    return group_rows_by_adapter_impl(ids.data_ptr<int32_t>(), ids.numel(), num_adapters, op);
  }
  return group_rows_by_adapter_impl(ids.data_ptr<int64_t>(), ids.numel(), num_adapters, op);
}

// Runs fn(k) for every segment k. On the CPU, when every segment is small (decode-like: at most
// kParallelSegmentRows rows, where a BLAS call on a few rows gains nothing from threads), the segments run
// in one at::parallel_for over adapters: one parallel region instead of one per small GEMM, each GEMM
// single-threaded inside it. Larger segments run one after another with multithreaded BLAS. fn must only
// write the segment's own rows/slices.
constexpr int64_t kParallelSegmentRows = 32;
template <typename Fn>
inline void for_each_segment(const AdapterGroups& groups, bool on_cpu, const Fn& fn) {
  const int64_t count = static_cast<int64_t>(groups.adapter.size());
  const int64_t largest = count ? *std::max_element(groups.length.begin(), groups.length.end()) : 0;
  if (on_cpu && count > 1 && largest <= kParallelSegmentRows) {
    // The worker threads must see the caller's dispatch state (below autograd, inference mode, ...).
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      for (int64_t k = begin; k < end; ++k) fn(static_cast<size_t>(k));
    });
  } else {
    for (int64_t k = 0; k < count; ++k) fn(static_cast<size_t>(k));
  }
}

// The scales as host doubles (used as the alpha of the expand GEMM, so scaling costs nothing).
inline std::vector<double> scales_to_host(const at::Tensor& scales_cpu) {
  const at::Tensor s = scales_cpu.to(at::kDouble).contiguous();
  return std::vector<double>(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
}

// Gives a fresh, contiguous (rows, out) result the op's output shape in place, so the op returns an
// ordinary tensor rather than a view of a 2-D temporary (views as outputs trip FSDP2 and in-place users).
inline at::Tensor with_output_shape(at::Tensor y, c10::IntArrayRef sizes) {
  y.resize_(sizes);
  return y;
}

// float16 on the CPU: the r-wide u = x A^T (and g B in the backward) can pass float16's 65504 where the output is
// finite (a sum over in_features of large activations), so there they are formed in float32 from float32 copies of
// the segment's rows, in blocks of kWideRows rows (bounded copies), and rounded once into the result, as
// lora_linear's CPU kernel keeps u in float32. CUDA keeps the BLAS path in float16: the copies would move 5x the
// bytes of the memory-bound shrink (2 read, 4 written, 4 read again per element of x against 2; an estimate from
// bytes moved, not measured: no GPU at hand), documented in the README.
constexpr int64_t kWideRows = 2048;

inline bool widen_lora_products(const at::Tensor& x2) { return x2.scalar_type() == at::kHalf && x2.device().is_cpu(); }

// y_k (+)= s (x_k A^T) B^T for one segment in float32, rounded once into y_k (accumulate: added to y_k's values).
inline void expand_segment_widened(const at::Tensor& xk, const at::Tensor& A, const at::Tensor& B, double s,
                                   at::Tensor& yk, bool accumulate) {
  const at::Tensor A32 = A.to(at::kFloat);
  const at::Tensor B32 = B.to(at::kFloat);
  for (int64_t r0 = 0; r0 < xk.size(0); r0 += kWideRows) {
    const int64_t rows = std::min(kWideRows, xk.size(0) - r0);
    at::Tensor yb = yk.narrow(0, r0, rows);
    at::Tensor t = at::mm(at::mm(xk.narrow(0, r0, rows).to(at::kFloat), A32.t()), B32.t()).mul_(s);
    if (accumulate) t.add_(yb);
    yb.copy_(t);
  }
}

// Forward through BLAS: one base GEMM for all rows (with the bias), then for every adapter segment a
// shrink GEMM (M_a x r) and an expand GEMM accumulated into the segment's rows of y (alpha = scales[a]).
// Contiguous layout: the expand accumulates in place into y's row slice. Sorted layout: the rows are
// gathered once (index_select), the segment products written into one (M' x out) buffer, and scattered
// back with one index_add_. x2: (M, in) contiguous. groups.perm must be on x2's device when sorted. An adapter
// whose scale is 0 adds nothing and its factors are not read (BLAS skips alpha = 0 products for some dtypes, not
// others: a non-finite adapter would leak in as 0 * inf for half types).
inline at::Tensor lora_linear_multi_composite(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, const std::vector<double>& scale_values,
                                              const c10::optional<at::Tensor>& bias, const AdapterGroups& groups) {
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  if (groups.grouped_rows == 0) return y;
  const int64_t r = lora_A.size(1);
  const bool on_cpu = x2.device().is_cpu();
  const bool widen = widen_lora_products(x2);
  if (groups.contiguous) {
    for_each_segment(groups, on_cpu, [&](size_t k) {
      const int64_t a = groups.adapter[k];
      if (scale_values[a] == 0.0) return;  // base layer only: the factors are not read (no 0 * inf)
      const at::Tensor xs = x2.narrow(0, groups.start[k], groups.length[k]);
      at::Tensor ys = y.narrow(0, groups.start[k], groups.length[k]);
      if (widen) {
        expand_segment_widened(xs, lora_A[a], lora_B[a], scale_values[a], ys, /*accumulate=*/true);
        return;
      }
      const at::Tensor u = at::mm(xs, lora_A[a].t());
      ys.addmm_(u, lora_B[a].t(), /*beta=*/1, /*alpha=*/scale_values[a]);
    });
    return y;
  }
  const at::Tensor xs = x2.index_select(0, groups.perm);
  at::Tensor us = widen ? at::Tensor() : at::empty({groups.grouped_rows, r}, x2.options());
  at::Tensor ys = at::empty({groups.grouped_rows, y.size(1)}, x2.options());
  for_each_segment(groups, on_cpu, [&](size_t k) {
    const int64_t a = groups.adapter[k];
    at::Tensor yk = ys.narrow(0, groups.start[k], groups.length[k]);
    if (scale_values[a] == 0.0) {  // base layer only: the factors are not read (no 0 * inf)
      yk.zero_();
      return;
    }
    if (widen) {
      expand_segment_widened(xs.narrow(0, groups.start[k], groups.length[k]), lora_A[a], lora_B[a], scale_values[a], yk,
                             /*accumulate=*/false);
      return;
    }
    at::Tensor u = us.narrow(0, groups.start[k], groups.length[k]);
    at::mm_out(u, xs.narrow(0, groups.start[k], groups.length[k]), lora_A[a].t());
    // beta = 0: the uninitialised buffer is not read (NaN/Inf in it do not propagate).
    at::addmm_out(yk, yk, u, lora_B[a].t(), /*beta=*/0, /*alpha=*/scale_values[a]);
  });
  y.index_add_(0, groups.perm, ys);
  return y;
}

// Backward through BLAS, per adapter segment (X_a, G_a the rows of x and grad_out of adapter a, s = scales[a]):
//   gu_a = G_a B_a (unscaled), u_a = X_a A_a^T
//   grad_A[a] = s gu_a^T X_a,  grad_B[a] = s G_a^T u_a,  grad_scales[a] = <gu_a, u_a>,
//   grad_x = grad_out W + (rows of a) s gu_a A_a.
// Outputs not asked for in mask (x, lora_A, lora_B, scales) come back as empty (0,) tensors.
inline std::vector<at::Tensor> lora_linear_multi_backward_composite(const at::Tensor& g2, const at::Tensor& x2,
                                                                    const at::Tensor& weight, const at::Tensor& lora_A,
                                                                    const at::Tensor& lora_B, const at::Tensor& scales,
                                                                    const std::vector<double>& scale_values,
                                                                    const AdapterGroups& groups,
                                                                    std::array<bool, 4> mask) {
  const int64_t n = lora_A.size(0);
  const auto none = [&](const at::TensorOptions& opts) { return at::empty({0}, opts); };
  at::Tensor grad_x = mask[0] ? at::mm(g2, weight) : none(x2.options());
  at::Tensor grad_A = mask[1] ? at::zeros(lora_A.sizes(), lora_A.options()) : none(lora_A.options());
  at::Tensor grad_B = mask[2] ? at::zeros(lora_B.sizes(), lora_B.options()) : none(lora_B.options());
  // grad_scales accumulates in float (double for double x), then is cast to scales' dtype.
  const auto acc = x2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_s = mask[3] ? at::zeros({n}, x2.options().dtype(acc)) : none(scales.options());
  if (groups.grouped_rows == 0 || !(mask[0] || mask[1] || mask[2] || mask[3])) {
    return {grad_x, grad_A, grad_B, mask[3] ? grad_s.to(scales.scalar_type()) : grad_s};
  }
  const bool sorted = !groups.contiguous;
  const at::Tensor xs = sorted ? x2.index_select(0, groups.perm) : x2;
  const at::Tensor gs = sorted ? g2.index_select(0, groups.perm) : g2;
  at::Tensor gxs;
  if (sorted && mask[0]) gxs = at::empty({groups.grouped_rows, x2.size(1)}, x2.options());
  const bool widen = widen_lora_products(x2);
  for_each_segment(groups, x2.device().is_cpu(), [&](size_t k) {
    const int64_t a = groups.adapter[k];
    const double s = scale_values[a];
    const at::Tensor xk = xs.narrow(0, groups.start[k], groups.length[k]);
    const at::Tensor gk = gs.narrow(0, groups.start[k], groups.length[k]);
    const at::Tensor A = lora_A[a];
    const at::Tensor B = lora_B[a];
    if (widen) {  // float16 on the CPU: gu, u and their products in float32, per block of rows, rounded once
      const at::Tensor A32 = A.to(at::kFloat);
      const at::Tensor B32 = B.to(at::kFloat);
      at::Tensor ga = mask[1] ? at::zeros(A32.sizes(), A32.options()) : at::Tensor();
      at::Tensor gb = mask[2] ? at::zeros(B32.sizes(), B32.options()) : at::Tensor();
      at::Tensor gsum = mask[3] ? at::zeros({}, A32.options()) : at::Tensor();
      at::Tensor gx_seg;
      if (mask[0])
        gx_seg = sorted ? gxs.narrow(0, groups.start[k], groups.length[k])
                        : grad_x.narrow(0, groups.start[k], groups.length[k]);
      for (int64_t r0 = 0; r0 < xk.size(0); r0 += kWideRows) {
        const int64_t rows = std::min(kWideRows, xk.size(0) - r0);
        const at::Tensor xb = xk.narrow(0, r0, rows).to(at::kFloat);
        const at::Tensor gbk = gk.narrow(0, r0, rows).to(at::kFloat);
        at::Tensor gu;
        if (mask[0] || mask[1] || mask[3]) gu = at::mm(gbk, B32);
        at::Tensor u;
        if (mask[2] || mask[3]) u = at::mm(xb, A32.t());
        if (mask[0]) {
          at::Tensor gxb = gx_seg.narrow(0, r0, rows);
          at::Tensor t = at::mm(gu, A32).mul_(s);
          if (!sorted) t.add_(gxb);
          gxb.copy_(t);
        }
        if (mask[1]) ga.addmm_(gu.t(), xb, /*beta=*/1, /*alpha=*/s);
        if (mask[2]) gb.addmm_(gbk.t(), u, /*beta=*/1, /*alpha=*/s);
        if (mask[3]) gsum.add_(gu.mul(u).sum());
      }
      if (mask[1]) grad_A[a].copy_(ga);
      if (mask[2]) grad_B[a].copy_(gb);
      if (mask[3]) grad_s[a].copy_(gsum);
      return;
    }
    at::Tensor gu;  // (M_a, r)
    if (mask[0] || mask[1] || mask[3]) gu = at::mm(gk, B);
    at::Tensor u;  // (M_a, r)
    if (mask[2] || mask[3]) u = at::mm(xk, A.t());
    if (mask[0]) {
      if (sorted) {
        at::Tensor gx = gxs.narrow(0, groups.start[k], groups.length[k]);
        at::addmm_out(gx, gx, gu, A, /*beta=*/0, /*alpha=*/s);
      } else {
        grad_x.narrow(0, groups.start[k], groups.length[k]).addmm_(gu, A, /*beta=*/1, /*alpha=*/s);
      }
    }
    if (mask[1]) {
      at::Tensor ga = grad_A[a];
      at::addmm_out(ga, ga, gu.t(), xk, /*beta=*/0, /*alpha=*/s);
    }
    if (mask[2]) {
      at::Tensor gb = grad_B[a];
      at::addmm_out(gb, gb, gk.t(), u, /*beta=*/0, /*alpha=*/s);
    }
    if (mask[3]) grad_s[a].copy_(gu.to(acc).mul(u.to(acc)).sum());
  });
  if (sorted && mask[0]) grad_x.index_add_(0, groups.perm, gxs);
  return {grad_x, grad_A, grad_B, mask[3] ? grad_s.to(scales.scalar_type()) : grad_s};
}

}  // namespace lowrank
