// CPU kernel of lowrank::sparse_sign_add_: out[rows[i, t], :] += signs[i, t] * block[i, :] (out float64).
//
// The work is zeta b n multiply-adds with no reuse of out beyond the block, so the kernel is bound by where out
// lives. The columns are cut into tiles sized so that a tile of out (d x tile doubles, <= 256 KiB) stays in L2
// while the rows of block stream through L1: each row tile is loaded once and added to its zeta target rows.
// at::parallel_for runs over column tiles, so two threads never write the same entry of out and the result does
// not depend on the thread count (every entry gets its terms in row order, as a serial loop would).
#include "sparse_sign.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

namespace lowrank {

namespace {

constexpr int64_t kTileBytes = 256 * 1024;  // one tile of out: half of a 512 KiB L2

int64_t column_tile(int64_t d, int64_t n) {
  int64_t tile = std::max<int64_t>(16, (kTileBytes / (8 * std::max<int64_t>(d, 1))) / 16 * 16);
  // enough tiles for every thread when n allows it
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = ((n + threads - 1) / threads + 15) / 16 * 16;
  return std::max<int64_t>(1, std::min({tile, share, n}));
}

// out[rows[i, z], j] += signs[i, z] * block[i, j] for the columns of each tile; threads over tiles.
template <typename scalar_t>
void add_rows(double* out, int64_t n, const scalar_t* block, int64_t ldb, int64_t b, const int64_t* rows,
              const double* signs, int64_t zeta, int64_t tile) {
  const int64_t tiles = (n + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * tile;
      const int64_t w = std::min(tile, n - j0);
      for (int64_t i = 0; i < b; ++i) {
        const scalar_t* src = block + i * ldb + j0;
        for (int64_t z = 0; z < zeta; ++z) {
          double* dst = out + rows[i * zeta + z] * n + j0;
          const double s = signs[i * zeta + z];
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) dst[j] += s * static_cast<double>(src[j]);
        }
      }
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
  const int64_t tile = column_tile(d, n);
  double* o = out.data_ptr<double>();
  const double* sg = signs_c.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(blk.scalar_type(), "sparse_sign_add_",
                             [&] { add_rows<scalar_t>(o, n, blk.data_ptr<scalar_t>(), ldb, b, r, sg, zeta, tile); });
  return out;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("sparse_sign_add_", &sparse_sign_add_cpu); }

}  // namespace lowrank
