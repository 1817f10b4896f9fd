// CUDA kernels of lowrank::lora_linear_multi and its backward (mixed-adapter batches).
//
// Decode shapes -- M <= kDecodeMaxRows, or fewer than kSegmentMinRows rows per *stacked* adapter
// (M < kSegmentMinRows * num_adapters), or any M while the stream is being captured into a CUDA graph -- take
// BGMV-style gather kernels, in the spirit of punica (Chen et al., 2024), chosen from the shapes alone:
//   y = x W^T (+ bias)                      cuBLAS through ATen (W streamed once; memory bound at small M)
//   u[i, :] = x[i] A[a_i]^T                 bgmv_shrink: one warp per (row, rank), the `in` axis split over
//                                           blockIdx.z so that small M still fills the GPU; partial sums
//                                           meet in a zeroed fp32 (M, r) buffer through atomicAdd
//   y[i, :] += scales[a_i] u[i, :] B[a_i]^T bgmv_expand: one thread per output feature, u[i] in shared memory
// This path never reads adapter_ids on the host: no synchronisation, and it can be captured in a CUDA graph
// and replayed with new ids. The ids are validated on the device instead: an id outside [-1, num_adapters)
// trips a device-side assertion (as torch's own index kernels do), reported by the next synchronising call.
// Each row reads its own adapter's A and B; rows that share an adapter hit L2. Rows with id -1 are skipped
// by both kernels. 16-byte vector loads are used only when the base pointers are 16-byte aligned and the
// row length (in for x/A, r for B) is a multiple of the vector width, so every row stays aligned;
// otherwise a scalar path runs (no tail can be read out of bounds). Accumulation is fp32 (fp64 for fp64).
//
// Prefill shapes (otherwise: many rows per adapter): SGMV-style segments. The ids are copied to the host
// (one synchronising copy; out-of-range ids raise ValueError there), the rows grouped by adapter (counting
// sort), and the shared composite path runs one base GEMM plus, per adapter present, a shrink and an expand
// GEMM on its rows (cuBLAS per segment through ATen; in place when the adapter's rows are contiguous,
// gathered/scattered with index_select/index_add_ otherwise). One cuBLAS launch pair per adapter; a grouped
// GEMM kernel would remove the per-segment launches and the host copy.
//
// The backward always takes the segment path (per-adapter cuBLAS GEMMs, lora_linear_multi.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "lora_linear_multi.h"

namespace lowrank {

namespace {

constexpr const char* kForward = "lora_linear_multi";
constexpr const char* kBackward = "lora_linear_multi_backward";
constexpr int64_t kDecodeMaxRows = 64;   // BGMV up to here, ...
constexpr int64_t kSegmentMinRows = 64;  // ... and above when the adapters average fewer rows than this
constexpr int kShrinkWarps = 4;          // ranks per shrink block (one warp each)
constexpr int kExpandThreads = 256;      // output features per expand block
constexpr int kMaxSharedBytes = 48 * 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// u[i, k] += sum over this block's slice of `in` of x[i, j] A[a_i, k, j] (unscaled; u zeroed beforehand).
// Grid: (M, ceil(r / kShrinkWarps), splits); block: (32, kShrinkWarps). kVec: 16-byte loads (the caller
// guarantees aligned bases and in % (16 / sizeof(scalar_t)) == 0); chunk is a multiple of the vector width.
template <typename scalar_t, typename acc_t, typename id_t, bool kVec>
__global__ void bgmv_shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lora_A,
                                   const id_t* __restrict__ ids, acc_t* __restrict__ u, int64_t in, int64_t r,
                                   int64_t num_adapters, int64_t chunk) {
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + threadIdx.y;
  const int64_t a = static_cast<int64_t>(ids[i]);
  CUDA_KERNEL_ASSERT_MSG(a >= -1 && a < num_adapters, "lora_linear_multi: adapter_ids out of [-1, num_adapters)");
  if (a < 0 || a >= num_adapters || k >= r) return;  // skip base-only rows (and, past the assert, bad ids)
  const int64_t begin = static_cast<int64_t>(blockIdx.z) * chunk;
  const int64_t end = begin + chunk < in ? begin + chunk : in;
  const scalar_t* xr = x + i * in;
  const scalar_t* ar = lora_A + (a * r + k) * in;
  acc_t acc = 0;
  if constexpr (kVec) {
    constexpr int V = 16 / sizeof(scalar_t);
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const uint4* av = reinterpret_cast<const uint4*>(ar);
    for (int64_t j = begin / V + threadIdx.x; j < end / V; j += 32) {
      const uint4 xw = xv[j];
      const uint4 aw = __ldg(av + j);
      const scalar_t* xs = reinterpret_cast<const scalar_t*>(&xw);
      const scalar_t* as = reinterpret_cast<const scalar_t*>(&aw);
#pragma unroll
      for (int t = 0; t < V; ++t) acc += static_cast<acc_t>(xs[t]) * static_cast<acc_t>(as[t]);
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += 32) {
      acc += static_cast<acc_t>(xr[j]) * static_cast<acc_t>(ar[j]);
    }
  }
  acc = warp_sum(acc);
  if (threadIdx.x == 0 && begin < end) atomicAdd(u + i * r + k, acc);
}

// y[i, o] += scales[a_i] sum_k u[i, k] B[a_i, o, k]. Grid: (M, ceil(out / kExpandThreads)); dynamic shared
// memory r * sizeof(acc_t). kVec: 16-byte loads of B's rows (aligned base, r % (16 / sizeof) == 0).
template <typename scalar_t, typename acc_t, typename id_t, bool kVec>
__global__ void bgmv_expand_kernel(const acc_t* __restrict__ u, const scalar_t* __restrict__ lora_B,
                                   const id_t* __restrict__ ids, const acc_t* __restrict__ scales,
                                   scalar_t* __restrict__ y, int64_t out, int64_t r, int64_t num_adapters) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* us = reinterpret_cast<acc_t*>(shared_raw);
  const int64_t i = blockIdx.x;
  const int64_t a = static_cast<int64_t>(ids[i]);
  CUDA_KERNEL_ASSERT_MSG(a >= -1 && a < num_adapters, "lora_linear_multi: adapter_ids out of [-1, num_adapters)");
  if (a < 0 || a >= num_adapters) return;  // uniform over the block: no thread reaches the barrier
  const acc_t s = scales[a];
  if (s == acc_t(0)) return;  // scale 0: base only, B is not read (no 0 * inf); uniform over the block too
  for (int64_t k = threadIdx.x; k < r; k += blockDim.x) us[k] = u[i * r + k] * s;
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= out) return;
  const scalar_t* br = lora_B + (a * out + o) * r;
  acc_t acc = 0;
  if constexpr (kVec) {
    constexpr int V = 16 / sizeof(scalar_t);
    const uint4* bv = reinterpret_cast<const uint4*>(br);
    for (int64_t j = 0; j < r / V; ++j) {
      const uint4 bw = __ldg(bv + j);
      const scalar_t* bs = reinterpret_cast<const scalar_t*>(&bw);
#pragma unroll
      for (int t = 0; t < V; ++t) acc += us[j * V + t] * static_cast<acc_t>(bs[t]);
    }
  } else {
    for (int64_t k = 0; k < r; ++k) acc += us[k] * static_cast<acc_t>(br[k]);
  }
  scalar_t* yo = y + i * out + o;
  *yo = static_cast<scalar_t>(static_cast<acc_t>(*yo) + acc);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The BGMV path: y (M, out) already holds the base product; adds every row's LoRA term in place.
template <typename scalar_t, typename id_t>
void launch_bgmv(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ids,
                 const at::Tensor& scales, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = x2.size(0), in = x2.size(1), out = y.size(1);
  const int64_t n = lora_A.size(0), r = lora_A.size(1);
  constexpr int V = 16 / sizeof(scalar_t);
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor u = at::zeros({m, r}, x2.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const at::Tensor scales_acc = scales.to(u.scalar_type()).contiguous();

  // Split `in` so that about two blocks per SM are in flight even at M = 1.
  const int64_t rank_blocks = (r + kShrinkWarps - 1) / kShrinkWarps;
  const int64_t target = 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t max_splits = std::max<int64_t>(1, in / (32 * V));  // at least one full warp sweep per split
  const int64_t splits = std::min<int64_t>(std::max<int64_t>(1, target / std::max<int64_t>(1, m * rank_blocks)),
                                           std::min<int64_t>(max_splits, 65535));
  int64_t chunk = (in + splits - 1) / splits;
  chunk = (chunk + V - 1) / V * V;  // keep every split's start vector-aligned
  const dim3 shrink_grid(static_cast<unsigned>(m), static_cast<unsigned>(rank_blocks), static_cast<unsigned>(splits));
  const dim3 shrink_block(32, kShrinkWarps);
  const bool vec_a = aligned16(x2.data_ptr()) && aligned16(lora_A.data_ptr()) && in % V == 0;
  if (in > 0) {
    if (vec_a) {
      bgmv_shrink_kernel<scalar_t, acc_t, id_t, true><<<shrink_grid, shrink_block, 0, stream>>>(
          x2.const_data_ptr<scalar_t>(), lora_A.const_data_ptr<scalar_t>(), ids.const_data_ptr<id_t>(),
          u.mutable_data_ptr<acc_t>(), in, r, n, chunk);
    } else {
      bgmv_shrink_kernel<scalar_t, acc_t, id_t, false><<<shrink_grid, shrink_block, 0, stream>>>(
          x2.const_data_ptr<scalar_t>(), lora_A.const_data_ptr<scalar_t>(), ids.const_data_ptr<id_t>(),
          u.mutable_data_ptr<acc_t>(), in, r, n, chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 expand_grid(static_cast<unsigned>(m), static_cast<unsigned>((out + kExpandThreads - 1) / kExpandThreads));
  const size_t shared = static_cast<size_t>(r) * sizeof(acc_t);
  const bool vec_b = aligned16(lora_B.data_ptr()) && r % V == 0;
  if (vec_b) {
    bgmv_expand_kernel<scalar_t, acc_t, id_t, true><<<expand_grid, kExpandThreads, shared, stream>>>(
        u.const_data_ptr<acc_t>(), lora_B.const_data_ptr<scalar_t>(), ids.const_data_ptr<id_t>(),
        scales_acc.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), out, r, n);
  } else {
    bgmv_expand_kernel<scalar_t, acc_t, id_t, false><<<expand_grid, kExpandThreads, shared, stream>>>(
        u.const_data_ptr<acc_t>(), lora_B.const_data_ptr<scalar_t>(), ids.const_data_ptr<id_t>(),
        scales_acc.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), out, r, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor lora_linear_multi_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
                                  const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_multi_args(kForward, x, weight, lora_A, lora_B, adapter_ids, scales, bias,
                                                  /*check_devices=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  if (shape.rows == 0) return at::empty(shape.out_sizes, x.options());
  const at::Tensor x2 = x.reshape({shape.rows, shape.in_features}).contiguous();
  const size_t acc_bytes = x.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  // Grid limits: rows ride on gridDim.x (2^31 - 1), ranks / kShrinkWarps and output blocks on gridDim.y.
  const bool fits = shape.rank * static_cast<int64_t>(acc_bytes) <= kMaxSharedBytes &&
                    shape.rows < (int64_t{1} << 31) && (shape.rank + kShrinkWarps - 1) / kShrinkWarps <= 65535 &&
                    (shape.out_features + kExpandThreads - 1) / kExpandThreads <= 65535;
  // Chosen from the shapes only (no look at the ids: that would be a host sync). Under CUDA graph capture a
  // host copy is impossible, so every batch that fits takes the gather kernels.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const bool few_rows_per_adapter = shape.rows < kSegmentMinRows * shape.num_adapters;
  const bool decode = fits && (shape.rows <= kDecodeMaxRows || few_rows_per_adapter || capturing);
  if (decode) {
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    if (shape.out_features == 0) return with_output_shape(y, shape.out_sizes);
    const at::Tensor ids = adapter_ids.reshape({-1}).contiguous();
    const at::Tensor A = lora_A.contiguous();
    const at::Tensor B = lora_B.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_multi_bgmv", [&] {
      if (ids.scalar_type() == at::kInt) {
        launch_bgmv<scalar_t, int32_t>(x2, A, B, ids, scales, y);
      } else {
        launch_bgmv<scalar_t, int64_t>(x2, A, B, ids, scales, y);
      }
    });
    return with_output_shape(y, shape.out_sizes);
  }
  TORCH_CHECK(!capturing, kForward, ": a batch this large (", shape.rows, " rows, rank ", shape.rank,
              ") takes the segment path, which reads adapter_ids on the host and cannot be captured in a CUDA graph");
  const AdapterGroups groups = group_rows_by_adapter(adapter_ids.cpu(), shape.num_adapters, kForward);
  AdapterGroups device_groups = groups;
  if (!groups.contiguous) device_groups.perm = groups.perm.to(x.device());
  const at::Tensor y =
      lora_linear_multi_composite(x2, weight, lora_A, lora_B, scales_to_host(scales.cpu()), bias, device_groups);
  return with_output_shape(y, shape.out_sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_multi_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
    std::array<bool, 4> output_mask) {
  const auto shape = check_lora_linear_multi_args(kBackward, x, weight, lora_A, lora_B, adapter_ids, scales,
                                                  c10::nullopt, /*check_devices=*/true);
  TORCH_CHECK_VALUE(grad_out.sizes() == c10::IntArrayRef(shape.out_sizes), kBackward, ": grad_out has shape ",
                    grad_out.sizes(), " but the output has shape ", c10::IntArrayRef(shape.out_sizes));
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), kBackward, ": grad_out is on ", grad_out.device(), " but x is on ",
                    x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  AdapterGroups groups = group_rows_by_adapter(adapter_ids.cpu(), shape.num_adapters, kBackward);
  if (!groups.contiguous) groups.perm = groups.perm.to(x.device());
  const at::Tensor x2 = x.reshape({shape.rows, shape.in_features}).contiguous();
  const at::Tensor g2 = grad_out.reshape({shape.rows, shape.out_features}).contiguous();
  auto grads = lora_linear_multi_backward_composite(g2, x2, weight, lora_A, lora_B, scales,
                                                    scales_to_host(scales.cpu()), groups, output_mask);
  if (output_mask[0]) grads[0] = grads[0].view(x.sizes());
  return {grads[0], grads[1], grads[2], grads[3]};
}

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("lora_linear_multi", &lora_linear_multi_cuda);
  m.impl("lora_linear_multi_backward", &lora_linear_multi_backward_cuda);
}

}  // namespace lowrank
