// CUDA kernels of lowrank::lora_linear: y = x W^T + scale (x A^T) B^T (+ bias).
//
// Two regimes (design and roofline in csrc/cuda/README.md):
// * Decode, M <= 16 rows: the op is bound by reading W once from HBM. Two launches:
//     1. shrink: u_partial[s] = x A^T over K-slice s (split-K so that enough warps stream A),
//     2. stream: one warp per output feature n reads W[n, :] with 16-byte loads, dots it with the M rows
//        of x, adds scale * u[m, :] . B[n, :] and bias[n] before the warp reduction, writes y[:, n].
//   u (M x r, float32) is summed from the partials into shared memory once per block.
// * Larger M: the dense product stays on cuBLAS tensor cores (the composite path of lora_linear.h):
//   y = bias + scale (x A^T) B^T written by a K=r GEMM, then the base GEMM accumulates into y (beta = 1).
//
// Only ATen headers here (never torch/extension.h): they compile far faster under nvcc.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "lora_linear.h"
#include "stream_kernel.cuh"

namespace lowrank {
namespace {

constexpr int64_t kMaxSmallM = 16;      // rows handled by the streaming kernels
constexpr int64_t kMaxLoraSmem = 4096;  // floats of u (M * r) staged in shared memory: 16 KiB
using streaming::aligned16;
using streaming::ceil_div;
using streaming::kThreads;
using streaming::kWarpsPerBlock;
using streaming::stream_rows_kernel;
using streaming::stream_rows_per_warp;

template <typename T, int MT, int VEC>
void launch_small_m(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                    float scale, const T* bias, at::Tensor& y) {
  const int M = static_cast<int>(x2.size(0));
  const int64_t K = x2.size(1);
  const int64_t N = weight.size(0);
  const int r = static_cast<int>(lora_A.size(0));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor partials = streaming::launch_shrink<T, MT>(x2, lora_A);  // split-K u = x A^T
  const int64_t slices = partials.size(0);
  const T* x_ptr = x2.const_data_ptr<T>();

  const size_t smem = static_cast<size_t>(M) * r * sizeof(float);
  constexpr int kRows = stream_rows_per_warp<MT>();
  stream_rows_kernel<T, T, MT, VEC, kRows, true>
      <<<dim3(static_cast<unsigned>(ceil_div(N, kWarpsPerBlock * kRows)), 1, 1), kThreads, smem, stream>>>(
          x_ptr, weight.const_data_ptr<T>(), y.mutable_data_ptr<T>(), M, N, K, K, partials.const_data_ptr<float>(),
          static_cast<int>(slices), lora_B.const_data_ptr<T>(), r, scale, bias);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MT>
void dispatch_vec(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                  float scale, const T* bias, at::Tensor& y) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector_ok = x2.size(1) % kVec == 0 && aligned16(x2.const_data_ptr()) &&
                         aligned16(weight.const_data_ptr()) && aligned16(lora_A.const_data_ptr());
  if (vector_ok) {
    launch_small_m<T, MT, kVec>(x2, weight, lora_A, lora_B, scale, bias, y);
  } else {
    launch_small_m<T, MT, 1>(x2, weight, lora_A, lora_B, scale, bias, y);
  }
}

template <typename T>
void lora_linear_small_m(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const T* bias_ptr = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  const float s = static_cast<float>(scale);
  const int64_t M = x2.size(0);
  if (M <= 1) {
    dispatch_vec<T, 1>(x2, weight, lora_A, lora_B, s, bias_ptr, y);
  } else if (M <= 2) {
    dispatch_vec<T, 2>(x2, weight, lora_A, lora_B, s, bias_ptr, y);
  } else if (M <= 4) {
    dispatch_vec<T, 4>(x2, weight, lora_A, lora_B, s, bias_ptr, y);
  } else if (M <= 8) {
    dispatch_vec<T, 8>(x2, weight, lora_A, lora_B, s, bias_ptr, y);
  } else {
    dispatch_vec<T, 16>(x2, weight, lora_A, lora_B, s, bias_ptr, y);
  }
}

}  // namespace

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_args(x, weight, lora_A, lora_B, bias, /*check_devices=*/true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor x2 = x.reshape({shape.rows, shape.in_features});
  const int64_t M = x2.size(0);
  if (M == 0 || shape.out_features == 0) return at::empty(shape.out_sizes, x.options());
  if (scale == 0.0) return lora_linear_base_only(x2, weight, bias, shape.out_sizes);  // as on the CPU

  // A weight that is not row-major (a transposed view, e.g. a GPT-2 Conv1D weight stored (in, out)) goes to
  // cuBLAS, which reads it in place: the streaming kernels would need a copy of W on every call.
  const bool small_m = M <= kMaxSmallM && shape.in_features > 0 && M * shape.rank <= kMaxLoraSmem &&
                       x.scalar_type() != at::kDouble && weight.is_contiguous();
  if (!small_m) return lora_linear_composite(x2, weight, lora_A, lora_B, scale, bias, shape.out_sizes);

  x2 = x2.contiguous();
  const at::Tensor& w = weight;  // row-major (checked above)
  const at::Tensor a = lora_A.contiguous();
  const at::Tensor b = lora_B.contiguous();
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty(shape.out_sizes, x.options());  // contiguous: the kernels see it as (M, out)
  AT_DISPATCH_SWITCH(
      x.scalar_type(), "lora_linear_cuda",
      AT_DISPATCH_CASE(at::kFloat, [&] { lora_linear_small_m<float>(x2, w, a, b, scale, bias_c, y); }) AT_DISPATCH_CASE(
          at::kHalf, [&] { lora_linear_small_m<at::Half>(x2, w, a, b, scale, bias_c, y); })
          AT_DISPATCH_CASE(at::kBFloat16, [&] { lora_linear_small_m<at::BFloat16>(x2, w, a, b, scale, bias_c, y); }));
  return y;
}

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { m.impl("lora_linear", &lora_linear_cuda); }

}  // namespace lowrank
