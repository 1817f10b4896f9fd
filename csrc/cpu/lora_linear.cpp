// CPU kernel of lowrank::lora_linear: y = x W^T + scale (x A^T) B^T (+ bias).
//
// The work is two BLAS calls of the right shapes (MKL/OpenBLAS through ATen): the rank-r LoRA term is
// written first (with the bias), then the base GEMM accumulates into it with beta = 1. That keeps the op
// within a few percent of F.linear: the extra FLOPs are 2 M r (in + out), r/out of the base, and no
// (M x out) temporary is written or read beyond what F.linear with a bias does (see benchmarks/bench_lora.py).
#include "lora_linear.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace lowrank {

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_args(x, weight, lora_A, lora_B, bias, /*check_devices=*/true);
  at::Tensor x2 = x.reshape({shape.rows, shape.in_features});
  if (x2.size(0) == 0 || shape.out_features == 0) return at::empty(shape.out_sizes, x.options());
  return lora_linear_composite(x2, weight, lora_A, lora_B, scale, bias, shape.out_sizes);
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("lora_linear", &lora_linear_cpu); }

}  // namespace lowrank
