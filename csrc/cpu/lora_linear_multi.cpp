// CPU kernels of lowrank::lora_linear_multi and its backward (mixed-adapter batches).
//
// The rows are grouped by adapter with a counting sort over the ids (O(M + N), lora_linear_multi.h), which
// also bounds-checks every id. Then one base GEMM covers all rows (W is streamed once, as in F.linear), and
// each adapter present adds its rank-r term with two small GEMMs on its rows: in place on a row slice of y
// when the adapter's rows are already contiguous (a single adapter, concatenated requests, all distinct),
// or on rows gathered once and scattered back with one index_add_ otherwise. The extra memory traffic is
// each present adapter's A and B (2 r (in + out) elements) plus, in the gathered case, M' (in + out) for the
// gather/scatter; no Python loop, no (M x out) temporary in the contiguous case.
//
// Parallelism: every step is a BLAS call or an ATen gather/scatter that is already multithreaded; a
// parallel_for over adapters would only pay for many adapters with very small in/out (measured: the
// segment GEMMs are a few percent of the base GEMM at 4096 x 4096, see benchmarks/bench_multi.py).
#include "lora_linear_multi.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace lowrank {

namespace {
constexpr const char* kForward = "lora_linear_multi";
constexpr const char* kBackward = "lora_linear_multi_backward";
}  // namespace

at::Tensor lora_linear_multi_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_multi_args(kForward, x, weight, lora_A, lora_B, adapter_ids, scales, bias, true);
  const AdapterGroups groups = group_rows_by_adapter(adapter_ids, shape.num_adapters, kForward);
  if (shape.rows == 0) return at::empty(shape.out_sizes, x.options());
  const at::Tensor x2 = x.reshape({shape.rows, shape.in_features}).contiguous();
  const at::Tensor y = lora_linear_multi_composite(x2, weight, lora_A, lora_B, scales_to_host(scales), bias, groups);
  return with_output_shape(y, shape.out_sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_multi_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
    std::array<bool, 4> output_mask) {
  const auto shape =
      check_lora_linear_multi_args(kBackward, x, weight, lora_A, lora_B, adapter_ids, scales, c10::nullopt, true);
  TORCH_CHECK_VALUE(grad_out.sizes() == c10::IntArrayRef(shape.out_sizes), kBackward, ": grad_out has shape ",
                    grad_out.sizes(), " but the output has shape ", c10::IntArrayRef(shape.out_sizes));
  const AdapterGroups groups = group_rows_by_adapter(adapter_ids, shape.num_adapters, kBackward);
  const at::Tensor x2 = x.reshape({shape.rows, shape.in_features}).contiguous();
  const at::Tensor g2 = grad_out.reshape({shape.rows, shape.out_features}).contiguous();
  auto grads = lora_linear_multi_backward_composite(g2, x2, weight, lora_A, lora_B, scales, scales_to_host(scales),
                                                    groups, output_mask);
  if (output_mask[0]) grads[0] = grads[0].view(x.sizes());
  return {grads[0], grads[1], grads[2], grads[3]};
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_linear_multi", &lora_linear_multi_cpu);
  m.impl("lora_linear_multi_backward", &lora_linear_multi_backward_cpu);
}

}  // namespace lowrank
