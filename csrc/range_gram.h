// Shared by every backend of lowrank::range_gram: argument checks.
//
// out = block @ omega (b x s, the block's dtype) and the returned Gram matrix out^T out (s x s, float64), both
// formed in row chunks of chunk_rows rows: the range sketch Y = A Omega of lowrank.StreamingSVD and its float64
// Gram matrix in one pass over each chunk (with gram = false the GEMM alone, and a 0 x 0 result); with colsum (s,
// float64, gram = true) also the float64 column sums 1^T out of the same chunk copies. The CPU kernel is
// csrc/cpu/range_gram.cpp; other devices use the torch fallback of lowrank/_ops.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "memory_overlap.h"

namespace lowrank {

// Shape, dtype and device checks (ValueError / TypeError in Python, each naming the argument).
inline void check_range_gram_args(const at::Tensor& block, const at::Tensor& omega, int64_t chunk_rows, bool gram,
                                  const at::Tensor& out, const c10::optional<at::Tensor>& colsum) {
  constexpr const char* op = "range_gram";
  TORCH_CHECK_VALUE(block.dim() == 2, op, ": block must be 2-D (b, n), got shape ", block.sizes());
  TORCH_CHECK_VALUE(omega.dim() == 2, op, ": omega must be 2-D (n, s), got shape ", omega.sizes());
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out must be 2-D (b, s), got shape ", out.sizes());
  TORCH_CHECK_VALUE(omega.size(0) == block.size(1), op, ": omega has ", omega.size(0), " rows but block has ",
                    block.size(1), " columns");
  TORCH_CHECK_VALUE(out.size(0) == block.size(0) && out.size(1) == omega.size(1), op, ": out must have shape (",
                    block.size(0), ", ", omega.size(1), "), got ", out.sizes());
  TORCH_CHECK_VALUE(chunk_rows >= 1, op, ": chunk_rows must be >= 1, got ", chunk_rows);
  TORCH_CHECK_TYPE(block.scalar_type() == at::kFloat || block.scalar_type() == at::kDouble, op,
                   ": block must be float32 or float64, got ", block.scalar_type());
  TORCH_CHECK_TYPE(omega.scalar_type() == block.scalar_type() && out.scalar_type() == block.scalar_type(), op,
                   ": omega and out must have the dtype of block (", block.scalar_type(), "), got ",
                   omega.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous (it is written in place)");
  const auto device = block.device();
  TORCH_CHECK_VALUE(omega.device() == device && out.device() == device, op,
                    ": all tensors must be on one device, got block on ", device, ", omega on ", omega.device(),
                    ", out on ", out.device());
  // out is written while block and omega are read, chunk by chunk: a shared byte would be read after its write
  TORCH_CHECK_VALUE(!memory_spans_overlap(out, block), op, ": out must not overlap block in memory");
  TORCH_CHECK_VALUE(!memory_spans_overlap(out, omega), op, ": out must not overlap omega in memory");
  if (colsum.has_value()) {
    const at::Tensor& c = *colsum;
    TORCH_CHECK_VALUE(gram, op, ": colsum needs gram=True (the sums come from the Gram matrix's float64 copies)");
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == omega.size(1), op, ": colsum must have shape (", omega.size(1),
                      ",), got ", c.sizes());
    TORCH_CHECK_TYPE(c.scalar_type() == at::kDouble, op, ": colsum must be float64, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.is_contiguous(), op, ": colsum must be contiguous (it is written in place)");
    TORCH_CHECK_VALUE(c.device() == device, op, ": all tensors must be on one device, got block on ", device,
                      ", colsum on ", c.device());
    TORCH_CHECK_VALUE(
        !memory_spans_overlap(c, block) && !memory_spans_overlap(c, omega) && !memory_spans_overlap(c, out), op,
        ": colsum must not overlap block, omega or out in memory");
  }
}

}  // namespace lowrank
