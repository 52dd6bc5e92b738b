"""Key statistics: the per-head mean key and channel scales a cache codes keys against.

The keys of the first ``STATS_TOKENS`` tokens fix, per head, the mean key μ and, for a
*loud* head (a channel's RMS about the mean over ``LOUD_RATIO`` times the median
channel's), channel scales s = RMS^½ (geometric mean 1); other heads keep s = 1. A cache
then works in a scaled key space: every key enters as k/s, is centred by μ/s and coded;
attention multiplies the queries by s (``StatsCast.query_scale``), so (q·s)·(k/s) = q·k exactly,
and softmax ignores the q·μ common to a query's scores (attention with sinks adds μ/s
back). Both are kept in fp16 per head.
Why: keys such as Qwen2.5's carry a large shared offset (the k bias) and a few outlier
channels; the codec's error is proportional to the norm of what it codes, so without
them the offset and outliers set every key's error.
"""

from typing import NamedTuple, Optional

import mlx.core as mx

STATS_TOKENS = 64   # the first tokens whose keys fix the key mean and channel scales
SCALE_POWER = 0.5   # s = RMS^p: p = 1 evens the channels out fully
# Heads whose loudest channel's RMS is at most this many times the median channel's keep
# s = 1: there, scaling moves more coding error into the quiet channels than it takes
# from the loud ones (the results page compares the rules on two models).
LOUD_RATIO = 16.0


def key_statistics(keys: mx.array, center: bool, scale: bool) -> tuple:
    """(s, μ/s) in fp16, shape (B, H, 1, D), from keys (B, H, T, D): for loud heads s is
    each channel's RMS^½ about the mean, normalised to geometric mean 1 (1 without
    ``scale`` and for other heads); μ the mean key (0 without ``center``). Dividing by s
    evens out the channels' energy, so outlier channels no longer set the coding error
    of every key."""
    k = keys.astype(mx.float32)
    mu = k.mean(axis=2, keepdims=True) if center else mx.zeros_like(k[:, :, :1])
    if scale:
        rms = mx.sqrt(((k - mu) ** 2).mean(axis=2, keepdims=True))
        # channels that barely move are not blown up: s >= 1/64 of the largest
        rms = mx.maximum(rms, rms.max(axis=-1, keepdims=True) / 64 + 1e-6)
        s = rms ** SCALE_POWER
        s = s / mx.exp(mx.log(s).mean(axis=-1, keepdims=True))
        median = mx.sort(rms, axis=-1)[..., rms.shape[-1] // 2:][..., :1]
        loud = rms.max(axis=-1, keepdims=True) > LOUD_RATIO * median
        s = _representable(mx.where(loud, s, 1.0), keys.dtype)
    else:
        s = mx.ones_like(mu).astype(mx.float16)
    return s, _representable(mu / s.astype(mx.float32), keys.dtype)


def _representable(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """x in fp16, rounded through bf16 first for bf16 keys: the statistics then cast to
    the keys' dtype exactly (``cast_statistics``), so every path applies the same ones."""
    if dtype == mx.bfloat16:
        x = x.astype(mx.bfloat16)
    return x.astype(mx.float16)


class StatsCast(NamedTuple):
    """A cache's key statistics in one dtype: s, μ/s, s per query head (None unless asked
    for), and the fp16 arrays they were cast from."""
    scale: Optional[mx.array]
    mean: Optional[mx.array]
    query_scale: Optional[mx.array]
    dtype: mx.Dtype
    of_scale: Optional[mx.array]
    of_mean: Optional[mx.array]


def cast_statistics(key_scale: Optional[mx.array], key_mean: Optional[mx.array],
                    dtype: mx.Dtype, n_heads: int = 0) -> StatsCast:
    """``StatsCast`` of (s, μ/s) for ``dtype``; with ``n_heads`` query heads,
    s repeated per query head (B, n_heads, 1, D): the queries' multiplier."""
    scale = None if key_scale is None else key_scale.astype(dtype)
    mean = None if key_mean is None else key_mean.astype(dtype)
    query_scale = None
    if n_heads and scale is not None:
        query_scale = mx.repeat(scale, n_heads // scale.shape[1], axis=1)
    return StatsCast(scale, mean, query_scale, dtype, key_scale, key_mean)

