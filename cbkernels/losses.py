"""The loss registry: every loss the library offers is named here, once.

Two levels:
- a kernel *family* is one pair of ops per kernel backend, `<family>_forward` and `<family>_backward`
  (docs/op-contract.md), with its named float hyperparameters in the ops' schema order and the
  reference function (reference.py) that specifies its per-row loss;
- a *loss* is what a user picks (the `loss_type` of ClassBalancedLoss, cb_linear_loss and the
  benchmark): a family, the hyperparameters the user may set (with defaults and checks), the ones the
  loss pins (sigmoid cross entropy is the focal family at gamma = 0), and its public function's name.

Everything that lists losses (the functional API, the modules, cb_linear_loss, the class-parallel losses,
the benchmark, the demo and the tests) iterates LOSSES or looks a name up with `loss(name)`; the layers
between the public API and the kernels carry the family's hyperparameters as a tuple in schema order
(`Loss.kernel_hyperparameters`), so a new hyperparameter changes this file, the op schema and the
kernels, not every layer. docs/contributing.md lists the files a new loss touches.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from . import _checks, _reduction, reference


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A named float hyperparameter: its default, its check (raises naming it, returns a float) and the
    values the tests and the benchmark exercise."""
    name: str
    default: float
    check: Callable[[object], float]
    test_values: tuple[float, ...]


GAMMA = Hyperparameter("gamma", 0.5, _checks.check_gamma, (0.0, 0.5, 1.0, 2.0, 3.7))
LABEL_SMOOTHING = Hyperparameter("label_smoothing", 0.0, _checks.check_label_smoothing, (0.0, 0.1))
# The softmax focal loss's gamma: the same hyperparameter (name, check) with Lin et al.'s default of 2.
SOFTMAX_FOCAL_GAMMA = dataclasses.replace(GAMMA, default=2.0, test_values=(0.0, 0.5, 1.0, 2.0, 5.0))


@dataclasses.dataclass(frozen=True)
class Family:
    """One kernel: the ops `<name>_forward` / `<name>_backward` of every kernel backend.

    hyperparameters: the ops' float arguments, in schema order (between class_weight and ignore_index).
    reference_rows(logits, target, class_weight, ignore_index, **hyperparameters, element_weight) -> per-row
      loss (N,).
    takes_target_margin: its public losses accept a target_margin (the softmax losses: LDAM). Every op
      takes one (docs/op-contract.md); the public API offers it where the literature defines it.
    """
    name: str
    hyperparameters: tuple[Hyperparameter, ...]
    reference_rows: Callable
    takes_target_margin: bool = False

    def op(self, namespace, which: str):
        """The op `<name>_<which>` (which: "forward", "backward", or "loss" for the C++ extension's
        whole-call op) of a torch.ops namespace."""
        return getattr(namespace, f"{self.name}_{which}")


SOFTMAX_CE = Family("softmax_ce", (LABEL_SMOOTHING,), reference.softmax_rows, takes_target_margin=True)
SIGMOID_FOCAL = Family("sigmoid_focal", (GAMMA,), reference.sigmoid_focal_rows)
SOFTMAX_FOCAL = Family("softmax_focal", (GAMMA, LABEL_SMOOTHING), reference.softmax_focal_rows,
                       takes_target_margin=True)
FAMILIES: tuple[Family, ...] = (SIGMOID_FOCAL, SOFTMAX_CE, SOFTMAX_FOCAL)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss as users name it.

    name: the loss_type ("softmax", ...). function: the public function's name in cbkernels.
    hyperparameters: those the user sets. fixed: family hyperparameters this loss pins to a value.
    """
    name: str
    function: str
    family: Family
    hyperparameters: tuple[Hyperparameter, ...]
    fixed: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        names = {h.name for h in self.hyperparameters} | set(self.fixed)
        family_names = {h.name for h in self.family.hyperparameters}
        if names != family_names:
            raise ValueError(f"loss {self.name!r}: hyperparameters {sorted(names)} must be exactly those of "
                             f"family {self.family.name!r}, {sorted(family_names)}")
        # Per family hyperparameter in schema order: the settable Hyperparameter, or None and the pinned value
        # (read on every call by kernel_hyperparameters, so laid out once here).
        settable = {h.name: h for h in self.hyperparameters}
        object.__setattr__(self, "_schema", tuple((settable.get(h.name), float(self.fixed.get(h.name, 0.0)))
                                                  for h in self.family.hyperparameters))

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hyperparameters)

    def defaults(self) -> dict[str, float]:
        return {h.name: h.default for h in self.hyperparameters}

    def checked(self, **values) -> dict[str, float]:
        """Each given hyperparameter checked, None meaning this loss's default (gamma: 0.5 for "focal", 2 for
        "softmax_focal"); hyperparameters this loss does not set are checked by GAMMA / LABEL_SMOOTHING's
        rules and kept, so that one module or call can hold them for any loss_type."""
        own = {h.name: h for h in self.hyperparameters}
        shared = {h.name: h for h in (GAMMA, LABEL_SMOOTHING)}
        out = {}
        for name, value in values.items():
            h = own.get(name) or shared[name]
            out[name] = h.check(h.default if value is None else value)
        return out

    def kernel_hyperparameters(self, values: Mapping[str, object]) -> tuple[float, ...]:
        """The family's hyperparameters in schema order: `values` (user-settable ones, checked; missing
        ones take their defaults; others are ignored) with this loss's fixed ones."""
        return tuple([fixed if h is None else h.check(values.get(h.name, h.default)) for h, fixed in self._schema])

    def plain_kernel_hyperparameters(self, values: Mapping[str, object]) -> tuple[float, ...] | None:
        """kernel_hyperparameters without the Python checks, for a callee that checks the same domains itself
        (the C++ whole-call op, csrc/common/families.h): None unless every value is a plain int or float,
        so that no bool, tensor or other type reaches it unconverted."""
        out = [fixed if h is None else values.get(h.name, h.default) for h, fixed in self._schema]
        return tuple(out) if all(type(v) is float or type(v) is int for v in out) else None

    def reference(self, logits, target, class_weight=None, reduction="mean", ignore_index=-100, logit_offset=None,
                  target_margin=None, sample_weight=None, normalizer=None, weighting="row", **hyper):
        """The spec of the public function: reference.py's rows, reduced (any dtype, plain autograd).
        weighting "row": class_weight weighs rows; "element": it weighs each class's term (docs/math.md, 14)."""
        class_weight, element_weight = _reduction.split_weighting(class_weight, weighting)
        rows = self.reference_rows(logits, target, class_weight, ignore_index, self.kernel_hyperparameters(hyper),
                                   logit_offset, target_margin, sample_weight, element_weight)
        return _reduction.reduce_rows(rows, target, ignore_index, reduction, normalizer)

    def reference_rows(self, logits, target, class_weight, ignore_index, kernel_hyperparameters, logit_offset=None,
                       target_margin=None, sample_weight=None, element_weight=None):
        named = {h.name: v for h, v in zip(self.family.hyperparameters, kernel_hyperparameters)}
        logits = reference.adjusted_logits(logits, target, ignore_index, logit_offset, target_margin)
        rows = self.family.reference_rows(logits, target, class_weight, ignore_index, **named,
                                          element_weight=element_weight)
        return reference.weighted_rows(rows, target, ignore_index, sample_weight)

    def test_cases(self) -> list[dict[str, float]]:
        """Hyperparameter settings the tests and sweeps exercise: the defaults, then each test value of
        each hyperparameter with the others at their defaults."""
        cases = [self.defaults()]
        for h in self.hyperparameters:
            cases += [{**self.defaults(), h.name: v} for v in h.test_values if v != h.default]
        return cases


LOSSES: tuple[Loss, ...] = (
    Loss("softmax", "cb_softmax_cross_entropy", SOFTMAX_CE, (LABEL_SMOOTHING,)),
    Loss("sigmoid", "cb_sigmoid_cross_entropy", SIGMOID_FOCAL, (), fixed={"gamma": 0.0}),
    Loss("focal", "cb_focal_loss", SIGMOID_FOCAL, (GAMMA,)),
    Loss("softmax_focal", "cb_softmax_focal_loss", SOFTMAX_FOCAL, (SOFTMAX_FOCAL_GAMMA, LABEL_SMOOTHING)),
)
LOSS_TYPES: tuple[str, ...] = tuple(spec.name for spec in LOSSES)
_BY_NAME = {spec.name: spec for spec in LOSSES}


def loss(name) -> Loss:
    """The registered loss called `name`; a clear error naming the choices otherwise."""
    spec = _BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {name!r}")
    return spec


def family(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"family must be one of {tuple(f.name for f in FAMILIES)}, got {name!r}")
