"""Attention over a TurboKVCache.

The reference path works in the rotated domain: ⟨q, x̂⟩ = ⟨Π_K q, decode_rotated(k)⟩,
so keys are never inverse-rotated; the value sum is accumulated in the value rotation's
domain and rotated back once. Keys are stored centred (k - μ, see cache.py): scores
differ from ⟨q, k⟩ by q·μ, the same for every key of a query, which softmax ignores.
The fused kernels (``kernels``) take over where they run.
"""

from typing import Optional

import mlx.core as mx

from . import kernels


def reference_attention(queries: mx.array, keys: dict, values: dict, cache,
                        scale: float, mask=None, sinks: Optional[mx.array] = None) -> mx.array:
    """Pure-MLX attention over packed codes (dequantize in the rotated domain + SDPA)."""
    kc, vc = cache.key_codec, cache.value_codec
    q = kc.rotate(queries)
    k = kc.decode_rotated(keys)
    v = vc.decode_rotated(values)
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(mx.float32)
    if sinks is not None:
        # The sink logit does not move with q·μ: put the key mean back.
        k = k + kc.rotate(cache.key_mean.astype(mx.float32))
        sinks = sinks.astype(mx.float32)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    return vc.unrotate(out).astype(queries.dtype)


def turbo_attention(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                    mask=None, sinks: Optional[mx.array] = None) -> mx.array:
    out = kernels.decode_attention(queries, keys, values, cache, scale, mask, sinks)
    if out is not None:
        return out
    return reference_attention(queries, keys, values, cache, scale, mask, sinks)
