// What the decode (small-M) CUDA kernels of lora_linear and lora_linear_quantized share: the warp-per-row
// streaming kernel (used as the split-K shrink u = x A^T by both ops, and as lora_linear's fused W pass), its
// launch-bound rule and the split-K launch. Only ATen headers (never torch/extension.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace lowrank {
namespace streaming {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kUnroll = 4;  // 16-byte W loads in flight per lane (one W row per warp)

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

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K shrink: partials[s] = x A^T over K-slice s, (slices, M, r) fp32, with about two waves of warps
// over the SMs, each slice at least one warp-wide step. 16-byte loads when x and A are 16-byte aligned and
// K is a multiple of the vector width; scalar loads otherwise. Returns the partials tensor.
template <typename T, int MT>
at::Tensor launch_shrink(const at::Tensor& x2, const at::Tensor& lora_A) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector_ok = x2.size(1) % kVec == 0 && aligned16(x2.const_data_ptr()) && aligned16(lora_A.const_data_ptr());
  const int vec = vector_ok ? kVec : 1;
  const int M = static_cast<int>(x2.size(0));
  const int64_t K = x2.size(1);
  const int r = static_cast<int>(lora_A.size(0));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_slices = ceil_div(2 * sms * kWarpsPerBlock, r);
  const int64_t max_slices = std::max<int64_t>(1, ceil_div(K, 32 * vec));
  int64_t slices = std::min<int64_t>({want_slices, max_slices, 65535});
  const int64_t k_chunk = ceil_div(ceil_div(K, slices), vec) * vec;
  slices = ceil_div(K, k_chunk);
  at::Tensor partials = at::empty({slices, M, r}, x2.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(ceil_div(r, kWarpsPerBlock)), 1, static_cast<unsigned>(slices));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = x2.const_data_ptr<T>();
  const T* a = lora_A.const_data_ptr<T>();
  float* out = partials.mutable_data_ptr<float>();
  if (vector_ok) {
    stream_rows_kernel<T, float, MT, kVec, 1, false>
        <<<grid, kThreads, 0, stream>>>(x, a, out, M, r, K, k_chunk, nullptr, 0, nullptr, 0, 0.f, nullptr);
  } else {
    stream_rows_kernel<T, float, MT, 1, 1, false>
        <<<grid, kThreads, 0, stream>>>(x, a, out, M, r, K, k_chunk, nullptr, 0, nullptr, 0, 0.f, nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

}  // namespace streaming
}  // namespace lowrank
