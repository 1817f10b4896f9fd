// CPU kernel of lowrank::lora_linear: y = x W^T + scale (x A^T) B^T (+ bias).
//
// Many rows (M > kStreamMaxRows): the rank-r LoRA term (with the bias) is written into y first, then the base
// GEMM (MKL/OpenBLAS through ATen) accumulates into it with beta = 1: no (M x out) temporary is written or read
// beyond what F.linear with a bias does, and the extra FLOPs are 2 M r (in + out), r/out of the base
// (benchmarks/bench_lora.py). For float32 / bfloat16 / float16 on AVX2 the LoRA term is one pass of our own
// (lora_term_many_rows): four rows at a time, u = scale x A^T (M x r) is formed in L1 and at once expanded into
// those rows of y, so x and y are each touched once and no (M x r) tensor is allocated. It replaced two BLAS
// calls (x A^T, then u B^T into y) that MKL serves badly at these shapes (K = 384 with N = 8, K = 8 with
// N = 384: ~25-30 GFLOP/s on one Zen 3 core, against ~90 for the base GEMM); with their allocations and
// dispatch they made lora_linear at M = 16, 384 x 384, r = 8 cost ~1.35x F.linear (issue 19).
//
// Few rows (decode, M <= kStreamMaxRows = 4) in float32 / bfloat16 / float16 on x86-64 with AVX2+FMA+F16C
// (checked at run time): ONE threaded pass over W. x is widened to fp32 once (M x in, in cache; fp32 x is used in
// place), u = scale x A^T (M x r, fp32) is computed first, then the threads split the output rows: each streams
// its block of rows of W once, dotting them with the M rows of x (8 columns per vector, up to four rows of W
// per step so that four or more FMA chains hide the latency and each load of x is shared), and adds
// u B[n]^T + bias[n] before the single store of y[:, n]. The product is bound by W's bytes: the LoRA factors
// add r (in + out) elements (0.8% of W's at 4096 x 4096, r = 16), read once; the previous design (LoRA term
// into y, then a BLAS GEMV with beta = 1) read y twice and paid a second threaded region, measured 1.03-1.05x
// F.linear there (issue 19; figures of this pass in benchmarks/bench_lora.py).
//
// float64, or a CPU without AVX2/FMA/F16C, keeps that previous few-rows design: the LoRA term by the loops of
// lora_term_few_rows (which split each factor over the threads; BLAS runs such thin products at a fraction of
// the memory bandwidth), then the BLAS GEMV accumulates into it.
#include "lora_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_few_rows.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace lowrank {
namespace {

constexpr int64_t kStreamMaxRows = 4;

// y[m, n] = bias[n] + scale * sum_j u[m, j] B[n, j], u = x A^T; x (M, K), A (r, K), B (N, r), y (M, N),
// all contiguous. Accumulates in float (double for double).
template <typename T>
void lora_term_few_rows(const T* x, const T* A, const T* B, const T* bias, T* y, int64_t M, int64_t K, int64_t r,
                        int64_t N, double scale) {
  using acc_t = at::opmath_type<T>;
  const std::vector<acc_t> u = scaled_down_projection<acc_t>(x, A, M, K, r, scale);
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

#if defined(__x86_64__) || defined(_M_X64)
#define LOWRANK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOWRANK_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

// Eight stored values at p widened to floats.
LOWRANK_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LOWRANK_AVX2_INLINE __m256 load8(const c10::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
LOWRANK_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
LOWRANK_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dots[i * MB + m] = sum_k xf[m, k] W[n + i, k] for i < RB, m < MB: RB rows of W against MB rows of x (fp32,
// M x K row-major), RB * MB independent FMA chains; each vector of W feeds MB chains, each of x feeds RB.
template <int MB, int RB, typename T>
LOWRANK_AVX2_INLINE void dot_block(const float* xf, int64_t K, const T* W, int64_t ldw, int64_t n, float* dots) {
  __m256 acc[RB][MB];
  const T* w[RB];
  for (int i = 0; i < RB; ++i) {
    w[i] = W + (n + i) * ldw;
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_ps();
  }
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(xf + m * K + k);
    for (int i = 0; i < RB; ++i) {
      const __m256 wv = load8(w[i] + k);
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_fmadd_ps(xv[m], wv, acc[i][m]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    for (int m = 0; m < MB; ++m) {
      float s = hsum(acc[i][m]);
      for (int64_t k = K8; k < K; ++k) s += xf[m * K + k] * static_cast<float>(w[i][k]);
      dots[i * MB + m] = s;
    }
  }
}

// dots[(n - n0) * MB + m] for the rows [n0, n1) of W: RB rows per step (four for one or two rows of x, two
// for three or four: at most 8 accumulators + MB vectors of x in the 16 ymm registers), then one by one.
template <int MB, typename T>
LOWRANK_AVX2 void dot_rows_avx2(const float* xf, int64_t K, const T* W, int64_t ldw, int64_t n0, int64_t n1,
                                float* dots) {
  constexpr int RB = MB <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) dot_block<MB, RB>(xf, K, W, ldw, n, dots + (n - n0) * MB);
  for (; n < n1; ++n) dot_block<MB, 1>(xf, K, W, ldw, n, dots + (n - n0) * MB);
}

bool cpu_has_avx2_fma_f16c() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

// The single pass described at the top: y (M x N, dtype T) from xf (M x K fp32), W, the factors, the bias.
template <int MB, typename T>
void stream_pass(const float* xf, const T* W, const T* A, const T* B, const T* bias, T* y, int64_t K, int64_t r,
                 int64_t N, double scale) {
  const std::vector<float> u = scaled_down_projection<float>(xf, A, MB, K, r, scale);  // MB x r, fp32
  // Threads split the output rows; a task is at least 2^15 weights (one thread below that) and a multiple of 4.
  const int64_t grain = std::max<int64_t>(4, ((int64_t{1} << 15) / std::max<int64_t>(1, K) + 3) / 4 * 4);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 64;
    std::array<float, kChunk * MB> dots;
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk);
      dot_rows_avx2<MB, T>(xf, K, W, K, c0, c1, dots.data());
      for (int64_t n = c0; n < c1; ++n) {
        const T* b = B + n * r;
        const float bn = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
        for (int m = 0; m < MB; ++m) {
          const float* um = u.data() + m * r;
          float lora = 0.f;
          for (int64_t j = 0; j < r; ++j) lora += um[j] * static_cast<float>(b[j]);
          y[m * N + n] = static_cast<T>(dots[(n - c0) * MB + m] + lora + bn);
        }
      }
    }
  });
}

// The fused pass for one of float / BFloat16 / Half: x (M x K contiguous, 1 <= M <= 4) widened to fp32 unless fp32.
template <typename T>
void fused_few_rows(const T* x, const T* W, const T* A, const T* B, const T* bias, T* y, int64_t M, int64_t K,
                    int64_t r, int64_t N, double scale) {
  std::vector<float> widened;
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    widened.resize(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(x[i]);
    xf = widened.data();
  }
  switch (M) {
    case 1:
      return stream_pass<1, T>(xf, W, A, B, bias, y, K, r, N, scale);
    case 2:
      return stream_pass<2, T>(xf, W, A, B, bias, y, K, r, N, scale);
    case 3:
      return stream_pass<3, T>(xf, W, A, B, bias, y, K, r, N, scale);
    default:
      return stream_pass<4, T>(xf, W, A, B, bias, y, K, r, N, scale);
  }
}

// ---- many rows (M > kStreamMaxRows): the LoRA term written straight into y ------------------------------------

// Eight floats stored as T (round to nearest even, as c10's conversions; a NaN stays a quiet NaN).
LOWRANK_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
LOWRANK_AVX2_INLINE void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
LOWRANK_AVX2_INLINE void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  // every lane is < 2^16: the unsigned-saturating pack keeps it; packus works per 128-bit half, in order here
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
}

// u[m * r + j] = scale * x[m] . A[j] for m < MB, j in [j0, j0 + JB): MB rows of x (row stride ldx) against JB rows
// of A (K x ... contiguous), MB * JB independent FMA chains over K, eight columns per vector.
template <int MB, int JB, typename T>
LOWRANK_AVX2_INLINE void down_tile(const T* x, int64_t ldx, const T* A, int64_t K, int64_t j0, int64_t r, float scale,
                                   float* u) {
  __m256 acc[MB][JB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < JB; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 av[JB];
    for (int j = 0; j < JB; ++j) av[j] = load8(A + (j0 + j) * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = load8(x + m * ldx + k);
      for (int j = 0; j < JB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, av[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int j = 0; j < JB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = K8; k < K; ++k)
        s += static_cast<float>(x[m * ldx + k]) * static_cast<float>(A[(j0 + j) * K + k]);
      u[m * r + j0 + j] = s * scale;
    }
  }
}

// y[m, n] = bias[n] + sum_j u[m, j] Bt[j, n] for m < MB (row stride ldy), n < N; Bt is B^T in fp32 (r x N).
// Two vectors of outputs per row at a time (2 MB chains, each vector of Bt shared by the MB rows), then one, then
// the scalar tail; the sum runs over j in the same order everywhere.
template <int MB, typename T>
LOWRANK_AVX2 void up_rows(const float* u, int64_t r, const float* Bt, const T* bias, int64_t N, T* y, int64_t ldy) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    __m256 acc[MB][2];
    const __m256 b0 = bias != nullptr ? load8(bias + n) : _mm256_setzero_ps();
    const __m256 b1 = bias != nullptr ? load8(bias + n + 8) : _mm256_setzero_ps();
    for (int m = 0; m < MB; ++m) acc[m][0] = b0, acc[m][1] = b1;
    for (int64_t j = 0; j < r; ++j) {
      const __m256 v0 = _mm256_loadu_ps(Bt + j * N + n);
      const __m256 v1 = _mm256_loadu_ps(Bt + j * N + n + 8);
      for (int m = 0; m < MB; ++m) {
        const __m256 um = _mm256_broadcast_ss(u + m * r + j);
        acc[m][0] = _mm256_fmadd_ps(um, v0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(um, v1, acc[m][1]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      store8(y + m * ldy + n, acc[m][0]);
      store8(y + m * ldy + n + 8, acc[m][1]);
    }
  }
  for (; n + 8 <= N; n += 8) {
    __m256 acc[MB];
    const __m256 b0 = bias != nullptr ? load8(bias + n) : _mm256_setzero_ps();
    for (int m = 0; m < MB; ++m) acc[m] = b0;
    for (int64_t j = 0; j < r; ++j) {
      const __m256 v0 = _mm256_loadu_ps(Bt + j * N + n);
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(u + m * r + j), v0, acc[m]);
    }
    for (int m = 0; m < MB; ++m) store8(y + m * ldy + n, acc[m]);
  }
  for (; n < N; ++n) {
    for (int m = 0; m < MB; ++m) {
      float s = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
      for (int64_t j = 0; j < r; ++j) s = std::fma(u[m * r + j], Bt[j * N + n], s);
      y[m * ldy + n] = static_cast<T>(s);
    }
  }
}

// Rows v[0..7] become the columns (v[i][k] -> v[k][i]): the usual unpack / shuffle / 128-bit permute sequence.
LOWRANK_AVX2_INLINE void transpose8x8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Bt (r x N, fp32) = B^T for B (N x r, contiguous, dtype T): 8 x 8 blocks through registers, the rest one by one.
// Each entry is the exact widening of B's (as before: the old scalar loop wrote the same values).
template <typename T>
LOWRANK_AVX2 void transpose_to_float(const T* B, int64_t N, int64_t r, float* Bt) {
  int64_t n0 = 0;
  for (; n0 + 8 <= N; n0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= r; j0 += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = load8(B + (n0 + i) * r + j0);
      transpose8x8(v);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(Bt + (j0 + i) * N + n0, v[i]);
    }
    for (; j0 < r; ++j0) {
      for (int64_t i = 0; i < 8; ++i) Bt[j0 * N + n0 + i] = static_cast<float>(B[(n0 + i) * r + j0]);
    }
  }
  for (; n0 < N; ++n0) {
    for (int64_t j = 0; j < r; ++j) Bt[j * N + n0] = static_cast<float>(B[n0 * r + j]);
  }
}

// MB rows: u = scale x A^T (two rows of A per step, then the odd one), then y = bias + u B^T.
template <int MB, typename T>
LOWRANK_AVX2 void lora_rows(const T* x, int64_t ldx, const T* A, const float* Bt, const T* bias, T* y, int64_t K,
                            int64_t r, int64_t N, float scale, float* u) {
  int64_t j = 0;
  for (; j + 2 <= r; j += 2) down_tile<MB, 2>(x, ldx, A, K, j, r, scale, u);
  if (j < r) down_tile<MB, 1>(x, ldx, A, K, j, r, scale, u);
  up_rows<MB, T>(u, r, Bt, bias, N, y, N);
}

// y (M x N, contiguous) = bias + scale (x A^T) B^T for float / BFloat16 / Half on AVX2: x (M x K, row stride ldx,
// unit column stride), A (r x K) and B (N x r) contiguous. Tiles of four rows, each finished (u in L1, then its
// rows of y) before the next, so x and y are touched once; the threads split the tiles (at least ~2^17 FMAs
// each, one thread below that); every row's arithmetic is the same whatever the thread count.
template <typename T>
void lora_term_many_rows(const T* x, int64_t ldx, const T* A, const T* B, const T* bias, T* y, int64_t M, int64_t K,
                         int64_t r, int64_t N, float scale) {
  // B^T in fp32 (r x N): the up step reads its rows as vectors. Uninitialised storage (every entry is written
  // below), built by 8 x 8 register transposes.
  const std::unique_ptr<float[]> Bt(new float[static_cast<size_t>(r * N)]);
  transpose_to_float(B, N, r, Bt.get());
  constexpr int64_t MB = 4;
  const int64_t tiles = (M + MB - 1) / MB;
  const int64_t per_tile = MB * r * (K + N);
  const int64_t grain = std::max<int64_t>(1, ((int64_t{1} << 17) + per_tile - 1) / std::max<int64_t>(1, per_tile));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> u(static_cast<size_t>(MB * r));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = t * MB;
      const T* xt = x + m0 * ldx;
      T* yt = y + m0 * N;
      switch (std::min<int64_t>(MB, M - m0)) {
        case 4:
          lora_rows<4, T>(xt, ldx, A, Bt.get(), bias, yt, K, r, N, scale, u.data());
          break;
        case 3:
          lora_rows<3, T>(xt, ldx, A, Bt.get(), bias, yt, K, r, N, scale, u.data());
          break;
        case 2:
          lora_rows<2, T>(xt, ldx, A, Bt.get(), bias, yt, K, r, N, scale, u.data());
          break;
        default:
          lora_rows<1, T>(xt, ldx, A, Bt.get(), bias, yt, K, r, N, scale, u.data());
      }
    }
  });
}
#else
bool cpu_has_avx2_fma_f16c() { return false; }
template <typename T>
void fused_few_rows(const T*, const T*, const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, double) {
  TORCH_CHECK(false, "lora_linear: the fused few-rows pass needs x86-64 with AVX2");
}
template <typename T>
void lora_term_many_rows(const T*, int64_t, const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t,
                         float) {
  TORCH_CHECK(false, "lora_linear: the many-rows LoRA term needs x86-64 with AVX2");
}
#endif

// M > kStreamMaxRows: y = bias + scale (x A^T) B^T by lora_term_many_rows (one pass over x and y, no (M x r)
// tensor, no extra BLAS calls), then the base GEMM accumulates into it (beta = 1): the same BLAS call and the same
// memory passes as F.linear with a bias, which also writes the bias into y before its GEMM. float64 and a CPU
// without AVX2/FMA/F16C take the composite path of lora_linear.h.
at::Tensor lora_linear_many_rows(at::Tensor x2, const at::Tensor& weight, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias,
                                 const LoraLinearShape& shape) {
  if (!cpu_has_avx2_fma_f16c() || x2.scalar_type() == at::kDouble) {
    return lora_linear_composite(x2, weight, lora_A, lora_B, scale, bias, shape.out_sizes);
  }
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor a = lora_A.contiguous();
  const at::Tensor b = lora_B.contiguous();
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty(shape.out_sizes, x2.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "lora_linear_cpu_many_rows", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      lora_term_many_rows<scalar_t>(
          x2.const_data_ptr<scalar_t>(), x2.stride(0), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          bias_c.has_value() ? bias_c->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), shape.rows,
          shape.in_features, shape.rank, shape.out_features, static_cast<float>(scale));
    }
  });
  y.view({shape.rows, shape.out_features}).addmm_(x2, weight.t());
  return y;
}

}  // namespace

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_args(x, weight, lora_A, lora_B, bias, /*check_devices=*/true);
  at::Tensor x2 = x.reshape({shape.rows, shape.in_features});
  if (x2.size(0) == 0 || shape.out_features == 0) return at::empty(shape.out_sizes, x.options());
  if (scale == 0.0) return lora_linear_base_only(x2, weight, bias, shape.out_sizes);
  if (shape.rows > kStreamMaxRows) return lora_linear_many_rows(x2, weight, lora_A, lora_B, scale, bias, shape);
  x2 = x2.contiguous();
  const at::Tensor a = lora_A.contiguous();
  const at::Tensor b = lora_B.contiguous();
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty(shape.out_sizes, x.options());
  // The fused pass reads W's rows in place; any other layout (e.g. the transposed view of a GPT-2 Conv1D
  // weight) takes the BLAS path, which reads it as a transposed operand: never a per-call weight copy.
  const bool fused = cpu_has_avx2_fma_f16c() && x.scalar_type() != at::kDouble && weight.is_contiguous();
  const at::Tensor& w = weight;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_cpu", [&] {
    const scalar_t* bias_p = bias_c.has_value() ? bias_c->const_data_ptr<scalar_t>() : nullptr;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (fused) {
        fused_few_rows<scalar_t>(x2.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                 a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), bias_p,
                                 y.mutable_data_ptr<scalar_t>(), shape.rows, shape.in_features, shape.rank,
                                 shape.out_features, scale);
        done = true;
        return;
      }
    }
    lora_term_few_rows<scalar_t>(x2.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                 b.const_data_ptr<scalar_t>(), bias_p, y.mutable_data_ptr<scalar_t>(), shape.rows,
                                 shape.in_features, shape.rank, shape.out_features, scale);
  });
  if (!done) y.view({shape.rows, shape.out_features}).addmm_(x2, weight.t());
  return y;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("lora_linear", &lora_linear_cpu); }

}  // namespace lowrank
