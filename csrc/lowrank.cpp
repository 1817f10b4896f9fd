// The lowrank operator library: every op schema, declared once. Backends register in csrc/cpu and
// csrc/cuda; the Meta (fake tensor) kernels live here because they share the argument checks of the
// real kernels (one source of truth for shapes and error messages). They read sizes as SymInts (shape_int.h), so
// dynamic dimensions under torch.compile / torch.export stay symbolic.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>  // torch >= 2.9
#else
#include <torch/version.h>
#endif
#include <torch/library.h>

#include "lora_linear.h"
#include "lora_linear_multi.h"
#include "lora_linear_quantized.h"
#include "range_gram.h"
#include "sparse_sign.h"

namespace lowrank {
PyMethodDef* python_methods();  // csrc/lora_linear_python.cpp: the module's functions
}  // namespace lowrank

#define LOWRANK_STR_(x) #x
#define LOWRANK_STR(x) LOWRANK_STR_(x)

extern "C" {
// `import lowrank._C` loads this library, which runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lowrank compiled operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddFunctions(module, lowrank::python_methods()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  PyModule_AddStringConstant(
      module, "torch_version",
      LOWRANK_STR(TORCH_VERSION_MAJOR) "." LOWRANK_STR(TORCH_VERSION_MINOR) "." LOWRANK_STR(TORCH_VERSION_PATCH));
#ifdef LOWRANK_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
}

namespace lowrank {

at::Tensor lora_linear_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias) {
  // Devices are compared here too: under FakeTensorMode every input presents as meta, while a real tensor mixed
  // with a meta one dispatches here and must be an error, not an uninitialised result on the real device.
  const auto shape = check_lora_linear_args<c10::SymInt>(x, weight, lora_A, lora_B, bias, /*check_devices=*/true);
  return at::empty_symint(shape.out_sizes, x.options());
}

// The multi-adapter Meta kernels compare devices too: under FakeTensorMode every input presents as meta, and a
// real tensor mixed with a meta one (e.g. meta adapter_ids with CPU x) is an error, not a silent meta result.
at::Tensor lora_linear_multi_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
                                  const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_multi_args<c10::SymInt>("lora_linear_multi", x, weight, lora_A, lora_B,
                                                               adapter_ids, scales, bias, /*check_devices=*/true);
  return at::empty_symint(shape.out_sizes, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_multi_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales, std::array<bool, 4> mask) {
  check_lora_linear_multi_args<c10::SymInt>("lora_linear_multi_backward", x, weight, lora_A, lora_B, adapter_ids,
                                            scales, c10::nullopt, /*check_devices=*/true);
  const auto grad = [](bool wanted, const at::Tensor& like) {
    return wanted ? at::empty_symint(like.sym_sizes(), like.options()) : at::empty({0}, like.options());
  };
  return {grad(mask[0], x), grad(mask[1], lora_A), grad(mask[2], lora_B), grad(mask[3], scales)};
}

at::Tensor lora_linear_quantized_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                      const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_quantized_args<c10::SymInt>(x, qweight, weight_scale, lora_A, lora_B, bias);
  return at::empty_symint(shape.out_sizes, x.options());
}

at::Tensor& sparse_sign_add_meta(at::Tensor& out, const at::Tensor& block, const at::Tensor& rows,
                                 const at::Tensor& signs, const c10::optional<at::Tensor>& dense) {
  check_sparse_sign_add_args(out, block, rows, signs, dense);
  return out;
}

at::Tensor range_gram_meta(const at::Tensor& block, const at::Tensor& omega, int64_t chunk_rows, bool gram,
                           at::Tensor& out, const c10::optional<at::Tensor>& colsum) {
  check_range_gram_args(block, omega, chunk_rows, gram, out, colsum);
  const int64_t s = gram ? omega.size(1) : 0;
  return at::empty({s, s}, block.options().dtype(at::kDouble));
}

// Autocast: the LoRA ops follow F.linear's policy (a "lower precision" op). Inside torch.autocast every floating
// activation-side input (x, weight, the factors, bias) is cast to the autocast dtype of its device (float64 and
// tensors on other devices are left alone, as torch's cached_cast does), so a layer built on the op sees bf16
// activations with fp32 parameters the way F.linear does. The per-row scales of the quantized op, the per-adapter
// scales and the ids of the multi op keep their dtypes. The kernels then run with the autocast key excluded, so
// the ATen calls inside them (GEMMs of the composite paths) are not cast a second time against the op's own
// buffers (which failed with mixed-dtype errors before). The multi-adapter backward is not cast, only shielded.
template <c10::DeviceType device_type>
struct AutocastLora {
  static at::Tensor cast(const at::Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(device_type), t,
                                     device_type);
  }
  static c10::optional<at::Tensor> cast(const c10::optional<at::Tensor>& t) {
    return t.has_value() ? c10::optional<at::Tensor>(cast(*t)) : c10::nullopt;
  }
  static at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::lora_linear", "").typed<decltype(lora_linear_meta)>();
    return op.call(cast(x), cast(weight), cast(lora_A), cast(lora_B), scale, cast(bias));
  }
  static at::Tensor lora_linear_multi(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                      const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
                                      const c10::optional<at::Tensor>& bias) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lowrank::lora_linear_multi", "")
                               .typed<decltype(lora_linear_multi_meta)>();
    return op.call(cast(x), cast(weight), cast(lora_A), cast(lora_B), adapter_ids, scales, cast(bias));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_multi_backward(
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
      const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales, std::array<bool, 4> mask) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lowrank::lora_linear_multi_backward", "")
                               .typed<decltype(lora_linear_multi_backward_meta)>();
    return op.call(grad_out, x, weight, lora_A, lora_B, adapter_ids, scales, mask);
  }
  static at::Tensor lora_linear_quantized(const at::Tensor& x, const at::Tensor& qweight,
                                          const at::Tensor& weight_scale, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B, double scale,
                                          const c10::optional<at::Tensor>& bias) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lowrank::lora_linear_quantized", "")
                               .typed<decltype(lora_linear_quantized_meta)>();
    return op.call(cast(x), qweight, weight_scale, cast(lora_A), cast(lora_B), scale, cast(bias));
  }
};

TORCH_LIBRARY(lowrank, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? bias) -> Tensor");
  m.def(
      "lora_linear_multi(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor adapter_ids, Tensor scales, "
      "Tensor? bias) -> Tensor");
  m.def(
      "lora_linear_multi_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor "
      "adapter_ids, Tensor scales, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_linear_quantized(Tensor x, Tensor qweight, Tensor weight_scale, Tensor lora_A, Tensor lora_B, float scale, "
      "Tensor? bias) -> Tensor");
  m.def("sparse_sign_add_(Tensor(a!) out, Tensor block, Tensor rows, Tensor signs, Tensor? dense=None) -> Tensor(a!)");
  m.def(
      "sketch_row_draws_(int key, int start, int[] sizes, int[] zetas, Tensor(a!) rows, Tensor(b!) signs, "
      "Tensor(c!) gauss) -> ()");
  m.def(
      "range_gram(Tensor block, Tensor omega, int chunk_rows, bool gram=True, *, Tensor(a!) out, Tensor(b!)? "
      "colsum=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank, Meta, m) {
  m.impl("lora_linear", &lora_linear_meta);
  m.impl("lora_linear_multi", &lora_linear_multi_meta);
  m.impl("lora_linear_multi_backward", &lora_linear_multi_backward_meta);
  m.impl("lora_linear_quantized", &lora_linear_quantized_meta);
  m.impl("sparse_sign_add_", &sparse_sign_add_meta);
  m.impl("range_gram", &range_gram_meta);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  using Cast = AutocastLora<c10::DeviceType::CPU>;
  m.impl("lora_linear", &Cast::lora_linear);
  m.impl("lora_linear_multi", &Cast::lora_linear_multi);
  m.impl("lora_linear_multi_backward", &Cast::lora_linear_multi_backward);
  m.impl("lora_linear_quantized", &Cast::lora_linear_quantized);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  using Cast = AutocastLora<c10::DeviceType::CUDA>;
  m.impl("lora_linear", &Cast::lora_linear);
  m.impl("lora_linear_multi", &Cast::lora_linear_multi);
  m.impl("lora_linear_multi_backward", &Cast::lora_linear_multi_backward);
  m.impl("lora_linear_quantized", &Cast::lora_linear_quantized);
}

}  // namespace lowrank
