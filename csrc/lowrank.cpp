// The lowrank operator library: every op schema, declared once. Backends register in csrc/cpu and
// csrc/cuda; the Meta (fake tensor) kernels live here because they share the argument checks of the
// real kernels (one source of truth for shapes and error messages).
#include <ATen/core/Tensor.h>
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
  const auto shape = check_lora_linear_args(x, weight, lora_A, lora_B, bias, /*check_devices=*/true);
  return at::empty(shape.out_sizes, x.options());
}

// The multi-adapter Meta kernels compare devices too: under FakeTensorMode every input presents as meta, and a
// real tensor mixed with a meta one (e.g. meta adapter_ids with CPU x) is an error, not a silent meta result.
at::Tensor lora_linear_multi_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales,
                                  const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_multi_args("lora_linear_multi", x, weight, lora_A, lora_B, adapter_ids, scales,
                                                  bias, /*check_devices=*/true);
  return at::empty(shape.out_sizes, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_multi_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& adapter_ids, const at::Tensor& scales, std::array<bool, 4> mask) {
  check_lora_linear_multi_args("lora_linear_multi_backward", x, weight, lora_A, lora_B, adapter_ids, scales,
                               c10::nullopt, /*check_devices=*/true);
  const auto grad = [](bool wanted, const at::Tensor& like) {
    return wanted ? at::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
  };
  return {grad(mask[0], x), grad(mask[1], lora_A), grad(mask[2], lora_B), grad(mask[3], scales)};
}

at::Tensor lora_linear_quantized_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                      const c10::optional<at::Tensor>& bias) {
  const auto shape = check_lora_linear_quantized_args(x, qweight, weight_scale, lora_A, lora_B, bias);
  return at::empty(shape.out_sizes, x.options());
}

at::Tensor& sparse_sign_add_meta(at::Tensor& out, const at::Tensor& block, const at::Tensor& rows,
                                 const at::Tensor& signs, const c10::optional<at::Tensor>& dense) {
  check_sparse_sign_add_args(out, block, rows, signs, dense);
  return out;
}

at::Tensor range_gram_meta(const at::Tensor& block, const at::Tensor& omega, int64_t chunk_rows, bool gram,
                           at::Tensor& out) {
  check_range_gram_args(block, omega, chunk_rows, out);
  const int64_t s = gram ? omega.size(1) : 0;
  return at::empty({s, s}, block.options().dtype(at::kDouble));
}

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
  m.def("floyd_distinct(Tensor u, int[] sizes) -> Tensor");
  m.def("range_gram(Tensor block, Tensor omega, int chunk_rows, bool gram=True, *, Tensor(a!) out) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank, Meta, m) {
  m.impl("lora_linear", &lora_linear_meta);
  m.impl("lora_linear_multi", &lora_linear_multi_meta);
  m.impl("lora_linear_multi_backward", &lora_linear_multi_backward_meta);
  m.impl("lora_linear_quantized", &lora_linear_quantized_meta);
  m.impl("sparse_sign_add_", &sparse_sign_add_meta);
  m.impl("range_gram", &range_gram_meta);
}

}  // namespace lowrank
