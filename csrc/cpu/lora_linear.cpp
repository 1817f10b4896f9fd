// CPU kernel of lowrank::lora_linear: y = x W^T + scale (x A^T) B^T (+ bias).
//
// The rank-r LoRA term (with the bias) is written into y first, then the base GEMM (MKL/OpenBLAS through
// ATen) accumulates into it with beta = 1: no (M x out) temporary is written or read beyond what F.linear
// with a bias does, and the extra FLOPs are 2 M r (in + out), r/out of the base (benchmarks/bench_lora.py).
//
// For a few rows (decode, M <= kStreamMaxRows) the LoRA term is computed here rather than by two BLAS
// calls: A and B arrive cold from memory (the previous layer's weights evicted them), and BLAS runs such
// thin products at a fraction of the memory bandwidth (measured: ~200 us for the two at 4096 x 4096,
// r = 16, i.e. 4% of the 4 ms base GEMV; ~100 us with the loops below, which split each factor over the
// threads).
#include "lora_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

namespace lowrank {
namespace {

constexpr int64_t kStreamMaxRows = 4;

// y[m, n] = bias[n] + scale * sum_j u[m, j] B[n, j], u = x A^T; x (M, K), A (r, K), B (N, r), y (M, N),
// all contiguous. Accumulates in float (double for double).
template <typename T>
void lora_term_few_rows(const T* x, const T* A, const T* B, const T* bias, T* y, int64_t M, int64_t K, int64_t r,
                        int64_t N, double scale) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> u(static_cast<size_t>(M * r));
  at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* a = A + j * K;
      for (int64_t m = 0; m < M; ++m) {
        const T* xm = x + m * K;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; ++k) sum += static_cast<acc_t>(xm[k]) * static_cast<acc_t>(a[k]);
        u[m * r + j] = sum * static_cast<acc_t>(scale);
      }
    }
  });
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* b = B + n * r;
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* um = u.data() + m * r;
        acc_t sum = bias != nullptr ? static_cast<acc_t>(bias[n]) : acc_t(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < r; ++j) sum += um[j] * static_cast<acc_t>(b[j]);
        y[m * N + n] = static_cast<T>(sum);
      }
    }
  });
}

}  // namespace

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_args(x, weight, lora_A, lora_B, bias, /*check_devices=*/true);
  at::Tensor x2 = x.reshape({shape.rows, shape.in_features});
  if (x2.size(0) == 0 || shape.out_features == 0) return at::empty(shape.out_sizes, x.options());
  if (shape.rows > kStreamMaxRows) {
    return lora_linear_composite(x2, weight, lora_A, lora_B, scale, bias, shape.out_sizes);
  }
  x2 = x2.contiguous();
  const at::Tensor a = lora_A.contiguous();
  const at::Tensor b = lora_B.contiguous();
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty(shape.out_sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_cpu", [&] {
    lora_term_few_rows<scalar_t>(
        x2.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        bias_c.has_value() ? bias_c->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), shape.rows,
        shape.in_features, shape.rank, shape.out_features, scale);
  });
  y.view({shape.rows, shape.out_features}).addmm_(x2, weight.t());
  return y;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("lora_linear", &lora_linear_cpu); }

}  // namespace lowrank
