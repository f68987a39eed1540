"""The op contract's ops called directly (docs/op-contract.md), on every kernel backend: what holds for
the ops themselves, below the public functions. Each check runs under the pair's launch-configuration
overrides (Triton's small tiles, CUDA's streaming softmax), where the contract must hold too.
"""
import pytest
import torch

from cases import DTYPES, FAMILY_PARAMS, family_hyperparameters, make_inputs


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(family, dtype, kernel_backend):
    ops, device = kernel_backend.record.ops, kernel_backend.device
    logits, target = torch.empty(0, 5, dtype=dtype, device=device), torch.empty(0, dtype=torch.long, device=device)
    params = family_hyperparameters(family)
    for config in kernel_backend.configs():
        with config:
            loss, grad = family.op(ops, "forward")(logits, target, None, *params, -100, True)
            assert loss.shape == (0,) and loss.dtype == torch.float32
            assert grad.shape == (0, 5) and grad.dtype == dtype
            loss, grad = family.op(ops, "forward")(logits, target, None, *params, -100, False)
            assert loss.shape == (0,) and grad.shape == (0,) and grad.dtype == dtype
            back = family.op(ops, "backward")(logits, target, None, torch.empty(0, device=device), *params, -100)
            assert back.shape == (0, 5) and back.dtype == dtype


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_without_grad_and_backward_agree(family, dtype, kernel_backend):
    """with_grad=False gives the same loss and an empty (0,) gradient of the logits' dtype; backward equals
    grad_loss[:, None] times the forward's gradient, both formed in fp32 and rounded once."""
    ops, device = kernel_backend.record.ops, kernel_backend.device
    n, c = kernel_backend.pick((37, 1000), (5, 33))
    logits, target, weight = make_inputs(n, c, dtype, device)
    params = family_hyperparameters(family)
    grad_loss = torch.randn(n, device=device)
    for config in kernel_backend.configs():
        with config:
            loss_a, grad = family.op(ops, "forward")(logits, target, weight, *params, -100, True)
            loss_b, empty = family.op(ops, "forward")(logits, target, weight, *params, -100, False)
            scaled = family.op(ops, "backward")(logits, target, weight, grad_loss, *params, -100)
        # One pass or two (the CUDA streaming softmax) may sum a row in another order.
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
        assert empty.shape == (0,) and empty.dtype == dtype
        # grad was rounded to dtype before this product, scaled only once: at most one more rounding.
        unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
        expected = grad.float() * grad_loss[:, None]
        torch.testing.assert_close(scaled.float(), expected, rtol=4 * unit, atol=1e-7)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_schemas_carry_the_registry_hyperparameters_in_order(family, kernel_backend):
    """Each backend's ops take the family's hyperparameters (losses.FAMILIES) by name, in the registry's
    order, as floats between class_weight / grad_loss and ignore_index: the layers between the public
    functions and the ops pass them positionally in that order."""
    names = [h.name for h in family.hyperparameters]
    for which, leading in (("forward", ["logits", "target", "class_weight"]),
                           ("backward", ["logits", "target", "class_weight", "grad_loss"])):
        schema = family.op(kernel_backend.record.ops, which).default._schema
        arguments = [a.name for a in schema.arguments]
        assert arguments[:len(leading)] == leading, schema
        assert arguments[len(leading):len(leading) + len(names)] == names, schema
        assert arguments[len(leading) + len(names)] == "ignore_index", schema
        assert all(str(a.type) == "float" for a in schema.arguments[len(leading):len(leading) + len(names)])
