"""Key statistics: the per-head mean key and channel scales a cache codes keys against.

The keys of the first ``STATS_TOKENS`` tokens fix, per head, the mean key μ and each
channel's RMS about it, s (geometric mean 1). A cache then works in a scaled key space:
every key enters as k/s, is centred by μ/s and coded; attention multiplies the queries by
s (``scale_queries``), so (q·s)·(k/s) = q·k exactly, and softmax ignores the q·μ common
to a query's scores (attention with sinks adds μ/s back). Both are kept in fp16 per head.
Why: keys such as Qwen2.5's carry a large shared offset (the k bias) and a few outlier
channels; the codec's error is proportional to the norm of what it codes, so without
them the offset and outliers set every key's error.
"""

from typing import Optional

import mlx.core as mx

STATS_TOKENS = 64   # the first tokens whose keys fix the key mean and channel scales
SCALE_POWER = 0.5   # s = RMS^p: p = 1 evens the channels out fully


def key_statistics(keys: mx.array, center: bool, scale: bool) -> tuple:
    """(s, μ/s) in fp16, shape (B, H, 1, D), from keys (B, H, T, D): s is each channel's
    RMS about the mean (1 without ``scale``), normalised to geometric mean 1; μ the mean
    key (0 without ``center``). Dividing by s evens out the channels' energy, so outlier
    channels no longer set the coding error of every key."""
    k = keys.astype(mx.float32)
    mu = k.mean(axis=2, keepdims=True) if center else mx.zeros_like(k[:, :, :1])
    if scale:
        rms = mx.sqrt(((k - mu) ** 2).mean(axis=2, keepdims=True))
        # channels that barely move are not blown up: s >= 1/64 of the largest
        rms = mx.maximum(rms, rms.max(axis=-1, keepdims=True) / 64 + 1e-6)
        s = rms ** SCALE_POWER
        s = (s / mx.exp(mx.log(s).mean(axis=-1, keepdims=True))).astype(mx.float16)
    else:
        s = mx.ones_like(mu).astype(mx.float16)
    return s, (mu / s.astype(mx.float32)).astype(mx.float16)


def scale_queries(queries: mx.array, key_scale: Optional[mx.array]) -> mx.array:
    """q·s for keys held as k/s: key_scale (B, Hkv, 1, D) serves Hq/Hkv query heads."""
    if key_scale is None:
        return queries
    B, Hq, L, D = queries.shape
    Hkv = key_scale.shape[1]
    q = queries.reshape(B, Hkv, Hq // Hkv, L, D) * key_scale[:, :, None].astype(queries.dtype)
    return q.reshape(B, Hq, L, D)
