// Shared by every backend of lowrank::lora_linear_quantized: argument checks and output shape.
//
// y = x (weight_scale[:, None] * qweight)^T + scale (x A^T) B^T (+ bias), with qweight int8 or float8_e4m3fn
// (out, in) and weight_scale float32 (out,): a LoRA adapter over a weight-only quantized frozen base.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "shape_int.h"

namespace lowrank {

using LoraQuantizedShape = LoraLinearShapeT<int64_t>;  // the same sizes as lora_linear's

inline bool is_quantized_weight_dtype(at::ScalarType t) { return t == at::kChar || t == at::ScalarType::Float8_e4m3fn; }

// Validates the arguments of lora_linear_quantized and returns the problem sizes. Shape and device errors
// raise ValueError, dtype errors TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), each naming the
// argument. Devices are compared in every kernel, the Meta one included: a meta tensor mixed with real ones
// is an error, not a silent meta result. Int: int64_t in the real kernels, c10::SymInt in the Meta kernel
// (shape_int.h).
template <typename Int = int64_t>
inline LoraLinearShapeT<Int> check_lora_linear_quantized_args(const at::Tensor& x, const at::Tensor& qweight,
                                                              const at::Tensor& weight_scale, const at::Tensor& lora_A,
                                                              const at::Tensor& lora_B,
                                                              const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "lora_linear_quantized";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK_VALUE(qweight.dim() == 2, op, ": qweight must be 2-D (out_features, in_features), got ", qweight.dim(),
                    "-D shape ", sizes_of<Int>(qweight));
  TORCH_CHECK_VALUE(weight_scale.dim() == 1, op, ": weight_scale must be 1-D (out_features,), got shape ",
                    sizes_of<Int>(weight_scale));
  TORCH_CHECK_VALUE(lora_A.dim() == 2, op, ": lora_A must be 2-D (r, in_features), got ", lora_A.dim(), "-D shape ",
                    sizes_of<Int>(lora_A));
  TORCH_CHECK_VALUE(lora_B.dim() == 2, op, ": lora_B must be 2-D (out_features, r), got ", lora_B.dim(), "-D shape ",
                    sizes_of<Int>(lora_B));
  const Int in = size_of<Int>(x, -1);
  const Int out = size_of<Int>(qweight, 0);
  const Int r = size_of<Int>(lora_A, 0);
  TORCH_CHECK_VALUE(size_of<Int>(qweight, 1) == in, op, ": qweight has shape ", sizes_of<Int>(qweight),
                    " but x has in_features=", in, "; expected qweight of shape (out_features, ", in, ")");
  TORCH_CHECK_VALUE(size_of<Int>(weight_scale, 0) == out, op, ": weight_scale has shape ", sizes_of<Int>(weight_scale),
                    " but qweight has out_features=", out, "; expected (", out, ",)");
  TORCH_CHECK_VALUE(r >= 1, op, ": lora_A must have rank r >= 1 rows, got shape ", sizes_of<Int>(lora_A));
  TORCH_CHECK_VALUE(size_of<Int>(lora_A, 1) == in, op, ": lora_A has shape ", sizes_of<Int>(lora_A),
                    " but x has in_features=", in, "; expected lora_A of shape (r, ", in, ")");
  TORCH_CHECK_VALUE(size_of<Int>(lora_B, 0) == out && size_of<Int>(lora_B, 1) == r, op, ": lora_B has shape ",
                    sizes_of<Int>(lora_B), " but expected (out_features, r) = (", out, ", ", r, ")");
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16, op,
                   ": x must be float32, float64, float16 or bfloat16, got ", xt);
  TORCH_CHECK_TYPE(is_quantized_weight_dtype(qweight.scalar_type()), op,
                   ": qweight must be int8 or float8_e4m3fn (see lowrank.quantize_weight), got ",
                   qweight.scalar_type());
  TORCH_CHECK_TYPE(weight_scale.scalar_type() == at::kFloat, op, ": weight_scale must be float32, got ",
                   weight_scale.scalar_type());
  const auto check_same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == xt, op, ": ", name, " has dtype ", t.scalar_type(), " but x has dtype ", xt,
                     "; x, lora_A, lora_B and bias must share one dtype");
  };
  check_same_dtype(lora_A, "lora_A");
  check_same_dtype(lora_B, "lora_B");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && size_of<Int>(*bias, 0) == out, op, ": bias must have shape (", out,
                      ",), got ", sizes_of<Int>(*bias));
    check_same_dtype(*bias, "bias");
  }
  const auto check_same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                      "; all tensors must be on one device");
  };
  check_same_device(qweight, "qweight");
  check_same_device(weight_scale, "weight_scale");
  check_same_device(lora_A, "lora_A");
  check_same_device(lora_B, "lora_B");
  if (bias.has_value()) check_same_device(*bias, "bias");
  const auto x_sizes = sizes_of<Int>(x);
  std::vector<Int> out_sizes(x_sizes.begin(), x_sizes.end());
  out_sizes.back() = out;
  Int rows = 1;
  for (size_t d = 0; d + 1 < out_sizes.size(); ++d) rows *= out_sizes[d];
  return {rows, in, out, r, std::move(out_sizes)};
}

}  // namespace lowrank
