// lowrank._C.lora_linear_inference: the inference entry of lowrank::lora_linear for LoRALinear's cached fast path
// (lowrank/lora/layers.py). It calls the SAME op (one schema, the registered CPU/CUDA/Meta kernels) through the
// dispatcher's unboxed path below autograd, instead of torch.ops' boxed Python path: that path builds an IValue
// stack from the Python arguments, runs the op's Python autograd layer unless excluded, and converts back, which
// measured ~4 us per call on a 384 x 384 layer at 16 rows (one Zen 3 core; the layer's F.linear is ~50-90 us).
//
// It serves only the plain inference case and answers None otherwise (the caller then takes the general path):
// x exactly a torch.Tensor and the others Tensors or Parameters (no subclass, whose __torch_function__ or
// __torch_dispatch__ must see the op), one dtype and one device for all, autograd not needed (grad mode off, or no
// input requiring grad), autocast off for that device, no torch-function mode active (it must see the op). A
// TorchDispatchMode still sees it: the dispatcher routes to the Python key as for any op.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

namespace lowrank {
namespace {

using LoraLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                const std::optional<at::Tensor>&);

PyObject* lora_linear_inference(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError,
                 "lora_linear_inference: expected 6 arguments (x, weight, lora_A, lora_B, scale, "
                 "bias), got %zd",
                 nargs);
    return nullptr;
  }
  // x must be exactly a Tensor (a Parameter as input is unusual: let the general path see it)
  if (Py_TYPE(args[0]) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) Py_RETURN_NONE;
  for (int i = 1; i < 4; ++i) {
    if (!THPVariable_CheckExact(args[i])) Py_RETURN_NONE;
  }
  const bool has_bias = args[5] != Py_None;
  if (has_bias && !THPVariable_CheckExact(args[5])) Py_RETURN_NONE;
  if (!PyFloat_CheckExact(args[4])) Py_RETURN_NONE;
  const double scale = PyFloat_AS_DOUBLE(args[4]);
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  const at::Tensor& lora_A = THPVariable_Unpack(args[2]);
  const at::Tensor& lora_B = THPVariable_Unpack(args[3]);
  std::optional<at::Tensor> bias;
  if (has_bias) bias = THPVariable_Unpack(args[5]);

  const auto dtype = x.scalar_type();
  const auto device = x.device();
  const auto same = [&](const at::Tensor& t) { return t.scalar_type() == dtype && t.device() == device; };
  if (!same(weight) || !same(lora_A) || !same(lora_B) || (has_bias && !same(*bias))) Py_RETURN_NONE;
  if (device.type() != at::kCPU && device.type() != at::kCUDA) Py_RETURN_NONE;
  if (at::autocast::is_autocast_enabled(device.type())) Py_RETURN_NONE;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;
  if (c10::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || lora_A.requires_grad() ||
                                      lora_B.requires_grad() || (has_bias && bias->requires_grad()))) {
    Py_RETURN_NONE;
  }

  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::lora_linear", "").typed<LoraLinearFn>();
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does around the kernel
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    y = op.call(x, weight, lora_A, lora_B, scale, bias);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"lora_linear_inference", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&lora_linear_inference)),
     METH_FASTCALL,
     "lora_linear_inference(x, weight, lora_A, lora_B, scale, bias) -> Tensor | None: lowrank::lora_linear without "
     "autograd through the unboxed dispatcher; None where the call needs the general path."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

}  // namespace lowrank
