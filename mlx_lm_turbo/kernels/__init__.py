"""Fused attention kernels over packed codes (one body for Metal and CUDA).

``decode_attention`` returns the attention output, or None where the fused path does not
apply (CPU backend, query length > 8, methods without a kernel, sinks, or a shape whose
first-use check failed); the caller then runs ``attention.reference_attention``.
``MLX_LM_TURBO_KERNELS=0`` forces the reference, ``=1`` forces the kernel (errors raise).
"""

from .decode import MAX_QUERY_LEN, backend, decode_attention

__all__ = ["decode_attention", "backend", "MAX_QUERY_LEN"]
