// CPU kernel of lowrank::lora_linear_quantized:
//   y = x (s[:, None] * Q)^T + scale (x A^T) B^T (+ bias),   Q int8 or float8_e4m3fn (out, in), s float32 (out,).
//
// Few rows (decode, M <= kStreamMaxRows = 16, Q row-contiguous): ONE threaded pass over Q. x is widened to fp32 once
// (M x in, in cache), u = scale x A^T (M x r) is computed first, then the threads split the output rows: each
// reads its rows of Q (1 byte per weight), widens them in registers (int8: a cast; fp8: a 256-entry table),
// dots them with the M rows of x, applies s[n] once after the dot and adds u B[n]^T + bias[n] before the
// single store of y[:, n]. Four output rows per step give four independent accumulators (the FMA latency is
// hidden) and share each load of x; from M = 4 on, each widened vector of Q also feeds four rows of x
// (widening is paid once per four rows; up to 16 rows this single pass measured faster than dequantising
// blocks for BLAS on the shared 2-core test machine, where every extra barrier costs). On x86-64 with AVX2+FMA (checked
// at run time) the loop is written with intrinsics (8 weights per vector: vpmovsxbd + vcvtdq2ps for int8, a table
// gather for fp8); elsewhere a portable `omp simd` loop.
//
// More rows (or a transposed Q, as the backward passes): the product is compute-bound, so Q is dequantised in
// row blocks of kBlockRows into a per-thread fp32 buffer (fp64 for fp64 x), and a single-threaded BLAS GEMM
// multiplies x by each block into its slice of y, which already holds the LoRA term and bias (beta = 1); the
// threads split the blocks. The dequantised weight never exists whole: one kBlockRows x in buffer per thread
// (2 MB at in = 4096).
#include "lora_linear_quantized.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "cpu_few_rows.h"

namespace lowrank {
namespace {

constexpr int64_t kStreamMaxRows = 16;
constexpr int64_t kBlockRows = 128;

// Widening of one stored weight to float: int8 is a cast, float8_e4m3fn (stored as its byte) a table look-up.
struct Int8Widen {
  using stored_t = int8_t;
  const float* table;  // unused
  inline float operator()(int8_t v) const { return static_cast<float>(v); }
};
struct Fp8Widen {
  using stored_t = uint8_t;
  const float* table;  // 256 entries: the float value of each e4m3fn bit pattern
  inline float operator()(uint8_t v) const { return table[v]; }
};

const float* fp8_e4m3fn_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) {
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    }
    return t;
  }();
  return table.data();
}

// Dots of rows [n0, n1) of Q (stored row-major with leading dimension ldq) with the M rows of xf (M x K fp32),
// written to dots[(n - n0) * M + m]. Four rows of Q per step: four independent SIMD accumulators.
template <typename Widen>
__attribute__((always_inline)) inline void dot_rows_body(const float* xf, int64_t M, const typename Widen::stored_t* q,
                                                         int64_t ldq, int64_t K, int64_t n0, int64_t n1, Widen widen,
                                                         float* dots) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const auto* w0 = q + n * ldq;
    const auto* w1 = w0 + ldq;
    const auto* w2 = w1 + ldq;
    const auto* w3 = w2 + ldq;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xf + m * K;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xm[k];
        s0 += xv * widen(w0[k]);
        s1 += xv * widen(w1[k]);
        s2 += xv * widen(w2[k]);
        s3 += xv * widen(w3[k]);
      }
      float* d = dots + (n - n0) * M + m;
      d[0] = s0;
      d[M] = s1;
      d[2 * M] = s2;
      d[3 * M] = s3;
    }
  }
  for (; n < n1; ++n) {
    const auto* w = q + n * ldq;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xf + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += xm[k] * widen(w[k]);
      dots[(n - n0) * M + m] = s;
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#define LOWRANK_AVX2 __attribute__((target("avx2,fma")))
#define LOWRANK_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

// Eight stored weights at p widened to floats: int8 sign-extended and converted; fp8 through the table.
LOWRANK_AVX2_INLINE __m256 widen8(const int8_t* p, const float*) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
LOWRANK_AVX2_INLINE __m256 widen8(const uint8_t* p, const float* table) {
  return _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 4);
}
LOWRANK_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The same contract as dot_rows_body, with AVX2 intrinsics: per step four rows of Q, eight columns, four
// independent FMA chains; the last K % 8 columns in scalar code.
template <typename Widen>
LOWRANK_AVX2 void dot_rows_avx2(const float* xf, int64_t M, const typename Widen::stored_t* q, int64_t ldq, int64_t K,
                                int64_t n0, int64_t n1, Widen widen, float* dots) {
  const int64_t K8 = K - K % 8;
  // Groups of four rows of x: each widened vector of Q feeds four FMAs (two rows of Q per step: eight chains).
  const int64_t m4 = M - M % 4;
  for (int64_t mg = 0; mg < m4; mg += 4) {
    const float* x0 = xf + mg * K;
    const float* x1 = x0 + K;
    const float* x2 = x1 + K;
    const float* x3 = x2 + K;
    for (int64_t n = n0; n < n1; n += 2) {
      const bool pair = n + 1 < n1;
      const auto* wa = q + n * ldq;
      const auto* wb = pair ? wa + ldq : wa;  // an odd last row is computed twice and written once
      __m256 a[2][4];
      for (auto& row : a) {
        for (auto& v : row) v = _mm256_setzero_ps();
      }
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 va = widen8(wa + k, widen.table);
        const __m256 vb = widen8(wb + k, widen.table);
        const __m256 xv0 = _mm256_loadu_ps(x0 + k);
        const __m256 xv1 = _mm256_loadu_ps(x1 + k);
        const __m256 xv2 = _mm256_loadu_ps(x2 + k);
        const __m256 xv3 = _mm256_loadu_ps(x3 + k);
        a[0][0] = _mm256_fmadd_ps(xv0, va, a[0][0]);
        a[1][0] = _mm256_fmadd_ps(xv0, vb, a[1][0]);
        a[0][1] = _mm256_fmadd_ps(xv1, va, a[0][1]);
        a[1][1] = _mm256_fmadd_ps(xv1, vb, a[1][1]);
        a[0][2] = _mm256_fmadd_ps(xv2, va, a[0][2]);
        a[1][2] = _mm256_fmadd_ps(xv2, vb, a[1][2]);
        a[0][3] = _mm256_fmadd_ps(xv3, va, a[0][3]);
        a[1][3] = _mm256_fmadd_ps(xv3, vb, a[1][3]);
      }
      const float* xs[4] = {x0, x1, x2, x3};
      for (int j = 0; j < 4; ++j) {
        float sa = hsum(a[0][j]), sb = hsum(a[1][j]);
        for (int64_t k = K8; k < K; ++k) {
          sa += xs[j][k] * widen(wa[k]);
          sb += xs[j][k] * widen(wb[k]);
        }
        dots[(n - n0) * M + mg + j] = sa;
        if (pair) dots[(n + 1 - n0) * M + mg + j] = sb;
      }
    }
  }
  // The remaining M % 4 rows of x: four rows of Q per step, one chain each.
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const auto* w0 = q + n * ldq;
    const auto* w1 = w0 + ldq;
    const auto* w2 = w1 + ldq;
    const auto* w3 = w2 + ldq;
    for (int64_t m = m4; m < M; ++m) {
      const float* xm = xf + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xm + k);
        a0 = _mm256_fmadd_ps(xv, widen8(w0 + k, widen.table), a0);
        a1 = _mm256_fmadd_ps(xv, widen8(w1 + k, widen.table), a1);
        a2 = _mm256_fmadd_ps(xv, widen8(w2 + k, widen.table), a2);
        a3 = _mm256_fmadd_ps(xv, widen8(w3 + k, widen.table), a3);
      }
      float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
      for (int64_t k = K8; k < K; ++k) {
        s0 += xm[k] * widen(w0[k]);
        s1 += xm[k] * widen(w1[k]);
        s2 += xm[k] * widen(w2[k]);
        s3 += xm[k] * widen(w3[k]);
      }
      float* d = dots + (n - n0) * M + m;
      d[0] = s0;
      d[M] = s1;
      d[2 * M] = s2;
      d[3 * M] = s3;
    }
  }
  for (; n < n1; ++n) {
    const auto* w = q + n * ldq;
    for (int64_t m = m4; m < M; ++m) {
      const float* xm = xf + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K8; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), widen8(w + k, widen.table), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), widen8(w + k + 8, widen.table), a1);
      }
      for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), widen8(w + k, widen.table), a0);
      float sum = hsum(_mm256_add_ps(a0, a1));
      for (; k < K; ++k) sum += xm[k] * widen(w[k]);
      dots[(n - n0) * M + m] = sum;
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
template <typename Widen>
void dot_rows_avx2(const float* xf, int64_t M, const typename Widen::stored_t* q, int64_t ldq, int64_t K, int64_t n0,
                   int64_t n1, Widen widen, float* dots) {
  dot_rows_body<Widen>(xf, M, q, ldq, K, n0, n1, widen, dots);
}
bool cpu_has_avx2_fma() { return false; }
#endif

template <typename Widen>
void dot_rows_default(const float* xf, int64_t M, const typename Widen::stored_t* q, int64_t ldq, int64_t K, int64_t n0,
                      int64_t n1, Widen widen, float* dots) {
  dot_rows_body<Widen>(xf, M, q, ldq, K, n0, n1, widen, dots);
}

// The decode pass: y (M x N, dtype T) from xf (M x K fp32), Q, s, the LoRA factors and the bias.
template <typename T, typename Widen>
void stream_pass(const float* xf, const T* A, const T* B, const T* bias, const typename Widen::stored_t* q, int64_t ldq,
                 const float* wscale, T* y, int64_t M, int64_t K, int64_t r, int64_t N, double scale, Widen widen) {
  // scale == 0: the factors are not read (no u, no LoRA term), so a non-finite adapter cannot leak in as 0 * inf.
  const bool lora = scale != 0.0;
  const std::vector<float> u = lora ? scaled_down_projection<float>(xf, A, M, K, r, scale) : std::vector<float>();
  const bool avx2 = cpu_has_avx2_fma();
  // Grain: 64 rows of Q per task (64 x in bytes), a multiple of the 4-row step.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 64;
    std::array<float, kChunk * kStreamMaxRows> dots;
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk);
      if (avx2) {
        dot_rows_avx2<Widen>(xf, M, q, ldq, K, c0, c1, widen, dots.data());
      } else {
        dot_rows_default<Widen>(xf, M, q, ldq, K, c0, c1, widen, dots.data());
      }
      for (int64_t n = c0; n < c1; ++n) {
        const T* b = B + n * r;
        const float sn = wscale[n];
        const float bn = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
        for (int64_t m = 0; m < M; ++m) {
          float term = 0.f;
          if (lora) {
            const float* um = u.data() + m * r;
            for (int64_t j = 0; j < r; ++j) term += um[j] * static_cast<float>(b[j]);
          }
          y[m * N + n] = static_cast<T>(sn * dots[(n - c0) * M + m] + term + bn);
        }
      }
    }
  });
}

// D (rows x K, row-major, dtype acc) = s[n0 + i] * Q[n0 + i, :] for i < rows, Q with strides (sq0, sq1).
// Serial: the caller splits the blocks over the threads.
template <typename acc_t, typename Widen>
void dequant_block(const typename Widen::stored_t* q, int64_t sq0, int64_t sq1, const float* wscale, int64_t n0,
                   int64_t rows, int64_t K, Widen widen, acc_t* D) {
  if (sq1 == 1) {
    for (int64_t i = 0; i < rows; ++i) {
      const auto* w = q + (n0 + i) * sq0;
      const acc_t s = static_cast<acc_t>(wscale[n0 + i]);
      acc_t* d = D + i * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) d[k] = s * static_cast<acc_t>(widen(w[k]));
    }
  } else {
    // Column-major Q (e.g. the transposed weight of the backward): read along n, contiguous for sq0 == 1.
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < rows; ++i) {
        D[i * K + k] = static_cast<acc_t>(wscale[n0 + i]) * static_cast<acc_t>(widen(q[(n0 + i) * sq0 + k * sq1]));
      }
    }
  }
}

template <typename Widen>
at::Tensor blocked_path(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& weight_scale,
                        const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                        const c10::optional<at::Tensor>& bias, const LoraQuantizedShape& shape, Widen widen) {
  const auto acc_type = x2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x2.to(acc_type);
  const int64_t M = shape.rows, K = shape.in_features, N = shape.out_features;
  // The result is a fresh tensor of the output shape (ya is its 2-D view, or the accumulator when x is half
  // precision); returning a view of a temporary would make in-place use of the output fail under autograd.
  const bool same_type = acc_type == x2.scalar_type();
  at::Tensor y = same_type ? at::empty(shape.out_sizes, xa.options()) : at::Tensor();
  at::Tensor ya = same_type ? y.view({M, N}) : at::empty({M, N}, xa.options());
  if (scale == 0.0) {  // the factors are not read: a non-finite adapter cannot leak in as 0 * inf
    if (bias.has_value()) {
      ya.copy_(bias->expand({M, N}));
    } else {
      ya.zero_();
    }
  } else {
    const at::Tensor u = at::mm(xa, lora_A.to(acc_type).t());
    if (bias.has_value()) {
      at::addmm_out(ya, bias->to(acc_type), u, lora_B.to(acc_type).t(), /*beta=*/1, /*alpha=*/scale);
    } else {
      at::addmm_out(ya, ya, u, lora_B.to(acc_type).t(), /*beta=*/0, /*alpha=*/scale);
    }
  }
  const at::Tensor ws = weight_scale.contiguous();
  const auto* q = reinterpret_cast<const typename Widen::stored_t*>(qweight.const_data_ptr());
  const int64_t block = std::min<int64_t>(kBlockRows, N);
  const int64_t num_blocks = (N + block - 1) / block;
  // One parallel region: each thread dequantizes its blocks into its own buffer and runs a single-threaded
  // GEMM (ATen ops inside at::parallel_for do not fork again). One region instead of two per block keeps the
  // threads from meeting at a barrier 2 N / kBlockRows times, which costs dearly when cores are shared.
  AT_DISPATCH_FLOATING_TYPES(acc_type, "lora_linear_quantized_cpu_blocked", [&] {
    at::parallel_for(0, num_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      at::Tensor D = at::empty({block, K}, xa.options());
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t n0 = blk * block;
        const int64_t rows = std::min(block, N - n0);
        dequant_block<scalar_t, Widen>(q, qweight.stride(0), qweight.stride(1), ws.const_data_ptr<float>(), n0, rows, K,
                                       widen, D.mutable_data_ptr<scalar_t>());
        at::Tensor ys = ya.narrow(1, n0, rows);
        ys.addmm_(xa, D.narrow(0, 0, rows).t());
      }
    });
  });
  if (same_type) return y;
  at::Tensor out = at::empty(shape.out_sizes, x2.options());
  out.view({M, N}).copy_(ya);  // rounded once to x's dtype
  return out;
}

}  // namespace

at::Tensor lora_linear_quantized_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
                                     const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                     const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_quantized_args(x, qweight, weight_scale, lora_A, lora_B, bias);
  const int64_t M = shape.rows, K = shape.in_features, N = shape.out_features;
  if (M == 0 || N == 0) return at::empty(shape.out_sizes, x.options());
  at::Tensor x2 = x.reshape({M, K});
  const bool fp8 = qweight.scalar_type() == at::ScalarType::Float8_e4m3fn;
  const Int8Widen int8_widen{nullptr};
  const Fp8Widen fp8_widen{fp8 ? fp8_e4m3fn_table() : nullptr};
  // Any strides of Q are read in place (no copy): the backward passes Q transposed.
  at::Tensor q = qweight;
  if (q.stride(0) != 1 && q.stride(1) != 1) q = q.contiguous();
  const bool stream = M <= kStreamMaxRows && q.stride(1) == 1 && x.scalar_type() != at::kDouble;
  if (!stream) {
    return fp8 ? blocked_path(x2, q, weight_scale, lora_A, lora_B, scale, bias, shape, fp8_widen)
               : blocked_path(x2, q, weight_scale, lora_A, lora_B, scale, bias, shape, int8_widen);
  }
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  const at::Tensor a = lora_A.contiguous();
  const at::Tensor b = lora_B.contiguous();
  const at::Tensor ws = weight_scale.contiguous();
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty(shape.out_sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_quantized_cpu", [&] {
    const scalar_t* bias_p = bias_c.has_value() ? bias_c->const_data_ptr<scalar_t>() : nullptr;
    if (fp8) {
      stream_pass<scalar_t, Fp8Widen>(
          xf.const_data_ptr<float>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), bias_p,
          reinterpret_cast<const uint8_t*>(q.const_data_ptr()), q.stride(0), ws.const_data_ptr<float>(),
          y.mutable_data_ptr<scalar_t>(), M, K, shape.rank, N, scale, fp8_widen);
    } else {
      stream_pass<scalar_t, Int8Widen>(
          xf.const_data_ptr<float>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), bias_p,
          reinterpret_cast<const int8_t*>(q.const_data_ptr()), q.stride(0), ws.const_data_ptr<float>(),
          y.mutable_data_ptr<scalar_t>(), M, K, shape.rank, N, scale, int8_widen);
    }
  });
  return y;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("lora_linear_quantized", &lora_linear_quantized_cpu); }

}  // namespace lowrank
