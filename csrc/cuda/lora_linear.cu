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

namespace lowrank {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int64_t kMaxSmallM = 16;      // rows handled by the streaming kernels
constexpr int64_t kMaxLoraSmem = 4096;  // floats of u (M * r) staged in shared memory: 16 KiB
constexpr int kUnroll = 4;              // 16-byte W loads in flight per lane (one W row per warp)

template <typename T>
__device__ __forceinline__ float to_float(T value) {
  return static_cast<float>(value);
}

// Loads VEC consecutive elements at p and widens them to float. When VEC elements are 16 bytes the load
// is one 128-bit transaction (the caller guarantees 16-byte alignment); otherwise element by element.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(values[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(p[i]);
  }
}

// One warp per ROWS consecutive rows n of `rows` (N x K, row-major):
//   out[z][m][n] = sum_{k in slice z} x[m, k] rows[n, k]   for the M (<= MT) rows of x (M x K, row-major).
// Slice z covers [z * k_chunk, min(K, (z+1) * k_chunk)). Each 16-byte vector of x is loaded once per warp
// and used for ROWS rows from registers, so x is re-read N / ROWS times in all rather than N times (at
// M = 16 that keeps the x reads within L1 bandwidth while W streams from HBM).
// With FUSE (a single slice), the LoRA expand and the bias join before the warp reduction:
//   out[m][n] += sum_j (scale * u[m, j]) B[n, j] + bias[n],  u = sum over the num_partials slices.
// Preconditions (checked on the host): K % VEC == 0, k_chunk % VEC == 0, 16-byte aligned x and rows when
// VEC * sizeof(T) == 16, M <= MT, M * r <= kMaxLoraSmem.
// Blocks per SM the register budget must allow: 2 for the 4-rows-per-warp variants (M >= 8), whose 4 x MT
// accumulators would otherwise take up to ~168 registers and leave one 256-thread block per SM.
template <int ROWS>
constexpr int stream_min_blocks() {
  return ROWS >= 4 ? 2 : 1;
}

template <typename T, typename OutT, int MT, int VEC, int ROWS, bool FUSE>
__global__ void __launch_bounds__(kThreads, stream_min_blocks<ROWS>())
    stream_rows_kernel(const T* __restrict__ x, const T* __restrict__ rows, OutT* __restrict__ out, int M, int64_t N,
                       int64_t K, int64_t k_chunk, const float* __restrict__ u_partials, int num_partials,
                       const T* __restrict__ lora_B, int r, float scale, const T* __restrict__ bias) {
  extern __shared__ float u_shared[];  // FUSE only: scale * u, M x r
  if constexpr (FUSE) {
    const int mr = M * r;
    for (int i = threadIdx.x; i < mr; i += blockDim.x) {
      float sum = 0.f;
      for (int p = 0; p < num_partials; ++p) sum += u_partials[static_cast<int64_t>(p) * mr + i];
      u_shared[i] = sum * scale;
    }
    __syncthreads();  // the only barrier: warps past the end of N leave after it
  }
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * ROWS;
  if (n0 >= N) return;
  // Rows past N (the last warp's tail) recompute row N - 1 and are never written.
  int64_t n_row[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) n_row[i] = n0 + i < N ? n0 + i : N - 1;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < K ? k_begin + k_chunk : K;

  float acc[ROWS][MT];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] = 0.f;
  }

  // 16-byte W loads in flight per lane per iteration: ROWS * kUnrollHere = 4 for every ROWS (with 2 blocks
  // per SM at ROWS = 4, as many bytes in flight per SM as one block with 8 loads per lane).
  constexpr int kUnrollHere = ROWS >= 4 ? 1 : (ROWS >= 2 ? 2 : kUnroll);
  constexpr int64_t kStep = 32 * VEC;  // elements one warp covers per vector load
  int64_t k = k_begin + static_cast<int64_t>(lane) * VEC;
  for (; k + (kUnrollHere - 1) * kStep < k_end; k += kUnrollHere * kStep) {
    float w[ROWS][kUnrollHere][VEC];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
      for (int j = 0; j < kUnrollHere; ++j) load_as_float<T, VEC>(rows + n_row[i] * K + k + j * kStep, w[i][j]);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const T* x_row = x + static_cast<int64_t>(m) * K + k;
#pragma unroll
        for (int j = 0; j < kUnrollHere; ++j) {
          float xv[VEC];
          load_as_float<T, VEC>(x_row + j * kStep, xv);
#pragma unroll
          for (int i = 0; i < ROWS; ++i) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[i][m] = fmaf(w[i][j][v], xv[v], acc[i][m]);
          }
        }
      }
    }
  }
  for (; k < k_end; k += kStep) {  // tail: fewer than kUnrollHere vectors left for this lane
    float w[ROWS][VEC];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) load_as_float<T, VEC>(rows + n_row[i] * K + k, w[i]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xv[VEC];
        load_as_float<T, VEC>(x + static_cast<int64_t>(m) * K + k, xv);
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][m] = fmaf(w[i][v], xv[v], acc[i][m]);
        }
      }
    }
  }

  if constexpr (FUSE) {
    for (int j = lane; j < r; j += 32) {
      float b[ROWS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) b[i] = to_float(lora_B[n_row[i] * r + j]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          const float u = u_shared[m * r + j];
#pragma unroll
          for (int i = 0; i < ROWS; ++i) acc[i][m] = fmaf(u, b[i], acc[i][m]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc[i][m] += __shfl_xor_sync(0xffffffffu, acc[i][m], offset);
    }
  }

  OutT* out_slice = out + static_cast<int64_t>(blockIdx.z) * M * N;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (lane == m && m < M) {  // lane m writes row m: every lane holds every reduced sum
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        if (n0 + i < N) {
          float value = acc[i][m];
          if constexpr (FUSE) {
            if (bias != nullptr) value += to_float(bias[n0 + i]);
          }
          out_slice[static_cast<int64_t>(m) * N + n0 + i] = static_cast<OutT>(value);
        }
      }
    }
  }
}

// W rows per warp in the streaming kernel: enough to keep re-reads of x (M vectors per W vector / ROWS)
// well under the L1 bandwidth, few enough to keep the accumulators (ROWS x MT) in registers.
template <int MT>
constexpr int stream_rows_per_warp() {
  return MT >= 8 ? 4 : (MT >= 2 ? 2 : 1);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int MT, int VEC>
void launch_small_m(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                    float scale, const T* bias, at::Tensor& y) {
  const int M = static_cast<int>(x2.size(0));
  const int64_t K = x2.size(1);
  const int64_t N = weight.size(0);
  const int r = static_cast<int>(lora_A.size(0));
  const auto stream = at::cuda::getCurrentCUDAStream();

  // Shrink with split-K: about two waves of warps over the SMs, each slice at least one warp-wide step.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_slices = ceil_div(2 * sms * kWarpsPerBlock, r);
  const int64_t max_slices = std::max<int64_t>(1, ceil_div(K, 32 * VEC));
  int64_t slices = std::min<int64_t>({want_slices, max_slices, 65535});
  const int64_t k_chunk = ceil_div(ceil_div(K, slices), VEC) * VEC;
  slices = ceil_div(K, k_chunk);
  at::Tensor partials = at::empty({slices, M, r}, x2.options().dtype(at::kFloat));

  const T* x_ptr = x2.const_data_ptr<T>();
  stream_rows_kernel<T, float, MT, VEC, 1, false>
      <<<dim3(static_cast<unsigned>(ceil_div(r, kWarpsPerBlock)), 1, static_cast<unsigned>(slices)), kThreads, 0,
         stream>>>(x_ptr, lora_A.const_data_ptr<T>(), partials.mutable_data_ptr<float>(), M, r, K, k_chunk, nullptr, 0,
                   nullptr, 0, 0.f, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

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

  const bool small_m =
      M <= kMaxSmallM && shape.in_features > 0 && M * shape.rank <= kMaxLoraSmem && x.scalar_type() != at::kDouble;
  if (!small_m) return lora_linear_composite(x2, weight, lora_A, lora_B, scale, bias, shape.out_sizes);

  x2 = x2.contiguous();
  const at::Tensor w = weight.contiguous();
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
