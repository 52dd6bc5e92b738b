"""Attention over a TurboKVCache.

Attention works in the rotated domain: ⟨q, x̂⟩ = ⟨Π_K q, decode_rotated(k)⟩, so keys are
never inverse-rotated; the value sum is accumulated in the value rotation's domain and
rotated back once. Keys are stored centred (k - μ, see cache.py): scores differ from
⟨q, k⟩ by q·μ, the same for every key of a query, which softmax ignores.

Three paths, chosen per call (``turbo_attention``):
- the fused kernels (``kernels``) where they run (GPU, query length ≤ 8);
- ``reference_attention``: the past decoded to float32 and one SDPA, for calls whose
  float32 scores stay small (decode steps, short prompts; also the kernels' first-use
  ground truth);
- ``prefill_attention`` for long query blocks over a long past, with memory bounded by a
  block of keys, never by the context: on a GPU without a window, mask array or sinks,
  the past decoded in the model's dtype and MLX's fused SDPA (one layer's keys and values
  at model precision, what a plain cache holds for that layer); otherwise an online
  softmax over key blocks decoded one at a time (MLX's own SDPA materialises every
  query's float32 scores over the whole context where it has no fused kernel).

With an fp16 window (cache.py) the returned dicts carry the uncompressed span of the
newest tokens under "recent": those keys/values join the coded ones as extra columns,
and the mask picks, per query i, the copy for keys i-W < j ≤ i and the code for the
others.
"""

from typing import Optional

import mlx.core as mx

from . import kernels
from .kernels.dequant import dequantize

# float32 scores (batch × query heads × queries × keys) above this go to prefill_attention.
SCORE_BYTES = 1 << 26
# prefill_attention's key block, as float32 scores: larger on a GPU, where each block costs
# a dozen launches of host time and memory is not the CPU's.
BLOCK_BYTES = {"cpu": 1 << 24, "gpu": 1 << 30}


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
    if getattr(cache, "scale_keys", False) and cache.key_scale is not None:
        queries = queries * cache.stats_in(queries.dtype, queries.shape[1]).query_scale
    if "first" in keys:   # (only blocks with positions below STATS_TOKENS)
        return _with_first_keys(queries, keys, values, cache, scale, mask, sinks)
    out = kernels.decode_attention(queries, keys, values, cache, scale, mask, sinks,
                                   reference=reference_attention)
    if out is not None:
        return out
    return _coded_attention(queries, keys, values, cache, scale, mask, sinks)


def _coded_attention(queries, keys, values, cache, scale, mask, sinks) -> mx.array:
    """The reference where its float32 scores stay small, else the prefill path."""
    B, H, L, _ = queries.shape
    S = next(iter(keys.values())).shape[2]
    if 4 * B * H * L * S <= SCORE_BYTES:
        return reference_attention(queries, keys, values, cache, scale, mask, sinks)
    return prefill_attention(queries, keys, values, cache, scale, mask, sinks)


def prefill_attention(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                      mask=None, sinks: Optional[mx.array] = None,
                      block: Optional[int] = None) -> mx.array:
    """Attention whose memory is bounded by a block of keys (see the module docstring).
    ``block``: keys decoded at a time (default: float32 scores of ~BLOCK_BYTES)."""
    keys, values = kernels.settle(keys), kernels.settle(values)
    fused = (mx.default_device() == mx.gpu and sinks is None and "recent" not in keys
             and (mask is None or isinstance(mask, str))
             and queries.dtype in (mx.float16, mx.bfloat16))
    if fused:
        return _fused_in_model_dtype(queries, keys, values, cache, scale, mask)
    return _blocked(queries, keys, values, cache, scale, mask, sinks, block)


def _decode_blocks(codec, packed: dict, dtype, block: int) -> mx.array:
    """All tokens of ``packed`` decoded (rotated domain) to ``dtype``: one fused launch
    where it applies, else a block of tokens at a time so that the float32 intermediates
    stay one block long."""
    out = dequantize(codec, packed, dtype)
    if out is not None:
        return out
    S = next(iter(packed.values())).shape[2]
    parts = [codec.decode_rotated({n: a[:, :, s:s + block] for n, a in packed.items()})
             .astype(dtype) for s in range(0, S, block)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


# Outputs of the last fused prefill calls, oldest first (see _fused_in_model_dtype).
_in_flight: list = []
IN_FLIGHT = 2


def _fused_in_model_dtype(queries, keys, values, cache, scale, mask) -> mx.array:
    kc, vc = cache.key_codec, cache.value_codec
    dtype = queries.dtype
    k = _decode_blocks(kc, keys, dtype, 4096)
    v = _decode_blocks(vc, values, dtype, 4096)
    q = kc.rotate(queries).astype(dtype)
    out = vc.unrotate(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))
    out = out.astype(dtype)
    # Each call decodes a layer's whole past, and MLX allocates every output when the host
    # queues it: a prefill step's graph would hold all layers' decoded keys and values
    # at once. Start each call's work now and wait for the one IN_FLIGHT calls back, so
    # that at most IN_FLIGHT layers' decoded past are alive while the GPU stays busy.
    mx.async_eval(out)
    _in_flight.append(out)
    if len(_in_flight) > IN_FLIGHT:
        mx.eval(_in_flight.pop(0))
    return out


def _heads_view(mask: mx.array, n_heads: int, n_kv: int) -> mx.array:
    """An SDPA mask (≤ 4 dims, broadcasting to B × H × L × S) in the grouped layout
    B × H_kv × G × L × S of ``_blocked``."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == n_heads and n_heads > 1:
        return mask.reshape(mask.shape[0], n_kv, n_heads // n_kv, *mask.shape[2:])
    return mask[:, :, None]


def _blocked(queries, keys, values, cache, scale, mask, sinks, block) -> mx.array:
    """Online softmax over key blocks decoded to float32 one at a time."""
    kc, vc = cache.key_codec, cache.value_codec
    B, H, L, _ = queries.shape
    S = next(iter(keys.values())).shape[2]
    Hk = next(iter(keys.values())).shape[1]
    if block is None:
        budget = BLOCK_BYTES["gpu" if mx.default_device() == mx.gpu else "cpu"]
        block = max(256, budget // (4 * B * H * L) // 256 * 256)
    q = (kc.rotate(queries) * scale).reshape(B, Hk, H // Hk, L, -1)
    if isinstance(mask, mx.array):
        mask = _heads_view(mask, H, Hk)
        if mask.dtype != mx.bool_:
            mask = mask.astype(mx.float32)
    qpos = mx.arange(S - L, S)[:, None]
    mean = None
    if sinks is not None:
        # The sink logit does not move with q·μ: put the key mean back.
        mean = kc.rotate(cache.key_mean.astype(mx.float32))[:, :, None]
    recent = "recent" in keys
    n = keys["recent"].shape[2] if recent else 0
    W = cache.fp16_window

    def scores(k, kpos, cols, copies):
        """Masked float32 scores of one block of keys (positions ``kpos``, columns
        ``cols`` of a mask array)."""
        s = q @ k.swapaxes(-1, -2)
        keep = None
        if isinstance(mask, mx.array):
            m = mask[..., cols]
            if m.dtype == mx.bool_:
                keep = m
            else:
                s = s + m
        elif mask == "causal":
            keep = kpos <= qpos
        if recent:
            # The window rule: a query reads its W nearest keys from the copies.
            near = (qpos - kpos < W) & (kpos >= S - n)
            near = near if copies else ~near
            keep = near if keep is None else keep & near
        return s if keep is None else mx.where(keep, s, -mx.inf)

    m_run = mx.full((B, Hk, H // Hk, L, 1), -mx.inf)
    l_run = mx.zeros((B, Hk, H // Hk, L, 1))
    acc = None
    if sinks is not None:
        m_run = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, Hk, H // Hk, 1, 1),
                                m_run.shape)
        l_run = mx.ones_like(l_run)

    def merge(s, v):
        nonlocal m_run, l_run, acc
        m_new = mx.maximum(m_run, s.max(axis=-1, keepdims=True))
        # Rows with every key masked so far keep m = -inf: subtract 0 there, not -inf.
        m_safe = mx.where(m_new == -mx.inf, 0.0, m_new)
        p = mx.exp(s - m_safe)
        correction = mx.exp(m_run - m_safe)
        l_run = l_run * correction + p.sum(axis=-1, keepdims=True)
        pv = p @ v[:, :, None]
        acc = pv if acc is None else acc * correction + pv
        m_run = m_new

    for s0 in range(0, S, block):
        s1 = min(s0 + block, S)
        part = {name: a[:, :, s0:s1] for name, a in keys.items() if name != "recent"}
        k = kc.decode_rotated(part)[:, :, None]
        if mean is not None:
            k = k + mean
        v = vc.decode_rotated({name: a[:, :, s0:s1] for name, a in values.items()
                               if name != "recent"})
        merge(scores(k, mx.arange(s0, s1)[None], slice(s0, s1), False), v)
    if recent and n:
        rk = keys["recent"].astype(mx.float32)
        if sinks is None:
            rk = rk - cache.key_mean.astype(mx.float32)
        rk = kc.rotate(rk)[:, :, None]
        rv = vc.rotate(values["recent"].astype(mx.float32))
        # A copy is masked like its own position's code.
        merge(scores(rk, mx.arange(S - n, S)[None], slice(S - n, S), True), rv)
    out = (acc / mx.maximum(l_run, 1e-30)).reshape(B, H, L, -1)
    return vc.unrotate(out).astype(queries.dtype)


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
        return _coded_attention(queries, keys, values, cache, scale, mask, sinks)
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
    rest = _coded_attention(queries[:, :, m:], keys, values, cache, scale, rest_mask, sinks)
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
