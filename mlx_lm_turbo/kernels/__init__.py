"""Fused attention kernels over packed codes (one body for Metal and CUDA).

``decode_attention`` returns the attention output, or None where the fused path does not
apply (CPU backend, query length > 8, methods without a kernel, sinks, an fp16 window with
an array mask, or a shape whose first-use check failed); the caller then runs
``attention.reference_attention``. fp16 windows (cache.py) run fused: one extra block per
KV head reads the uncompressed copies.
``encode.encode(codec, x)`` is the fused cache append (normalise, rotate, quantise, pack
in one launch) for mse/rvq with power-of-two head dims, or None (the codec's MLX encode).
``MLX_LM_TURBO_KERNELS=0`` forces the reference, ``=1`` forces the kernels (errors raise;
the encode kernel still steps aside for codecs it does not cover).
``encode.write_pair_in_place`` codes a decode step's key and value straight into the
cache's buffers; the cache then hands attention its *live* dicts (``settle`` turns them
into plain packed views for any other reader).
``dequant.dequantize(codec, packed, dtype)`` decodes ``turboquant_mse`` codes to the
rotated domain in the model's dtype in one launch: the GPU prefill path
(``attention.prefill_attention``) re-reads a layer's past with it at every prefill step.
"""

from .decode import MAX_QUERY_LEN, backend, decode_attention, settle

__all__ = ["decode_attention", "backend", "settle", "MAX_QUERY_LEN"]
