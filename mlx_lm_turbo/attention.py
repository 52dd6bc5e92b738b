"""Attention over a TurboKVCache.

The reference path works in the rotated domain: ⟨q, x̂⟩ = ⟨Π_K q, decode_rotated(k)⟩,
so keys are never inverse-rotated; the value sum is accumulated in the value rotation's
domain and rotated back once. Keys are stored centred (k - μ, see cache.py): scores
differ from ⟨q, k⟩ by q·μ, the same for every key of a query, which softmax ignores.
The fused kernels (``kernels``) take over where they run.

With an fp16 window (cache.py) the returned dicts carry the uncompressed span of the
newest tokens under "recent": those keys/values join the coded ones as extra columns of
one SDPA, and the mask picks, per query i, the copy for keys i-W < j ≤ i and the code
for the others.
"""

from typing import Optional

import mlx.core as mx

from . import kernels
from .cache import scale_queries


def reference_attention(queries: mx.array, keys: dict, values: dict, cache,
                        scale: float, mask=None, sinks: Optional[mx.array] = None) -> mx.array:
    """Pure-MLX attention over packed codes (dequantize in the rotated domain + SDPA)."""
    kc, vc = cache.key_codec, cache.value_codec
    keys, values = kernels.settle(keys), kernels.settle(values)
    q = kc.rotate(queries)
    k = kc.decode_rotated(keys)
    v = vc.decode_rotated(values)
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(mx.float32)
    if "recent" in keys:
        k, v, mask = _with_window(q, k, v, keys["recent"], values["recent"], cache, mask)
    if sinks is not None:
        # The sink logit does not move with q·μ: put the key mean back (μ/s: the queries
        # were scaled by s).
        k = k + kc.rotate(cache.key_mean.astype(mx.float32))
        sinks = sinks.astype(mx.float32)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    return vc.unrotate(out).astype(queries.dtype)


def turbo_attention(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                    mask=None, sinks: Optional[mx.array] = None) -> mx.array:
    # Keys are held as k/s (cache.py, key statistics): (q·s)·(k/s) = q·k.
    if getattr(cache, "scale_keys", False):
        queries = scale_queries(queries, cache.key_scale).astype(queries.dtype)
    if "first" in keys:   # (only blocks with positions below STATS_TOKENS)
        return _with_first_keys(queries, keys, values, cache, scale, mask, sinks)
    out = kernels.decode_attention(queries, keys, values, cache, scale, mask, sinks)
    if out is not None:
        return out
    return reference_attention(queries, keys, values, cache, scale, mask, sinks)


def _with_first_keys(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                     mask, sinks) -> mx.array:
    """Queries at positions below STATS_TOKENS read the exact keys there (cache.py:
    "first"; values from the codes), later ones the codes."""
    first = keys.pop("first")
    L, n = queries.shape[2], first.shape[2]
    S = next(iter(values.values())).shape[2] if "live" not in values else values["live"][0]
    start = S - L                          # position of the block's first query
    m = max(0, min(L, n - start))          # queries of this block below n
    if m == 0:
        return reference_attention(queries, keys, values, cache, scale, mask, sinks)
    kc, vc = cache.key_codec, cache.value_codec
    q = kc.rotate(queries[:, :, :m])
    k = kc.rotate(first[:, :, :start + m].astype(mx.float32)
                  - cache.key_mean.astype(mx.float32))
    vals = kernels.settle(values)
    v = vc.decode_rotated({name: a[:, :, :start + m] for name, a in vals.items()
                           if name != "recent"})
    fmask = mask[..., :m, :start + m] if isinstance(mask, mx.array) else (
        "causal" if m > 1 else None)
    if isinstance(fmask, mx.array) and fmask.dtype != mx.bool_:
        fmask = fmask.astype(mx.float32)
    if sinks is not None:
        k = k + kc.rotate(cache.key_mean.astype(mx.float32))
        sinks = sinks.astype(mx.float32)
    head = vc.unrotate(mx.fast.scaled_dot_product_attention(
        q, k, v, scale=scale, mask=fmask, sinks=sinks)).astype(queries.dtype)
    if m == L:
        return head
    rest_mask = mask[..., m:, :] if isinstance(mask, mx.array) else mask
    rest = reference_attention(queries[:, :, m:], keys, values, cache, scale, rest_mask, sinks)
    return mx.concatenate([head, rest], axis=2)


def _with_window(q: mx.array, k: mx.array, v: mx.array, recent_k: mx.array,
                 recent_v: mx.array, cache, mask):
    """Coded keys/values plus the uncompressed span as extra columns, and the mask that
    picks one copy of each key per query (see the module docstring)."""
    kc, vc = cache.key_codec, cache.value_codec
    L, S, n, W = q.shape[2], k.shape[2], recent_k.shape[2], cache.fp16_window
    rk = kc.rotate(recent_k.astype(mx.float32) - cache.key_mean.astype(mx.float32))
    rv = vc.rotate(recent_v.astype(mx.float32))
    if L == 1 and mask is None and n <= W:
        # Decode: the span is exactly the keys the query reads uncompressed.
        return (mx.concatenate([k[:, :, :S - n], rk], axis=2),
                mx.concatenate([v[:, :, :S - n], rv], axis=2), None)
    qpos = mx.arange(S - L, S)[:, None]
    kpos = mx.arange(S)[None]
    near = (qpos - kpos < W) & (kpos >= S - n)    # the query reads this key's copy
    if mask is None:
        allowed = mx.ones((L, S), dtype=mx.bool_)
    elif isinstance(mask, str):                   # "causal"
        allowed = kpos <= qpos
    else:
        allowed = mask
    span = slice(S - n, S)
    if allowed.dtype == mx.bool_:
        coded, copies = allowed & ~near, (allowed & near)[..., span]
    else:                                         # additive float mask
        coded = mx.where(near, -mx.inf, allowed)
        copies = mx.where(near, allowed, -mx.inf)[..., span]
    coded = mx.broadcast_to(coded, (*copies.shape[:-1], S))
    return (mx.concatenate([k, rk], axis=2), mx.concatenate([v, rv], axis=2),
            mx.concatenate([coded, copies], axis=-1))
