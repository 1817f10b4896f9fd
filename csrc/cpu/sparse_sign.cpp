// CPU kernel of lowrank::sparse_sign_add_: out[rows[i, t], :] += signs[i, t] * block[i, :] (out float64), and
// with dense (b x p) out[d - p + t, :] += sum_i dense[i, t] * block[i, :].
//
// Gather, not scatter. The nonzeros are first sorted (a stable counting sort, serial, O(b zeta)) by panel of
// kPanel rows and target row. The columns are cut into tiles of 256 bytes (64 float32 / 32 float64: 8 vectors of
// 32 bytes); a task owns one tile. Per panel it copies the panel's tile (kPanel x 256 bytes, stays in L2) and then,
// for each target row t, sums the panel rows that map to t in 8 vector registers and adds the sum to its tile
// buffer (d x 256 bytes, in the block's dtype) once; the dense rows are summed in registers too, up to 12 at a
// time per vector of columns. After the last panel the buffer is added to out (float64), so out is touched once
// per call. Every nonzero costs 8 vector loads from L2 and 8 FMAs into registers (no store), against a load, FMA
// and store to a buffer row per vector for a scatter. Sums over the rows of one call are rounded in the block's
// dtype (as a float32 GEMM's would be) and accumulated in float64 across calls. While a panel is summed, the next
// panel's strips are prefetched (5000 x 3000 float32 block, 16 nonzeros per row with the dense rows: 10-17% less
// time at 1 and 2 threads, 2 cores, interleaved runs). at::parallel_for runs over tiles: threads never write the
// same entries, the order of every sum is fixed by (panel, row, t), and the result does not depend on the thread
// count. AVX2+FMA is chosen at run time (GCC vector extensions; SSE2 otherwise).
#include "sparse_sign.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace lowrank {

namespace {

constexpr int64_t kVecBytes = 32;
constexpr int64_t kVecs = 8;                       // vectors per tile row (the gather's accumulators)
constexpr int64_t kTileBytes = kVecs * kVecBytes;  // 256 bytes of columns per task
constexpr int64_t kPanel = 256;                    // block rows per packed panel (64 KiB: stays in L2)
constexpr int64_t kDenseChunk = 12;                // dense rows summed in registers at once (12 + 2 of 16)
constexpr int64_t kDenseAlign = 4;                 // dense weights padded (with zeros) to a multiple of this

template <typename scalar_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};

// Uninitialised bytes aligned to 64 (a multiple of the vector size), freed on scope exit.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t bytes)
      : ptr_(std::aligned_alloc(64, static_cast<size_t>(std::max<int64_t>(64, (bytes + 63) / 64 * 64)))) {
    TORCH_CHECK(ptr_ != nullptr, "sparse_sign_add_: out of memory for a ", bytes, "-byte tile buffer");
  }
  ~AlignedBuffer() { std::free(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_;
};

// The sorted nonzeros: for panel q and target row t < ds, entries off[q * ds + t] .. off[q * ds + t + 1] - 1 hold
// the panel-relative source row and the weight; dense weights are b x p4 (zero-padded columns).
template <typename scalar_t>
struct Plan {
  int64_t b, n, d, ds, p, p4, panels;
  const scalar_t* block;
  int64_t ldb;
  std::vector<int64_t> off;
  std::vector<int32_t> src;
  std::vector<scalar_t> weight;
  std::vector<scalar_t> dense;
};

// Dense rows c0 .. c0 + PC - 1 of one panel: for each vector of columns, PC sums in registers over the panel's rows.
template <typename scalar_t, int PC>
inline __attribute__((always_inline)) void dense_chunk(const typename VecOf<scalar_t>::type* packed, int64_t rows,
                                                       const scalar_t* dw, int64_t p4, int64_t valid,
                                                       typename VecOf<scalar_t>::type* buf) {
  using vec = typename VecOf<scalar_t>::type;
  for (int64_t g = 0; g < kVecs; ++g) {
    vec acc[PC] = {};
    for (int64_t i = 0; i < rows; ++i) {
      const vec x = packed[i * kVecs + g];
      const scalar_t* wi = dw + i * p4;
      for (int t = 0; t < PC; ++t) acc[t] += wi[t] * x;
    }
    for (int64_t t = 0; t < valid; ++t) buf[t * kVecs + g] += acc[t];
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void tile_body(const Plan<scalar_t>& plan, double* out, int64_t j0,
                                                     typename VecOf<scalar_t>::type* packed,
                                                     typename VecOf<scalar_t>::type* buf) {
  using vec = typename VecOf<scalar_t>::type;
  constexpr int64_t lanes = kVecBytes / sizeof(scalar_t);
  constexpr int64_t tile = kVecs * lanes;
  const int64_t width = std::min(tile, plan.n - j0);
  std::memset(static_cast<void*>(buf), 0, plan.d * kTileBytes);
  for (int64_t q = 0; q < plan.panels; ++q) {
    const int64_t p0 = q * kPanel;
    const int64_t rows = std::min(kPanel, plan.b - p0);
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* dst = reinterpret_cast<scalar_t*>(packed + i * kVecs);
      std::memcpy(dst, plan.block + (p0 + i) * plan.ldb + j0, width * sizeof(scalar_t));
      if (width < tile) std::fill(dst + width, dst + tile, scalar_t(0));
    }
    const int64_t* off = plan.off.data() + q * plan.ds;
    const int32_t* src = plan.src.data();
    const scalar_t* weight = plan.weight.data();
    // the next panel's strips are prefetched a few rows per target row, so that their misses (each row is on
    // another page: DRAM and page walks) overlap this panel's sums
    const int64_t next_rows = q + 1 < plan.panels ? std::min(kPanel, plan.b - p0 - kPanel) : 0;
    const char* next = reinterpret_cast<const char*>(plan.block + j0);
    const int64_t row_bytes = plan.ldb * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t strip = width * static_cast<int64_t>(sizeof(scalar_t));
    int64_t ahead = 0;
    for (int64_t t = 0; t < plan.ds; ++t) {
      for (const int64_t stop = (t + 1) * next_rows / plan.ds; ahead < stop; ++ahead) {
        const char* r = next + (p0 + kPanel + ahead) * row_bytes;
        for (int64_t k = 0; k < strip; k += 64) __builtin_prefetch(r + k, 0, 3);
        __builtin_prefetch(r + strip - 1, 0, 3);
      }
      const int64_t e0 = off[t];
      const int64_t e1 = off[t + 1];
      if (e0 == e1) continue;
      vec acc[kVecs] = {};
      for (int64_t e = e0; e < e1; ++e) {
        const vec* s = packed + static_cast<int64_t>(src[e]) * kVecs;
        const scalar_t w = weight[e];
        for (int64_t v = 0; v < kVecs; ++v) acc[v] += w * s[v];
      }
      vec* bt = buf + t * kVecs;
      for (int64_t v = 0; v < kVecs; ++v) bt[v] += acc[v];
    }
    for (int64_t c0 = 0; c0 < plan.p4; c0 += kDenseChunk) {
      const int64_t pc = std::min(kDenseChunk, plan.p4 - c0);
      const int64_t valid = std::min(pc, plan.p - c0);
      const scalar_t* dw = plan.dense.data() + p0 * plan.p4 + c0;
      vec* bd = buf + (plan.ds + c0) * kVecs;
      if (pc == 12) {
        dense_chunk<scalar_t, 12>(packed, rows, dw, plan.p4, valid, bd);
      } else if (pc == 8) {
        dense_chunk<scalar_t, 8>(packed, rows, dw, plan.p4, valid, bd);
      } else {
        dense_chunk<scalar_t, 4>(packed, rows, dw, plan.p4, valid, bd);
      }
    }
  }
  for (int64_t t = 0; t < plan.d; ++t) {
    double* o = out + t * plan.n + j0;
    const scalar_t* s = reinterpret_cast<const scalar_t*>(buf + t * kVecs);
    for (int64_t j = 0; j < width; ++j) o[j] += static_cast<double>(s[j]);
  }
}

template <typename scalar_t>
void tile_default(const Plan<scalar_t>& plan, double* out, int64_t j0, typename VecOf<scalar_t>::type* packed,
                  typename VecOf<scalar_t>::type* buf) {
  tile_body<scalar_t>(plan, out, j0, packed, buf);
}

#if defined(__GNUC__) && defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void tile_avx2(const Plan<scalar_t>& plan, double* out, int64_t j0,
                                                   typename VecOf<scalar_t>::type* packed,
                                                   typename VecOf<scalar_t>::type* buf) {
  tile_body<scalar_t>(plan, out, j0, packed, buf);
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename scalar_t>
void add_rows(double* out, int64_t d, int64_t n, const scalar_t* block, int64_t ldb, int64_t b, const int64_t* rows,
              const double* signs, int64_t zeta, const double* dense, int64_t p) {
  using vec = typename VecOf<scalar_t>::type;
  constexpr int64_t tile = kTileBytes / static_cast<int64_t>(sizeof(scalar_t));
  Plan<scalar_t> plan;
  plan.b = b;
  plan.n = n;
  plan.d = d;
  plan.ds = d - p;
  plan.p = p;
  plan.p4 = (p + kDenseAlign - 1) / kDenseAlign * kDenseAlign;
  plan.panels = (b + kPanel - 1) / kPanel;
  plan.block = block;
  plan.ldb = ldb;
  // stable counting sort of the nonzeros by (panel, target row)
  plan.off.assign(plan.panels * plan.ds + 1, 0);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t base = (i / kPanel) * plan.ds + 1;
    for (int64_t z = 0; z < zeta; ++z) ++plan.off[base + rows[i * zeta + z]];
  }
  for (int64_t k = 0; k + 1 < static_cast<int64_t>(plan.off.size()); ++k) plan.off[k + 1] += plan.off[k];
  std::vector<int64_t> pos(plan.off.begin(), plan.off.end() - 1);
  plan.src.resize(b * zeta);
  plan.weight.resize(b * zeta);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t base = (i / kPanel) * plan.ds;
    for (int64_t z = 0; z < zeta; ++z) {
      const int64_t k = pos[base + rows[i * zeta + z]]++;
      plan.src[k] = static_cast<int32_t>(i % kPanel);
      plan.weight[k] = static_cast<scalar_t>(signs[i * zeta + z]);
    }
  }
  if (p > 0) {
    plan.dense.assign(b * plan.p4, scalar_t(0));
    for (int64_t i = 0; i < b; ++i)
      for (int64_t t = 0; t < p; ++t) plan.dense[i * plan.p4 + t] = static_cast<scalar_t>(dense[i * p + t]);
  }
  const int64_t tiles = (n + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    // 64-byte aligned (vector loads and stores; std::vector does not promise over-alignment here)
    AlignedBuffer packed(kPanel * kTileBytes);
    AlignedBuffer buf(d * kTileBytes);
    vec* pk = static_cast<vec*>(packed.get());
    vec* bf = static_cast<vec*>(buf.get());
    for (int64_t t = t0; t < t1; ++t) {
#if defined(__GNUC__) && defined(__x86_64__)
      if (has_avx2()) {
        tile_avx2<scalar_t>(plan, out, t * tile, pk, bf);
        continue;
      }
#endif
      tile_default<scalar_t>(plan, out, t * tile, pk, bf);
    }
  });
}

}  // namespace

at::Tensor& sparse_sign_add_cpu(at::Tensor& out, const at::Tensor& block, const at::Tensor& rows,
                                const at::Tensor& signs, const c10::optional<at::Tensor>& dense) {
  check_sparse_sign_add_args(out, block, rows, signs, dense);
  const int64_t d = out.size(0);
  const int64_t n = out.size(1);
  const int64_t b = block.size(0);
  const int64_t zeta = rows.size(1);
  const int64_t p = dense.has_value() ? dense->size(1) : 0;
  const int64_t ds = d - p;
  const at::Tensor rows_c = rows.contiguous();
  const int64_t* r = rows_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * zeta; ++i) {
    TORCH_CHECK_VALUE(r[i] >= 0 && r[i] < ds, "sparse_sign_add_: rows holds ", r[i], " at flat index ", i,
                      "; every entry must lie in [0, ", ds, ") (out has ", d, " rows",
                      p > 0 ? ", the last of which receive the dense rows" : "", ")");
  }
  if (b == 0 || n == 0 || (zeta == 0 && p == 0)) return out;
  const at::Tensor signs_c = signs.contiguous();
  const at::Tensor dense_c = p > 0 ? dense->contiguous() : at::Tensor();
  // rows of block must be unit-stride (a row tile is read as one run); other layouts are copied once
  const at::Tensor blk = (block.stride(1) == 1 || n == 1) ? block : block.contiguous();
  const int64_t ldb = blk.stride(0);
  double* o = out.data_ptr<double>();
  const double* sg = signs_c.data_ptr<double>();
  const double* dn = p > 0 ? dense_c.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(blk.scalar_type(), "sparse_sign_add_", [&] {
    add_rows<scalar_t>(o, d, n, blk.data_ptr<scalar_t>(), ldb, b, r, sg, zeta, dn, p);
  });
  return out;
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("sparse_sign_add_", &sparse_sign_add_cpu); }

}  // namespace lowrank
