// CPU kernel of lowrank::sparse_sign_add_: out[rows[i, t], :] += signs[i, t] * block[i, :] (out float64).
//
// The columns are cut into tiles of 64; a task owns one tile: it scatters every row of block (its 64 columns, held
// in registers) with weight into the zeta target rows of a tile buffer (d x 64 in the block's dtype, zeroed; it
// stays in L2), then adds the buffer to out once. A is read once, in row order; the adds run in the block's dtype
// (8 float32 lanes with AVX2+FMA, chosen at run time), out is touched once per call. Sums over the rows of one
// call are therefore rounded in the block's dtype (as a float32 GEMM's would be) and accumulated in float64
// across calls. at::parallel_for runs over tiles: threads never write the same entries, and the result does not
// depend on the thread count.
#include "sparse_sign.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace lowrank {

namespace {

constexpr int64_t kTile = 64;  // columns per task (a row's tile fits in registers, the buffer in L2)

// One tile: buf (d x w, row stride kTile, zeroed) += sum_i sum_z weights[i, z] e_{rows[i, z]} block[i, j0:j0 + w];
// then out += buf. Full: w == kTile (a constant trip count, vectorised).
template <typename scalar_t, bool Full>
inline __attribute__((always_inline)) void tile_body(double* out, int64_t d, int64_t n, const scalar_t* block,
                                                     int64_t ldb, int64_t b, const int64_t* rows,
                                                     const scalar_t* weights, int64_t zeta, int64_t j0, int64_t w,
                                                     scalar_t* buf) {
  std::fill(buf, buf + d * kTile, scalar_t(0));
  for (int64_t i = 0; i < b; ++i) {
    const scalar_t* src = block + i * ldb + j0;
    for (int64_t z = 0; z < zeta; ++z) {
      scalar_t* dst = buf + rows[i * zeta + z] * kTile;
      const scalar_t s = weights[i * zeta + z];
      if (Full) {
#pragma omp simd
        for (int64_t j = 0; j < kTile; ++j) dst[j] += s * src[j];
      } else {
        for (int64_t j = 0; j < w; ++j) dst[j] += s * src[j];
      }
    }
  }
  for (int64_t t = 0; t < d; ++t) {
    double* o = out + t * n + j0;
    const scalar_t* s = buf + t * kTile;
    for (int64_t j = 0; j < w; ++j) o[j] += static_cast<double>(s[j]);
  }
}

template <typename scalar_t>
void tile_default(double* out, int64_t d, int64_t n, const scalar_t* block, int64_t ldb, int64_t b, const int64_t* rows,
                  const scalar_t* weights, int64_t zeta, int64_t j0, int64_t w, scalar_t* buf) {
  if (w == kTile) {
    tile_body<scalar_t, true>(out, d, n, block, ldb, b, rows, weights, zeta, j0, w, buf);
  } else {
    tile_body<scalar_t, false>(out, d, n, block, ldb, b, rows, weights, zeta, j0, w, buf);
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void tile_avx2(double* out, int64_t d, int64_t n, const scalar_t* block,
                                                   int64_t ldb, int64_t b, const int64_t* rows, const scalar_t* weights,
                                                   int64_t zeta, int64_t j0, int64_t w, scalar_t* buf) {
  if (w == kTile) {
    tile_body<scalar_t, true>(out, d, n, block, ldb, b, rows, weights, zeta, j0, w, buf);
  } else {
    tile_body<scalar_t, false>(out, d, n, block, ldb, b, rows, weights, zeta, j0, w, buf);
  }
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename scalar_t>
void add_rows(double* out, int64_t d, int64_t n, const scalar_t* block, int64_t ldb, int64_t b, const int64_t* rows,
              const double* signs, int64_t zeta) {
  std::vector<scalar_t> weights(b * zeta);
  for (int64_t k = 0; k < b * zeta; ++k) weights[k] = static_cast<scalar_t>(signs[k]);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> buf(d * kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kTile;
      const int64_t w = std::min(kTile, n - j0);
#if defined(__GNUC__) && defined(__x86_64__)
      if (has_avx2()) {
        tile_avx2(out, d, n, block, ldb, b, rows, weights.data(), zeta, j0, w, buf.data());
        continue;
      }
#endif
      tile_default(out, d, n, block, ldb, b, rows, weights.data(), zeta, j0, w, buf.data());
    }
  });
}

}  // namespace

at::Tensor& sparse_sign_add_cpu(at::Tensor& out, const at::Tensor& block, const at::Tensor& rows,
                                const at::Tensor& signs) {
  check_sparse_sign_add_args(out, block, rows, signs);
  const int64_t d = out.size(0);
  const int64_t n = out.size(1);
  const int64_t b = block.size(0);
  const int64_t zeta = rows.size(1);
  if (b == 0 || n == 0 || zeta == 0) return out;
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor signs_c = signs.contiguous();
  const int64_t* r = rows_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * zeta; ++i) {
    TORCH_CHECK_VALUE(r[i] >= 0 && r[i] < d, "sparse_sign_add_: rows holds ", r[i], " at flat index ", i,
                      "; every entry must lie in [0, ", d, ") (out has ", d, " rows)");
  }
  // rows of block must be unit-stride (a row tile is read as one run); other layouts are copied once
  const at::Tensor blk = (block.stride(1) == 1 || n == 1) ? block : block.contiguous();
  const int64_t ldb = blk.stride(0);
  double* o = out.data_ptr<double>();
  const double* sg = signs_c.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(blk.scalar_type(), "sparse_sign_add_",
                             [&] { add_rows<scalar_t>(o, d, n, blk.data_ptr<scalar_t>(), ldb, b, r, sg, zeta); });
  return out;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("sparse_sign_add_", &sparse_sign_add_cpu); }

}  // namespace lowrank
