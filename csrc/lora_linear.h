// Shared by every backend of lowrank::lora_linear: argument checks, output shape, and the composite
// (BLAS-backed) path that the CPU kernel and the large-M CUDA path both use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "shape_int.h"

namespace lowrank {

using LoraLinearShape = LoraLinearShapeT<int64_t>;

// Validates the arguments of lora_linear and returns the problem sizes. Shape and dtype errors raise
// ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) and name the argument.
// check_devices compares every tensor's device with x's (all backends and the Meta kernel do). Int: int64_t in the
// real kernels, c10::SymInt in the Meta kernel (shape_int.h: dynamic dimensions stay symbolic).
template <typename Int = int64_t>
inline LoraLinearShapeT<Int> check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                    const c10::optional<at::Tensor>& bias, bool check_devices) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "lora_linear: x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, "lora_linear: weight must be 2-D (out_features, in_features), got ",
                    weight.dim(), "-D shape ", sizes_of<Int>(weight));
  TORCH_CHECK_VALUE(lora_A.dim() == 2, "lora_linear: lora_A must be 2-D (r, in_features), got ", lora_A.dim(),
                    "-D shape ", sizes_of<Int>(lora_A));
  TORCH_CHECK_VALUE(lora_B.dim() == 2, "lora_linear: lora_B must be 2-D (out_features, r), got ", lora_B.dim(),
                    "-D shape ", sizes_of<Int>(lora_B));
  const Int in = size_of<Int>(x, -1);
  const Int out = size_of<Int>(weight, 0);
  const Int r = size_of<Int>(lora_A, 0);
  TORCH_CHECK_VALUE(size_of<Int>(weight, 1) == in, "lora_linear: weight has shape ", sizes_of<Int>(weight),
                    " but x has in_features=", in, "; expected weight of shape (out_features, ", in, ")");
  TORCH_CHECK_VALUE(r >= 1, "lora_linear: lora_A must have rank r >= 1 rows, got shape ", sizes_of<Int>(lora_A));
  TORCH_CHECK_VALUE(size_of<Int>(lora_A, 1) == in, "lora_linear: lora_A has shape ", sizes_of<Int>(lora_A),
                    " but x has in_features=", in, "; expected lora_A of shape (r, ", in, ")");
  TORCH_CHECK_VALUE(size_of<Int>(lora_B, 0) == out && size_of<Int>(lora_B, 1) == r, "lora_linear: lora_B has shape ",
                    sizes_of<Int>(lora_B), " but expected (out_features, r) = (", out, ", ", r, ")");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "lora_linear: x must be a floating-point tensor, got ",
                   x.scalar_type());
  const auto check_same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "lora_linear: ", name, " has dtype ", t.scalar_type(),
                     " but x has dtype ", x.scalar_type(), "; all tensors must share one dtype");
  };
  check_same_dtype(weight, "weight");
  check_same_dtype(lora_A, "lora_A");
  check_same_dtype(lora_B, "lora_B");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && size_of<Int>(*bias, 0) == out, "lora_linear: bias must have shape (", out,
                      ",), got ", sizes_of<Int>(*bias));
    check_same_dtype(*bias, "bias");
  }
  if (check_devices) {
    const auto check_same_device = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK_VALUE(t.device() == x.device(), "lora_linear: ", name, " is on ", t.device(), " but x is on ",
                        x.device(), "; all tensors must be on one device");
    };
    check_same_device(weight, "weight");
    check_same_device(lora_A, "lora_A");
    check_same_device(lora_B, "lora_B");
    if (bias.has_value()) check_same_device(*bias, "bias");
  }
  const auto x_sizes = sizes_of<Int>(x);
  std::vector<Int> out_sizes(x_sizes.begin(), x_sizes.end());
  out_sizes.back() = out;
  Int rows = 1;
  for (size_t d = 0; d + 1 < out_sizes.size(); ++d) rows *= out_sizes[d];
  return {rows, in, out, r, std::move(out_sizes)};
}

// y = scale * (x A^T) B^T + bias, then y += x W^T in place: the base GEMM accumulates (beta = 1) into the
// already-written LoRA term, so the (M x out) output is written by the small K=r product and then read and
// written once by the big GEMM -- the same memory passes as F.linear with a bias, and no extra (M x out)
// temporary. x2 is the (M, in) view of x; the result is allocated with the final shape `out_sizes` (a
// fresh tensor, not a view of one, so autograd and FSDP see an ordinary output).
inline at::Tensor lora_linear_composite(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias,
                                        const std::vector<int64_t>& out_sizes) {
  const at::Tensor u = at::mm(x2, lora_A.t());  // (M, r)
  at::Tensor y = at::empty(out_sizes, x2.options());
  at::Tensor y2 = y.view({x2.size(0), weight.size(0)});
  // y = bias + scale u B^T: the scale rides on the GEMM's alpha; without a bias beta = 0, so the
  // uninitialised y2 passed as `self` is never read.
  at::addmm_out(y2, bias.has_value() ? *bias : y2, u, lora_B.t(), /*beta=*/bias.has_value() ? 1 : 0,
                /*alpha=*/scale);
  y2.addmm_(x2, weight.t());
  return y;
}

// scale == 0: exactly the base layer, y = bias + x W^T. The factors are not read, so a non-finite adapter cannot
// leak in through 0 * inf (BLAS skips alpha = 0 products for some dtypes and devices, not for others; the
// streaming kernels would form 0 * inf). Every backend of lora_linear takes this path first.
inline at::Tensor lora_linear_base_only(const at::Tensor& x2, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const std::vector<int64_t>& out_sizes) {
  at::Tensor y = at::empty(out_sizes, x2.options());
  at::Tensor y2 = y.view({x2.size(0), weight.size(0)});
  if (bias.has_value()) {
    y2.copy_(bias->expand({x2.size(0), weight.size(0)}));
  } else {
    y2.zero_();
  }
  y2.addmm_(x2, weight.t());
  return y;
}

}  // namespace lowrank
