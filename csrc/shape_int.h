// Sizes for the argument checks that every backend of an op and its Meta kernel share: int64_t in the real kernels,
// c10::SymInt in the Meta kernels. Under torch.compile / torch.export a dynamic dimension (the batch, the sequence)
// is a symbol; reading it as an int64_t (Tensor::size, Tensor::sizes) specializes it -- one recompilation per batch
// size, and a failed export with a dynamic batch dimension. The Meta kernels read sym_size / sym_sizes instead and
// build the output with empty_symint; equality checks between feature dimensions still guard, as torch's own
// meta functions do.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace lowrank {

// The problem sizes of lora_linear and lora_linear_quantized, as their argument checks return them.
template <typename Int>
struct LoraLinearShapeT {
  Int rows;  // M: the product of x's leading dimensions
  Int in_features;
  Int out_features;
  Int rank;
  std::vector<Int> out_sizes;  // x.shape[:-1] + (out_features,)
};

template <typename Int>
inline Int size_of(const at::Tensor& t, int64_t d) {
  if constexpr (std::is_same_v<Int, int64_t>) {
    return t.size(d);
  } else {
    return t.sym_size(d);
  }
}

template <typename Int>
inline auto sizes_of(const at::Tensor& t) {
  if constexpr (std::is_same_v<Int, int64_t>) {
    return t.sizes();
  } else {
    return t.sym_sizes();
  }
}

}  // namespace lowrank
