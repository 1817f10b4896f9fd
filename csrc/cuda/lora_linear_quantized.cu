// CUDA kernels of lowrank::lora_linear_quantized:
//   y = x (s[:, None] * Q)^T + scale (x A^T) B^T (+ bias),   Q int8 or float8_e4m3fn (out, in), s float32 (out,).
//
// * Decode (M <= 16 rows, M * r <= 4096, Q row-contiguous): bound by reading Q once. Two launches, as in
//   lora_linear.cu:
//     1. shrink: u_partial[z] = x A^T over K-slice z (one warp per row of A and slice; fp32 workspace),
//     2. stream: one warp per ROWS output rows n reads Q[n, :] with 16-byte loads (16 weights per lane and
//        load), widens them in registers (int8: cvt; fp8: the hardware e4m3 -> half2 conversion), dots them
//        with the M rows of x, multiplies its partial by s[n] once after the K loop, adds
//        scale * u[m, :] . B[n, :] (lanes split r) before the warp reduction; lane m adds the bias, writes y.
//   Q is 1 byte per weight: half the bytes of the bf16 op's W, so the pass should take about half as long.
// * Larger M, or a transposed Q (the backward's dx): dequantize row blocks of Q to the activation dtype in a
//   temporary (kBlockRows x in, ATen element-wise ops) and multiply on cuBLAS tensor cores into the slice of
//   y that already holds bias + LoRA term (beta = 1). The dequantized weight never exists whole; the extra
//   traffic is one write + read of each block (2 bytes per weight for bf16) against a compute-bound GEMM.
//
// Only ATen headers here (never torch/extension.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lora_linear_quantized.h"
#include "stream_kernel.cuh"

namespace lowrank {
namespace {

using streaming::aligned16;
using streaming::ceil_div;
using streaming::kThreads;
using streaming::kWarpsPerBlock;
using streaming::stream_min_blocks;
using streaming::stream_rows_per_warp;
using streaming::to_float;

constexpr int64_t kMaxSmallM = 16;
constexpr int64_t kMaxLoraSmem = 4096;  // floats of scale * u staged in shared memory (16 KiB)
constexpr int kQVec = 16;               // weights per 16-byte load of Q
constexpr int64_t kBlockRows = 2048;    // rows of Q dequantized per block on the large-M path

// N consecutive elements of x (type T) at p as floats; 16-byte loads when ALIGNED (caller guarantees it).
template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void load_x(const T* __restrict__ p, float (&out)[N]) {
  constexpr int kPer = 16 / sizeof(T);
  if constexpr (ALIGNED && N % kPer == 0) {
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + c * kPer));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[c * kPer + i] = to_float(v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(p[i]);
  }
}

// 16 stored weights from a 16-byte word, widened to float.
__device__ __forceinline__ void widen16(const uint4& raw, float (&w)[kQVec], int8_t /*tag*/) {
  const int8_t* v = reinterpret_cast<const int8_t*>(&raw);
#pragma unroll
  for (int i = 0; i < kQVec; ++i) w[i] = static_cast<float>(v[i]);
}
__device__ __forceinline__ void widen16(const uint4& raw, float (&w)[kQVec], uint8_t /*tag*/) {
  const __nv_fp8x2_storage_t* v = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int i = 0; i < kQVec / 2; ++i) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v[i], __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}

template <typename S>
__device__ __forceinline__ float widen1(S v);
template <>
__device__ __forceinline__ float widen1<int8_t>(int8_t v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float widen1<uint8_t>(uint8_t v) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3);
  return __half2float(*reinterpret_cast<const __half*>(&h));
}

// Blocks per SM the register bound asks for: 2, as lora_linear's stream kernel (stream_min_blocks), except at
// M = 16 with 16-byte loads, whose 4 x 16 accumulators plus 4 x 16 widened weights do not fit 128 registers
// (ptxas spilled ~300 bytes there): that variant keeps one block per SM (up to 226 registers, no spills).
template <int MT, int ROWS, int VEC>
constexpr int quantized_min_blocks() {
  return MT * VEC >= 256 ? 1 : stream_min_blocks<ROWS>();
}

// Stream: one warp per ROWS rows of Q (N x K, row-major, 1 byte per weight). VEC is kQVec (16-byte loads of
// Q, 16-byte loads of x: needs K % 16 == 0 and 16-byte aligned Q, x) or 1 (scalar loads, any K).
template <typename T, typename S, int MT, int ROWS, int VEC>
__global__ void __launch_bounds__(kThreads, quantized_min_blocks<MT, ROWS, VEC>())
    stream_quantized_kernel(const T* __restrict__ x, const S* __restrict__ q, const float* __restrict__ wscale,
                            T* __restrict__ y, int M, int64_t N, int64_t K, const float* __restrict__ u_partials,
                            int num_partials, const T* __restrict__ lora_B, int r, float scale,
                            const T* __restrict__ bias) {
  extern __shared__ float u_shared[];  // scale * u, M x r
  const int mr = M * r;
  for (int i = threadIdx.x; i < mr; i += blockDim.x) {
    float sum = 0.f;
    for (int p = 0; p < num_partials; ++p) sum += u_partials[static_cast<int64_t>(p) * mr + i];
    u_shared[i] = sum * scale;
  }
  __syncthreads();  // the only barrier: warps past the end of N leave after it
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * ROWS;
  if (n0 >= N) return;
  int64_t n_row[ROWS];  // rows past N recompute row N - 1 and are never written
#pragma unroll
  for (int i = 0; i < ROWS; ++i) n_row[i] = n0 + i < N ? n0 + i : N - 1;

  float acc[ROWS][MT];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] = 0.f;
  }
  // U vectors of each row in flight per lane (fewer when ROWS rows already give ROWS loads per step).
  constexpr int U = ROWS >= 4 ? 1 : (ROWS >= 2 ? 2 : 4);
  constexpr int64_t kStep = 32 * VEC;
  const auto accumulate = [&](int64_t k, auto units) {
    constexpr int kU = decltype(units)::value;
    float w[ROWS][kU][VEC];
    if constexpr (VEC == kQVec) {
      uint4 raw[ROWS][kU];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
#pragma unroll
        for (int j = 0; j < kU; ++j)
          raw[i][j] = __ldg(reinterpret_cast<const uint4*>(q + n_row[i] * K + k + j * kStep));
      }
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
#pragma unroll
        for (int j = 0; j < kU; ++j) widen16(raw[i][j], w[i][j], S{});
      }
    } else {
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
#pragma unroll
        for (int j = 0; j < kU; ++j) w[i][j][0] = widen1<S>(q[n_row[i] * K + k + j * kStep]);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
#pragma unroll
        for (int j = 0; j < kU; ++j) {
          float xv[VEC];
          load_x<T, VEC, VEC == kQVec>(x + static_cast<int64_t>(m) * K + k + j * kStep, xv);
#pragma unroll
          for (int i = 0; i < ROWS; ++i) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[i][m] = fmaf(w[i][j][v], xv[v], acc[i][m]);
          }
        }
      }
    }
  };
  int64_t k = static_cast<int64_t>(lane) * VEC;
  for (; k + (U - 1) * kStep < K; k += U * kStep) accumulate(k, std::integral_constant<int, U>{});
  for (; k < K; k += kStep) accumulate(k, std::integral_constant<int, 1>{});
  // s[n] once per row, then the LoRA expand joins before the reduction.
  float b[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const float s = wscale[n_row[i]];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] *= s;
  }
  for (int j = lane; j < r; j += 32) {
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
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc[i][m] += __shfl_xor_sync(0xffffffffu, acc[i][m], offset);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (lane == m && m < M) {
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        if (n0 + i < N) {
          float value = acc[i][m];
          if (bias != nullptr) value += to_float(bias[n0 + i]);
          y[static_cast<int64_t>(m) * N + n0 + i] = static_cast<T>(value);
        }
      }
    }
  }
}

template <typename T, typename S, int MT>
void launch_small_m(const at::Tensor& x2, const at::Tensor& q, const at::Tensor& ws, const at::Tensor& a,
                    const at::Tensor& b, float scale, const T* bias, at::Tensor& y) {
  const int M = static_cast<int>(x2.size(0));
  const int64_t K = x2.size(1);
  const int64_t N = q.size(0);
  const int r = static_cast<int>(a.size(0));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor partials = streaming::launch_shrink<T, MT>(x2, a);  // split-K u = x A^T
  const int64_t slices = partials.size(0);
  const T* x_ptr = x2.const_data_ptr<T>();
  constexpr int kRows = stream_rows_per_warp<MT>();
  const size_t smem = static_cast<size_t>(M) * r * sizeof(float);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarpsPerBlock * kRows)));
  const S* q_ptr = reinterpret_cast<const S*>(q.const_data_ptr());
  const bool vector_ok = K % kQVec == 0 && aligned16(q_ptr) && aligned16(x_ptr);
  if (vector_ok) {
    stream_quantized_kernel<T, S, MT, kRows, kQVec><<<grid, kThreads, smem, stream>>>(
        x_ptr, q_ptr, ws.const_data_ptr<float>(), y.mutable_data_ptr<T>(), M, N, K, partials.const_data_ptr<float>(),
        static_cast<int>(slices), b.const_data_ptr<T>(), r, scale, bias);
  } else {
    stream_quantized_kernel<T, S, MT, kRows, 1><<<grid, kThreads, smem, stream>>>(
        x_ptr, q_ptr, ws.const_data_ptr<float>(), y.mutable_data_ptr<T>(), M, N, K, partials.const_data_ptr<float>(),
        static_cast<int>(slices), b.const_data_ptr<T>(), r, scale, bias);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename S>
void small_m(const at::Tensor& x2, const at::Tensor& q, const at::Tensor& ws, const at::Tensor& a, const at::Tensor& b,
             double scale, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const T* bias_ptr = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  const float s = static_cast<float>(scale);
  const int64_t M = x2.size(0);
  if (M <= 1) {
    launch_small_m<T, S, 1>(x2, q, ws, a, b, s, bias_ptr, y);
  } else if (M <= 2) {
    launch_small_m<T, S, 2>(x2, q, ws, a, b, s, bias_ptr, y);
  } else if (M <= 4) {
    launch_small_m<T, S, 4>(x2, q, ws, a, b, s, bias_ptr, y);
  } else if (M <= 8) {
    launch_small_m<T, S, 8>(x2, q, ws, a, b, s, bias_ptr, y);
  } else {
    launch_small_m<T, S, 16>(x2, q, ws, a, b, s, bias_ptr, y);
  }
}

template <typename T>
void small_m_any(bool fp8, const at::Tensor& x2, const at::Tensor& q, const at::Tensor& ws, const at::Tensor& a,
                 const at::Tensor& b, double scale, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  if (fp8) {
    small_m<T, uint8_t>(x2, q, ws, a, b, scale, bias, y);
  } else {
    small_m<T, int8_t>(x2, q, ws, a, b, scale, bias, y);
  }
}

// Large M: y = bias + scale (x A^T) B^T by cuBLAS, then per block of rows of Q: dequantize to x's dtype
// (a kBlockRows x in temporary) and accumulate x Q_blk^T into y's column slice (beta = 1). scale == 0 (any M) also
// comes here: y = bias, the factors are never read.
at::Tensor large_m(const at::Tensor& x2, const at::Tensor& q, const at::Tensor& weight_scale, const at::Tensor& lora_A,
                   const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias,
                   const LoraQuantizedShape& shape) {
  const int64_t M = shape.rows, N = shape.out_features;
  at::Tensor y = at::empty(shape.out_sizes, x2.options());
  at::Tensor y2 = y.view({M, N});
  if (scale == 0.0) {  // the factors are not read: a non-finite adapter cannot leak in as 0 * inf
    if (bias.has_value()) {
      y2.copy_(bias->expand({M, N}));
    } else {
      y2.zero_();
    }
  } else {
    const at::Tensor u = at::mm(x2, lora_A.t());
    at::addmm_out(y2, bias.has_value() ? *bias : y2, u, lora_B.t(), /*beta=*/bias.has_value() ? 1 : 0,
                  /*alpha=*/scale);
  }
  const auto dtype = x2.scalar_type();
  for (int64_t n0 = 0; n0 < N; n0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, N - n0);
    const at::Tensor block =
        q.narrow(0, n0, rows).to(at::kFloat).mul(weight_scale.narrow(0, n0, rows).unsqueeze(1)).to(dtype);
    y2.narrow(1, n0, rows).addmm_(x2, block.t());
  }
  return y;
}

}  // namespace

at::Tensor lora_linear_quantized_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                      const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_quantized_args(x, qweight, weight_scale, lora_A, lora_B, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = shape.rows, K = shape.in_features, N = shape.out_features;
  if (M == 0 || N == 0) return at::empty(shape.out_sizes, x.options());
  at::Tensor x2 = x.reshape({M, K});
  const bool small = M <= kMaxSmallM && K > 0 && M * shape.rank <= kMaxLoraSmem && x.scalar_type() != at::kDouble &&
                     qweight.stride(1) == 1 && qweight.stride(0) == K && scale != 0.0;  // 0: base only
  if (!small) return large_m(x2, qweight, weight_scale, lora_A, lora_B, scale, bias, shape);
  x2 = x2.contiguous();
  const at::Tensor a = lora_A.contiguous();
  const at::Tensor b = lora_B.contiguous();
  const at::Tensor ws = weight_scale.contiguous();
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty(shape.out_sizes, x.options());
  const bool fp8 = qweight.scalar_type() == at::ScalarType::Float8_e4m3fn;
  AT_DISPATCH_SWITCH(
      x.scalar_type(), "lora_linear_quantized_cuda",
      AT_DISPATCH_CASE(at::kFloat, [&] { small_m_any<float>(fp8, x2, qweight, ws, a, b, scale, bias_c, y); })
          AT_DISPATCH_CASE(at::kHalf, [&] { small_m_any<at::Half>(fp8, x2, qweight, ws, a, b, scale, bias_c, y); })
              AT_DISPATCH_CASE(at::kBFloat16,
                               [&] { small_m_any<at::BFloat16>(fp8, x2, qweight, ws, a, b, scale, bias_c, y); }));
  return y;
}

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { m.impl("lora_linear_quantized", &lora_linear_quantized_cuda); }

}  // namespace lowrank
