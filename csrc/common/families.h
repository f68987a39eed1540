// The kernel families of the C++ extension and their hyperparameters, each named once (docs/contributing.md).
// Everything the C++ side lists per family is derived from these two lists: the Family enum and the
// LossArgs fields (loss_args.h), the op schemas (csrc/cbkernels.cpp), the hyperparameter checks and the op
// registration (loss_ops.h), the per-ISA CPU entry points (cpu/rows.h, cpu/ops.cpp) and the CUDA dispatch
// (cuda/launch.cu). They mirror losses.FAMILIES of cbkernels/losses.py: same names, same hyperparameters in
// the same (schema) order.
//
// Only macros and no include: nvcc compiles it (through loss_args.h) with a CPU-only torch, and the per-ISA
// CPU code shares nothing with the generic code through it.
#pragma once

// Every hyperparameter of some family: H(name, in_domain, domain).
//   name       its schema name, and the name of its float field in LossArgs (a family reads its own fields);
//   in_domain  an expression of `value`, the op's double argument, true when the op accepts it;
//   domain     the refusal's wording: "<op>: <name> must be <domain>, got <value>".
// A hyperparameter shared by several families is listed once.
#define CBKERNELS_HYPERPARAMETERS(H)                                                  \
  /* the focal exponent of the sigmoid and softmax focal families (0: sigmoid cross entropy); the kernels take it as a */ \
  /* float, so above float32's largest value it would become inf; NaN and inf fail the comparisons */ \
  H(gamma, value >= 0.0 && value <= 3.4028234663852886e38, "a finite number >= 0 that fits float32") \
  /* eps of the softmax families; written so that NaN fails too */                      \
  H(label_smoothing, value >= 0.0 && value <= 1.0, "in [0, 1]")

// Every kernel family: X(Enumerator, name, (hyperparameters)).
//   Enumerator       its Family enumerator;
//   name             its ops are <name>_forward and <name>_backward; its kernels' entry points are
//                    cpu::<ISA>::<name>_rows (cpu/loss_kernels.h) and cuda::launch_<name> (cuda/launch.cu);
//   (hyperparameters) a parenthesised list of names from CBKERNELS_HYPERPARAMETERS, in schema order:
//                    (gamma), (gamma, label_smoothing), or () for none.
// The order here is the Family enum's, which indexes the tables derived from this list.
#define CBKERNELS_FAMILIES(X)                    \
  X(kSigmoidFocal, sigmoid_focal, (gamma))       \
  X(kSoftmaxCe, softmax_ce, (label_smoothing))   \
  X(kSoftmaxFocal, softmax_focal, (gamma, label_smoothing))
