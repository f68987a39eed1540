// Op schemas of the cbkernels library (docs/op-contract.md). Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/bindings.cpp; fake kernels and autograd live in cbkernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "common/loss_function.h"
#include "common/loss_ops.h"

extern "C" {
// `import cbkernels._C` only has to load the shared object: the ops register themselves with the
// dispatcher through the static initialisers below. An empty module keeps the Python side honest:
// everything is reached through torch.ops.cbkernels, never through hidden pybind functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Per family of common/families.h, the schemas of docs/op-contract.md (built from the family's
// hyperparameters): its two kernel ops (define_loss_ops, common/loss_ops.h) and the whole eager loss,
// `<family>_loss`, with scale_rows_unless_one_, which its backward uses (common/loss_function.h).
TORCH_LIBRARY(cbkernels, m) {
  cbkernels::define_loss_ops(m);
  cbkernels::define_loss_functions(m);
}

// `<family>_loss` is device-agnostic: it calls the device's kernel ops through the dispatcher.
TORCH_LIBRARY_IMPL(cbkernels, Autograd, m) { cbkernels::register_loss_functions(m, /*autograd=*/true); }
TORCH_LIBRARY_IMPL(cbkernels, CompositeExplicitAutograd, m) {
  cbkernels::register_loss_functions(m, /*autograd=*/false);
}
