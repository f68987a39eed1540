"""Triton backend: kernels.py (the @triton.jit kernels), configs.py (launch table), ops.py (the
torch.library ops in the "cbkernels_triton" namespace).

Deliberately empty of imports: `import cbkernels.triton` must not import triton (it may be missing,
and TRITON_INTERPRET must be set before it is imported). cbkernels._backends imports .ops lazily.
"""
