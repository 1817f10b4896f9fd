// Shared by the in-place / out= operators' argument checks: whether two tensors share memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace lowrank {

// Whether the memory spans of two strided tensors with storage intersect (the span of each from its first to its
// last element, in bytes; conservative: interleaved views of one buffer count as overlapping). Meta tensors have no
// memory: false.
inline bool memory_spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_meta() || b.is_meta() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

}  // namespace lowrank
