// Shared by every backend of lowrank::sparse_sign_add_: argument checks.
//
// out[rows[i, t], :] += signs[i, t] * block[i, :] for every row i of block and t < zeta: the product of a sparse
// (d x b) matrix with zeta nonzeros per column (a sparse sign test matrix, Tropp et al. 2019 §3.3) and a dense
// block (b x n), accumulated into out (d x n, float64). With dense (b x p, float64), the last p rows of out also
// receive dense^T block (out[d - p + t, :] += sum_i dense[i, t] * block[i, :]; a few dense test rows read in the
// same pass over block), and rows must then point into the first d - p rows. The CPU kernel is
// csrc/cpu/sparse_sign.cpp; other devices use the torch fallback of lowrank/_ops.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "memory_overlap.h"

namespace lowrank {

// Shape, dtype and device checks (ValueError / TypeError in Python, each naming the argument). The bounds of the
// entries of rows are checked by the kernels that read them.
inline void check_sparse_sign_add_args(const at::Tensor& out, const at::Tensor& block, const at::Tensor& rows,
                                       const at::Tensor& signs, const c10::optional<at::Tensor>& dense) {
  constexpr const char* op = "sparse_sign_add_";
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out must be 2-D (d, n), got shape ", out.sizes());
  TORCH_CHECK_VALUE(block.dim() == 2, op, ": block must be 2-D (b, n), got shape ", block.sizes());
  TORCH_CHECK_VALUE(rows.dim() == 2, op, ": rows must be 2-D (b, zeta), got shape ", rows.sizes());
  TORCH_CHECK_VALUE(signs.sizes() == rows.sizes(), op, ": signs has shape ", signs.sizes(), " but rows has shape ",
                    rows.sizes());
  TORCH_CHECK_VALUE(block.size(1) == out.size(1), op, ": block has ", block.size(1), " columns but out has ",
                    out.size(1));
  TORCH_CHECK_VALUE(rows.size(0) == block.size(0), op, ": rows has ", rows.size(0), " rows but block has ",
                    block.size(0));
  TORCH_CHECK_TYPE(out.scalar_type() == at::kDouble, op, ": out must be float64, got ", out.scalar_type());
  TORCH_CHECK_TYPE(block.scalar_type() == at::kFloat || block.scalar_type() == at::kDouble, op,
                   ": block must be float32 or float64, got ", block.scalar_type());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, op, ": rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK_TYPE(signs.scalar_type() == at::kDouble, op, ": signs must be float64, got ", signs.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous (it is written in place)");
  const auto device = out.device();
  TORCH_CHECK_VALUE(block.device() == device && rows.device() == device && signs.device() == device, op,
                    ": all tensors must be on one device, got out on ", device, ", block on ", block.device(),
                    ", rows on ", rows.device(), ", signs on ", signs.device());
  if (dense.has_value()) {
    const at::Tensor& w = *dense;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == block.size(0), op,
                      ": dense must be 2-D (b, p) with b = ", block.size(0), " (the rows of block), got shape ",
                      w.sizes());
    TORCH_CHECK_VALUE(w.size(1) <= out.size(0), op, ": dense has ", w.size(1), " columns but out has only ",
                      out.size(0), " rows");
    TORCH_CHECK_TYPE(w.scalar_type() == at::kDouble, op, ": dense must be float64, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == device, op, ": all tensors must be on one device, got out on ", device,
                      ", dense on ", w.device());
    TORCH_CHECK_VALUE(!memory_spans_overlap(out, w), op, ": out must not overlap dense in memory");
  }
  // out is written while the others are read
  TORCH_CHECK_VALUE(!memory_spans_overlap(out, block), op, ": out must not overlap block in memory");
  TORCH_CHECK_VALUE(!memory_spans_overlap(out, rows), op, ": out must not overlap rows in memory");
  TORCH_CHECK_VALUE(!memory_spans_overlap(out, signs), op, ": out must not overlap signs in memory");
}

}  // namespace lowrank
