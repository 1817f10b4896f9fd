// CPU kernel of lowrank::range_gram: out = block @ omega and the float64 Gram matrix out^T out (or, with
// gram = false, the GEMM alone).
//
// The block's rows are cut into chunks of chunk_rows rows (a few MiB: a chunk stays in L3 while the GEMM sweeps
// it); at::parallel_for hands each thread a run of whole chunks, and inside the parallel region every GEMM runs on
// one thread (MKL / OpenMP do not nest). Per chunk: out_c = block_c @ omega, its float64 copy (exact), and the
// chunk's Gram matrix out_c^T out_c; the chunks' Gram matrices are summed in chunk order (after each group of up
// to 64 chunks: bounded memory). So the result depends on chunk_rows alone (on the thread count only beyond 64
// threads, or fewer for very wide sketches), and there is no barrier per chunk: on 2 cores, 5000 x 3000 float32
// blocks with s = 161 in chunks of 700 rows took 0.98x the time of one 2-thread GEMM call for GEMM + Gram, against
// 1.16x for one GEMM call plus one Gram call (the latter's float64 GEMM with a 161 x 161 output scales poorly).
// With colsum, each chunk's float64 column sums come from the same float64 copy as its Gram matrix (summed in
// chunk order too): torch's out.sum(0, dtype=float64) on a 5000 x 161 float32 block converted it first, ~2 ms.
#include "range_gram.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace lowrank {

at::Tensor range_gram_cpu(const at::Tensor& block, const at::Tensor& omega, int64_t chunk_rows, bool gram,
                          at::Tensor& out, const c10::optional<at::Tensor>& colsum) {
  check_range_gram_args(block, omega, chunk_rows, gram, out, colsum);
  const int64_t b = block.size(0);
  const int64_t s = omega.size(1);
  const auto f64 = block.options().dtype(at::kDouble);
  at::Tensor sum = gram ? at::zeros({s, s}, f64) : at::empty({0, 0}, f64);
  const bool sums = colsum.has_value();
  if (sums) colsum->zero_();
  if (b == 0 || s == 0) return sum;
  const int64_t chunks = (b + chunk_rows - 1) / chunk_rows;
  // the chunks' Gram matrices are kept for at most `group` chunks at a time (64 MiB of them, 64 chunks, but
  // one per thread at least), then summed in chunk order: bounded memory for long blocks and wide sketches.
  // Without the Gram (the chunked floor of benchmarks/bench_sketch.py) all chunks form one group.
  const int64_t fit = std::max<int64_t>(1, (int64_t{64} << 20) / (s * s * static_cast<int64_t>(sizeof(double))));
  const int64_t group = gram ? std::max<int64_t>(at::get_num_threads(), std::min<int64_t>(64, fit)) : chunks;
  at::Tensor parts = gram ? at::empty({std::min(chunks, group), s, s}, f64) : at::Tensor();
  at::Tensor col_parts = sums ? at::empty({std::min(chunks, group), s}, f64) : at::Tensor();
  const bool is_double = block.scalar_type() == at::kDouble;
  for (int64_t g0 = 0; g0 < chunks; g0 += group) {
    const int64_t g1 = std::min(chunks, g0 + group);
    at::parallel_for(g0, g1, 1, [&](int64_t c0, int64_t c1) {
      at::Tensor scratch = (is_double || !gram) ? at::Tensor() : at::empty({std::min(chunk_rows, b), s}, f64);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * chunk_rows;
        const int64_t rows = std::min(chunk_rows, b - lo);
        at::Tensor y = out.narrow(0, lo, rows);
        at::mm_out(y, block.narrow(0, lo, rows), omega);
        if (!gram) continue;
        const at::Tensor yd = is_double ? y : scratch.narrow(0, 0, rows).copy_(y);
        at::Tensor part = parts.select(0, c - g0);
        if (sums) {
          at::Tensor col = col_parts.select(0, c - g0);
          at::sum_out(col, yd, {0});
        }
        if (s < 32) {
          at::mm_out(part, yd.t(), yd);
          continue;
        }
        // the upper rows [Y_1^T Y_1, Y_1^T Y_2] and the lower right Y_2^T Y_2, the lower left mirrored: 3/4 of
        // the flops of the full product (5000 x 3000 blocks, s = 161, chunks of 700 rows, quiet, 30 interleaved
        // rounds: GEMM + Gram 0.85 -> 0.83 of the one-GEMM floor with 1 thread, 0.98 -> 0.88 with 2)
        const int64_t h = s / 2;
        const at::Tensor y1 = yd.narrow(1, 0, h);
        const at::Tensor y2 = yd.narrow(1, h, s - h);
        at::Tensor top = part.narrow(0, 0, h);
        at::mm_out(top, y1.t(), yd);
        at::Tensor corner = part.narrow(0, h, s - h).narrow(1, h, s - h);
        at::mm_out(corner, y2.t(), y2);
        part.narrow(0, h, s - h).narrow(1, 0, h).copy_(top.narrow(1, h, s - h).t());
      }
    });
    if (gram) {
      for (int64_t c = g0; c < g1; ++c) sum.add_(parts.select(0, c - g0));
      if (sums) {
        for (int64_t c = g0; c < g1; ++c) colsum->add_(col_parts.select(0, c - g0));
      }
    }
  }
  return sum;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("range_gram", &range_gram_cpu); }

}  // namespace lowrank
