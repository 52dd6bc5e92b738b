"""Fused dequantize for the prefill path: packed ``turboquant_mse`` codes to rotated-domain
vectors in the model's dtype, one launch per tensor (``src/dequant.inc``), where the
codec's MLX decode takes a dozen ops and float32 intermediates of the whole context.

First use per (backend, bits, dim, dtype): compared with the codec's ``decode_rotated``
(the same float32 product, rounded once to the dtype, so it must agree to that rounding);
a compile error or disagreement gives one warning and the MLX decode from then on.
"""

from typing import Optional

import mlx.core as mx

from . import check, source
from .build import build_kernel
from .check import active_backend, checked_launch

INPUTS, OUTPUTS = ["codes", "norm", "cb"], ["out"]
NTG = 256                     # threads a block
_kernels: dict = {}           # (backend, bits, dim, dtype) -> compiled kernel
_checked: dict = {}           # same key -> agreed at first use


def dequantize(codec, packed: dict, dtype: mx.Dtype) -> Optional[mx.array]:
    """``codec.decode_rotated(packed).astype(dtype)`` in one launch, or None where the
    kernel does not apply (no GPU backend, another method, kernels off, failed check)."""
    mode = check.MODE
    be = active_backend(mode)
    if be is None or getattr(codec, "METHOD", None) != "turboquant_mse" \
            or dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return None
    codes, norm = packed["codes"], packed["norm"]
    B, H, T, _ = codes.shape
    key = (be, codec.bits, codec.dim, str(dtype))
    if key not in _kernels:
        template = (("BITS", codec.bits), ("D", codec.dim), ("NTG", NTG), ("OutT", dtype))
        _kernels[key] = build_kernel(source.body("dequant"), be, "dequant", INPUTS, OUTPUTS,
                                     template)
    n = B * H * T * codec.dim

    def run():
        return _kernels[key](inputs=[codes, norm, codec.centroids],
                             grid=(-(-n // NTG) * NTG, 1, 1), threadgroup=(NTG, 1, 1),
                             output_shapes=[(B, H, T, codec.dim)], output_dtypes=[dtype])[0]

    def agree(out):
        ref = codec.decode_rotated(packed).astype(dtype).astype(mx.float32)
        err = mx.max(mx.abs(out.astype(mx.float32) - ref)).item()
        tol = 1e-6 * max(mx.max(mx.abs(ref)).item(), 1.0)
        return err <= tol, f"max abs error {err:.3g} vs the MLX decode"
    return checked_launch(_checked, key, mode, "fused dequantize kernel", "the MLX decode",
                          run, agree)
