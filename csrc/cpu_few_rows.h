// What the few-row (decode) CPU kernels of lora_linear and lora_linear_quantized share: the down projection
// u = scale * x A^T of a handful of rows, threaded over the rank only when it is large enough to pay for the
// hand-off to other threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lowrank {

// u (M x r, Acc) = scale * x A^T; x (M x K, X), A (r x K, T), both contiguous. Acc is the accumulation type
// (float for fp32/bf16/fp16 inputs, double for double). Below 2^18 products (e.g. one row at r = 16,
// in = 4096) it runs in the calling thread: a parallel region costs more than it saves there.
template <typename Acc, typename X, typename T>
std::vector<Acc> scaled_down_projection(const X* x, const T* A, int64_t M, int64_t K, int64_t r, double scale) {
  std::vector<Acc> u(static_cast<size_t>(M * r));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, M * K));
  at::parallel_for(0, r, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* a = A + j * K;
      for (int64_t m = 0; m < M; ++m) {
        const X* xm = x + m * K;
        Acc sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; ++k) sum += static_cast<Acc>(xm[k]) * static_cast<Acc>(a[k]);
        u[m * r + j] = sum * static_cast<Acc>(scale);
      }
    }
  });
  return u;
}

}  // namespace lowrank
