"""TurboRotatingKVCache: mlx-lm's RotatingKVCache (sliding-window layers, --max-kv-size)
over packed codes.

The ring holds what a TurboKVCache holds, codes and fp16 scalars per token, and moves
them exactly as mlx-lm's ``RotatingKVCache`` moves fp16 keys: a single-token update is
written at the ring index ``_idx`` (wrapping to ``keep`` once ``max_size`` tokens are
held); a multi-token update puts the ring in temporal order, drops all but the newest
``max_size - 1`` tokens after the first ``keep``, and appends the block, so that every
query of the block sees ``max_size`` keys. ``make_mask`` is mlx-lm's own; ``trim`` and
``is_trimmable`` follow it (trimmable until the ring first fills). Attention reads the ring as it lies: RoPE was applied before caching
and softmax does not depend on the order of the keys, so the fused decode kernels and
the reference take the ring buffer with the mask mlx-lm gives for it.

Key statistics (cache.py) work as in TurboKVCache while the ring holds every token so
far: the keys of the first STATS_TOKENS tokens fix them, and queries below that read
the exact keys. When the ring drops a token before STATS_TOKENS keys have arrived
(``max_size`` < STATS_TOKENS), the statistics are fixed from the keys seen until then.

With an fp16 window, attention gets the ring in temporal order (a copy of the codes
per call): the window's copies are the newest tokens, which the window rule reads as
the last columns.

The batch form (mlx-lm's BatchGenerator, i.e. the server) is mlx-lm's fp16
BatchRotatingKVCache: ``merge`` decodes the rows (warning once); see the README.
"""

import json
import warnings
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchRotatingKVCache, KVCache, RotatingKVCache

from .cache import TurboConfig, TurboKVCache, _slice_tokens


def _concat(parts: list) -> dict:
    parts = [p for p in parts if next(iter(p.values())).shape[2]]
    if len(parts) == 1:
        return parts[0]
    return {n: mx.concatenate([p[n] for p in parts], axis=2) for n in parts[0]}


def _zeros(like: dict, n: int) -> dict:
    return {name: mx.zeros((a.shape[0], a.shape[1], n, *a.shape[3:]), a.dtype)
            for name, a in like.items()}


_warned_batch = False


def _warn_batch_once() -> None:
    global _warned_batch
    if not _warned_batch:
        _warned_batch = True
        warnings.warn("mlx_lm_turbo: batched sliding-window layers (server) are held in "
                      "fp16 (mlx-lm's BatchRotatingKVCache); single requests are "
                      "compressed.", stacklevel=3)


class TurboRotatingKVCache(TurboKVCache):
    def __init__(self, *args, max_size: int = 0, keep: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_size = max_size
        self.keep = keep
        self._idx = 0   # ring index of the next single-token write

    @classmethod
    def from_config(cls, config: TurboConfig, layer: int, max_size: int = 0,
                    keep: int = 0) -> "TurboRotatingKVCache":
        c = super().from_config(config, layer)
        c.max_size, c.keep = max_size, keep
        return c

    # ------------------------------------------------------------ updates
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        keys = self._key_space(keys)   # (codes the held tokens again while statistics wait)
        self._start(keys, values)
        self._settle()
        k, v = self._encode(keys, values)
        if keys.shape[2] == 1:
            self._write_ring(k, v)
        else:
            self._write_concat(k, v)
        self.offset += keys.shape[2]
        if self._view_length() < self.offset:
            # A token left the ring: the view no longer starts at position 0, so the exact
            # first keys cannot line up with it, and the statistics stay as they are.
            self.first_keys = self._first_span = None
        return self._with_first(*self._fetch(keys, values))

    def _write_ring(self, k: dict, v: dict) -> None:
        """RotatingKVCache._update_in_place over packed dicts."""
        prev = self.offset
        if self.keys is None or (prev >= self.capacity and self.capacity < self.max_size):
            n = min(self.step, self.max_size - prev)
            if self.keys is None:
                self.keys, self.values = _zeros(k, n), _zeros(v, n)
            else:
                self.keys = _concat([self.keys, _zeros(k, n)])
                self.values = _concat([self.values, _zeros(v, n)])
            self._idx = prev
        trim = self.capacity - self.max_size
        if trim > 0:
            self.keys, self.values = self._trim(trim, self.keys), self._trim(trim, self.values)
            self._idx = self.max_size
        if self._idx == self.max_size:   # rotate
            self._idx = self.keep
        for store, fresh in ((self.keys, k), (self.values, v)):
            for name, a in fresh.items():
                store[name][:, :, self._idx:self._idx + 1] = a
        self._idx += 1

    def _write_concat(self, k: dict, v: dict) -> None:
        """RotatingKVCache._update_concat over packed dicts: at most max_size - 1 old
        tokens are kept (after the first ``keep``), so each query sees max_size keys."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys, self.values = self._temporal(self.keys), self._temporal(self.values)
            self._idx = self.capacity
            trim = self._idx - self.max_size + 1
            self.keys = self._trim(trim, self.keys, k)
            self.values = self._trim(trim, self.values, v)
        self._idx = self.capacity

    def _trim(self, trim: int, packed: dict, append: Optional[dict] = None) -> dict:
        parts = [packed] if trim <= 0 else [_slice_tokens(packed, None, self.keep),
                                            _slice_tokens(packed, trim + self.keep)]
        return _concat(parts + ([append] if append is not None else []))

    def _temporal(self, packed: dict) -> dict:
        """The ring's tokens oldest first (RotatingKVCache._temporal_order)."""
        n = next(iter(packed.values())).shape[2]
        if self._idx == n:
            return packed
        if self._idx < self.offset:
            return _concat([_slice_tokens(packed, None, self.keep),
                            _slice_tokens(packed, self._idx),
                            _slice_tokens(packed, self.keep, self._idx)])
        return _slice_tokens(packed, None, self._idx)

    def _view_length(self) -> int:
        return min(self.offset, self.capacity)

    def _fetch(self, keys: mx.array, values: mx.array):
        if not self.fp16_window:
            return self.keys_and_values()
        span_k, span_v = self._update_recent(keys, values)
        k_view, v_view = (self._temporal(d) for d in self.keys_and_values())
        n = next(iter(k_view.values())).shape[2]   # (copies of tokens the ring still holds)
        return {**k_view, "recent": span_k[:, :, -n:]}, {**v_view, "recent": span_v[:, :, -n:]}

    def keys_and_values(self):
        """The ring as it lies (the first ``offset`` slots until it fills)."""
        self._settle()
        if self.offset < self.capacity:
            return (_slice_tokens(self.keys, None, self.offset),
                    _slice_tokens(self.values, None, self.offset))
        return self.keys, self.values

    # ------------------------------------------------------------ mlx-lm's interface
    def size(self) -> int:
        return min(self.offset, self.max_size)

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._idx -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None,
                  return_array: bool = False):
        mask = RotatingKVCache.make_mask(self, N, window_size, return_array)
        if self.fp16_window and N == 1 and isinstance(mask, mx.array):
            # With a window attention reads the ring in temporal order (_fetch): no roll.
            mask = mx.arange(mask.shape[-1]) >= mask.shape[-1] - window_size
        return mask

    @classmethod
    def merge(cls, caches: list):
        """mlx-lm's fp16 batch form, from each row decoded (the server's batches)."""
        _warn_batch_once()
        return BatchRotatingKVCache.merge(
            [c.to_fp16() if isinstance(c, TurboRotatingKVCache) else c for c in caches])

    # ------------------------------------------------------------ files, hand-overs
    def meta(self) -> dict:
        return {**super().meta(), "max_size": self.max_size, "keep": self.keep,
                "idx": self._idx}

    @property
    def state(self):
        return TurboKVCache.state.fget(self)

    @state.setter
    def state(self, v):
        TurboKVCache.state.fset(self, v)
        meta = json.loads(v[3])
        self.max_size, self.keep, self._idx = meta["max_size"], meta["keep"], meta["idx"]

    def to_fp16(self) -> RotatingKVCache:
        """Decode into mlx-lm's fp16 RotatingKVCache (temporal order, same offset)."""
        rc = RotatingKVCache(self.max_size, self.keep)
        if self.keys is None or not self.offset:
            return rc
        # A TurboKVCache holding the ring's tokens oldest first decodes them.
        flat = TurboKVCache.__new__(TurboKVCache)
        flat.__dict__.update(self.__dict__)
        flat.keys, flat.values = (self._temporal(d) for d in self.keys_and_values())
        flat.offset = n = next(iter(flat.keys.values())).shape[2]
        if self.recent_keys is not None:
            flat.recent_keys = self.recent_keys[:, :, -n:]
            flat.recent_values = self.recent_values[:, :, -n:]
        kv = flat.to_fp16()
        rc.keys, rc.values = kv.keys[:, :, :n], kv.values[:, :, :n]
        rc.offset, rc._idx = self.offset, n
        return rc

    @classmethod
    def from_rotating(cls, rc: RotatingKVCache, config: TurboConfig,
                      layer: int) -> "TurboRotatingKVCache":
        """Compress mlx-lm's fp16 RotatingKVCache (--quantized-kv-start, convert-cache)."""
        c = cls.from_config(config, layer, rc.max_size, rc.keep)
        if rc.keys is None:
            return c
        kv = KVCache()
        kv.keys, kv.values = rc._temporal_order(rc.keys), rc._temporal_order(rc.values)
        kv.offset = n = kv.keys.shape[2]
        if n == 0:
            return c
        # The tokens held, oldest first, coded as a TurboKVCache codes them (statistics
        # from the first of them), then adopted as the ring in temporal order.
        flat = TurboKVCache.from_kv_cache(kv, config, layer)
        c.__dict__.update(flat.__dict__)
        c.keys = {name: mx.contiguous(a[:, :, :n]) for name, a in flat.keys.items()}
        c.values = {name: mx.contiguous(a[:, :, :n]) for name, a in flat.values.items()}
        c.offset, c._idx = rc.offset, n
        c._inplace = False
        if c.offset > n:   # tokens were dropped: the statistics stay as they are
            c.first_keys = None
        return c


def compress_layer(c, config: TurboConfig, layer: int):
    """A turbo cache for an fp16 KVCache or RotatingKVCache layer; others unchanged."""
    if type(c) is KVCache:
        return TurboKVCache.from_kv_cache(c, config, layer)
    if type(c) is RotatingKVCache:
        return TurboRotatingKVCache.from_rotating(c, config, layer)
    return c

