// CPU kernel of lowrank::sketch_row_draws_: the row-side random test matrices of lowrank.StreamingSVD, drawn per
// global row from a counter-based generator, so that row i's draws depend on (key, i) alone and not on how the
// stream is cut into blocks, on the thread count, or on which rows were drawn before.
//
// Generator: SplitMix64 (G. L. Steele, D. Lea, C. H. Flood, "Fast splittable pseudorandom number generators",
// OOPSLA 2014; the output mix is Stafford's "Mix13" variant), used as a counter-based generator: word j of row i
// is mix(key + (i * W + j + 1) * gamma) with gamma = 0x9E3779B97F4A7C15 and W the words per row, which is the
// SplitMix64 sequence seeded with key, read at position i * W + j. Per row, in this order:
//   - for each group g: zetas[g] words, Floyd's algorithm (J. Bentley, "Programming pearls: a sample of
//     brilliance", CACM 30(9), 1987) picking distinct targets in [offset_g, offset_g + sizes[g]) (offset_g the
//     sum of the earlier sizes), step t taking floor(word * (j + 1) / 2^64) with j = sizes[g] - zetas[g] + t,
//     or j when that pick was taken already;
//   - ceil(sum(zetas) / 64) words of sign bits (bit t of the stream of words: +1 when set, else -1);
//   - 1 word per pair of standard Gaussians (G. Marsaglia & T. A. Bray, "A convenient method for generating normal
//     variables", SIAM Review 6(3), 1964: the polar method, 53-bit uniforms on [-1, 1), its rejection loop on a
//     SplitMix64 sequence that starts at the pair's word), rounded to float32 (stored as float64), so that float32
//     and float64 streams see the same test matrix.
// Rows are independent, so at::parallel_for over rows gives the same values on any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lowrank {

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// floor(word * bound / 2^64): a uniform pick of [0, bound) (bias below bound / 2^64).
inline int64_t below(uint64_t word, int64_t bound) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(word) * static_cast<uint64_t>(bound)) >> 64);
}

}  // namespace

void sketch_row_draws_cpu(int64_t key, int64_t start, at::IntArrayRef sizes, at::IntArrayRef zetas, at::Tensor& rows,
                          at::Tensor& signs, at::Tensor& gauss) {
  constexpr const char* op = "sketch_row_draws_";
  TORCH_CHECK_VALUE(start >= 0, op, ": start must be >= 0, got ", start);
  TORCH_CHECK_VALUE(sizes.size() == zetas.size(), op, ": sizes has ", sizes.size(), " entries but zetas has ",
                    zetas.size());
  int64_t nz = 0;
  int64_t total = 0;  // the targets are offsets into the concatenated groups: their sum must fit int64
  for (size_t g = 0; g < sizes.size(); ++g) {
    TORCH_CHECK_VALUE(zetas[g] >= 0 && zetas[g] <= sizes[g], op, ": zetas[", g, "] = ", zetas[g],
                      " must lie in [0, sizes[", g, "] = ", sizes[g], "]");
    TORCH_CHECK_VALUE(sizes[g] <= INT64_MAX - total, op, ": sum(sizes) must be < 2**63");
    total += sizes[g];
    nz += zetas[g];
  }
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(1) == nz, op, ": rows must be 2-D (count, ", nz,
                    " = sum(zetas)), got shape ", rows.sizes());
  TORCH_CHECK_VALUE(signs.sizes() == rows.sizes(), op, ": signs has shape ", signs.sizes(), " but rows has shape ",
                    rows.sizes());
  TORCH_CHECK_VALUE(gauss.dim() == 2 && gauss.size(0) == rows.size(0), op, ": gauss must be 2-D (count, q) with ",
                    "count = ", rows.size(0), ", got shape ", gauss.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, op, ": rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK_TYPE(signs.scalar_type() == at::kDouble, op, ": signs must be float64, got ", signs.scalar_type());
  TORCH_CHECK_TYPE(gauss.scalar_type() == at::kDouble, op, ": gauss must be float64, got ", gauss.scalar_type());
  TORCH_CHECK_VALUE(rows.device().is_cpu() && signs.device().is_cpu() && gauss.device().is_cpu(), op,
                    ": rows, signs and gauss must be CPU tensors");
  TORCH_CHECK_VALUE(rows.is_contiguous() && signs.is_contiguous(), op, ": rows and signs must be contiguous");
  TORCH_CHECK_VALUE(gauss.size(1) <= 1 || gauss.stride(1) == 1, op, ": gauss must have unit column stride");
  const int64_t count = rows.size(0);
  const int64_t q = gauss.size(1);
  const int64_t sign_words = (nz + 63) / 64;
  const int64_t words = nz + sign_words + (q + 1) / 2;
  TORCH_CHECK_VALUE(start <= (INT64_MAX / 2) / std::max<int64_t>(1, words) - count, op, ": start = ", start,
                    " is too large");
  if (count == 0) return;
  const int64_t groups = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> size(sizes.begin(), sizes.end());
  std::vector<int64_t> zeta(zetas.begin(), zetas.end());
  std::vector<int64_t> offset(groups, 0);
  for (int64_t g = 1; g < groups; ++g) offset[g] = offset[g - 1] + size[g - 1];
  const uint64_t base = static_cast<uint64_t>(key);
  int64_t* r = rows.data_ptr<int64_t>();
  double* sg = signs.data_ptr<double>();
  double* gs = gauss.data_ptr<double>();
  const int64_t ldg = gauss.stride(0);
  at::parallel_for(0, count, 512, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      uint64_t counter = static_cast<uint64_t>(start + i) * static_cast<uint64_t>(words);
      int64_t* picks = r + i * nz;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t z = zeta[g];
        for (int64_t t = 0; t < z; ++t) {
          const int64_t j = size[g] - z + t;
          int64_t pick = offset[g] + below(mix64(base + (++counter) * kGamma), j + 1);
          for (int64_t u = 0; u < t; ++u) {
            if (picks[u] == pick) {
              pick = offset[g] + j;
              break;
            }
          }
          picks[t] = pick;
        }
        picks += z;
      }
      double* si = sg + i * nz;
      for (int64_t t0 = 0; t0 < nz; t0 += 64) {
        const uint64_t bits = mix64(base + (++counter) * kGamma);
        const int64_t t1 = std::min<int64_t>(nz, t0 + 64);
        for (int64_t t = t0; t < t1; ++t)
          si[t] = static_cast<double>(static_cast<int64_t>((bits >> (t - t0)) & 1) * 2 - 1);
      }
      // Marsaglia's polar method per pair, its rejection loop on a SplitMix64 sequence of its own that starts at
      // the pair's word (so every pair takes one word of the row, however many tries it needs)
      double* gi = gs + i * ldg;
      for (int64_t t = 0; t < q; t += 2) {
        uint64_t x = mix64(base + (++counter) * kGamma);
        double u, v, sq;
        do {
          x += kGamma;
          u = static_cast<double>(mix64(x) >> 11) * 0x1.0p-52 - 1.0;
          x += kGamma;
          v = static_cast<double>(mix64(x) >> 11) * 0x1.0p-52 - 1.0;
          sq = u * u + v * v;
        } while (sq >= 1.0 || sq == 0.0);
        const double f = std::sqrt(-2.0 * std::log(sq) / sq);
        gi[t] = static_cast<double>(static_cast<float>(u * f));
        if (t + 1 < q) gi[t + 1] = static_cast<double>(static_cast<float>(v * f));
      }
    }
  });
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("sketch_row_draws_", &sketch_row_draws_cpu); }

}  // namespace lowrank
