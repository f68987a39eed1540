// Op schemas of the cbkernels library (docs/op-contract.md). Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/bindings.cpp; fake kernels and autograd live in cbkernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import cbkernels._C` only has to load the shared object: the ops register themselves with the
// dispatcher through the static initialisers below. An empty module keeps the Python side honest:
// everything is reached through torch.ops.cbkernels, never through hidden pybind functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cbkernels, m) {
  m.def(
      "sigmoid_focal_forward(Tensor logits, Tensor target, Tensor? class_weight, float gamma, "
      "int ignore_index, bool with_grad) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_focal_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, "
      "float gamma, int ignore_index) -> Tensor");
  m.def(
      "softmax_ce_forward(Tensor logits, Tensor target, Tensor? class_weight, float label_smoothing, "
      "int ignore_index, bool with_grad) -> (Tensor, Tensor)");
  m.def(
      "softmax_ce_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, "
      "float label_smoothing, int ignore_index) -> Tensor");
}
