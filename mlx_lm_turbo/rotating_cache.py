"""TurboRotatingKVCache: mlx-lm's RotatingKVCache (sliding-window layers, --max-kv-size)
over packed codes.

The ring holds what a TurboKVCache holds, codes and fp16 scalars per token, and moves
them exactly as mlx-lm's ``RotatingKVCache`` moves fp16 keys: a single-token update is
written at the ring index ``_idx`` (wrapping to ``keep`` once ``max_size`` tokens are
held); a multi-token update puts the ring in temporal order, drops all but the newest
``max_size - 1`` tokens after the first ``keep``, and appends the block, so that every
query of the block sees ``max_size`` keys. ``make_mask`` is mlx-lm's own; ``trim`` and
``is_trimmable`` follow it (trimmable until the ring first fills). Attention reads the
ring as it lies: RoPE was applied before caching and softmax does not depend on the order
of the keys, so the fused decode kernels and the reference take the ring buffer with the
mask mlx-lm gives for it.

Key statistics (cache.py) work as in TurboKVCache while the ring holds every token so
far: the keys of the first STATS_TOKENS tokens fix them, and queries below that read
the exact keys. When the ring drops a token before STATS_TOKENS keys have arrived
(``max_size`` < STATS_TOKENS), the statistics are fixed from the keys seen until then.

With an fp16 window, attention gets the ring in temporal order (a copy of the codes
per call): the window's copies are the newest tokens, which the window rule reads as
the last columns.

The batch form (mlx-lm's BatchGenerator, i.e. the server) is BatchTurboRotatingKVCache:
mlx-lm's ``BatchRotatingKVCache`` over packed codes, with per-row key statistics as in
BatchTurboKVCache. Requests with an fp16 window or ``keep`` > 0 are batched by mlx-lm's
fp16 BatchRotatingKVCache from their decoded rows (one warning).
"""

import json
import warnings
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchRotatingKVCache, KVCache, RotatingKVCache, dynamic_roll

from .batch_cache import (BatchTurboKVCache, _cat_packed, _codec_key, _pad_tokens,
                          _zeros_like_rows)
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
        warnings.warn("mlx_lm_turbo: batched sliding-window layers with an fp16 window or "
                      "keep > 0 are held in fp16 (mlx-lm's BatchRotatingKVCache); single "
                      "requests are compressed.", stacklevel=3)


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
        """The batch form for the server: BatchTurboRotatingKVCache; mlx-lm's fp16 one from
        the decoded rows where a request has an fp16 window or keeps tokens."""
        if all(isinstance(c, TurboRotatingKVCache) and not c.fp16_window and not c.keep
               for c in caches):
            return BatchTurboRotatingKVCache.merge(caches)
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



def _roll(packed: dict, shift: int) -> dict:
    return {n: mx.roll(a, shift, axis=2) for n, a in packed.items()}


def _roll_rows(packed: dict, shifts: mx.array) -> dict:
    return {n: dynamic_roll(a, shifts[:, None], axis=2) for n, a in packed.items()}


def _tokens(packed: dict) -> int:
    return next(iter(packed.values())).shape[2]


class BatchTurboRotatingKVCache(BatchTurboKVCache):
    """mlx-lm's BatchRotatingKVCache over packed codes: the same ring moves (trim to
    ``max_size - 1`` before a block, ring writes and rotation of single tokens, rolls of
    right-padded rows), applied to every packed array along the token axis, and its
    ``make_mask``. Key statistics per row as in BatchTurboKVCache; no fp16 window."""

    def __init__(self, max_size: int, left_padding: List[int], *args, **kwargs):
        super().__init__(left_padding, *args, **kwargs)
        self.max_size = max_size
        self._offset = 0           # tokens written (padding included)
        self.rotated = False
        self._ends = None          # right-padded prefill: each row's last real position
        self._block_start = None   # rows' positions at the block being coded

    @classmethod
    def like(cls, c: TurboKVCache, left_padding: List[int]) -> "BatchTurboRotatingKVCache":
        b = cls(c.max_size, left_padding, c.key_method, c.key_bits, c.value_method,
                c.value_bits, c.seed, c.layer, c.center_keys, 0, c.scale_keys)
        b.key_codec, b.value_codec, b.dtype = c.key_codec, c.value_codec, c.dtype
        return b

    @classmethod
    def merge(cls, caches: list) -> "BatchTurboRotatingKVCache":
        """Each request's ring in temporal order, left-padded to the longest."""
        keys0 = _codec_key(caches[0])
        if any(_codec_key(c) != keys0 or c.max_size != caches[0].max_size for c in caches):
            raise ValueError("cannot batch sliding-window caches of different settings")
        lengths = [c.size() for c in caches]
        batch, padding, max_length = cls._merged_frame(caches, lengths)
        if max_length == 0:
            return batch
        kref, vref = next(c.keys_and_values() for c in caches if c.size())
        kparts, vparts = [], []
        for c, n, p in zip(caches, lengths, padding):
            if n == 0:
                kparts.append(_pad_tokens(_slice_tokens(kref, None, 0), max_length, 0))
                vparts.append(_pad_tokens(_slice_tokens(vref, None, 0), max_length, 0))
                continue
            k, v = (c._temporal(d) for d in c.keys_and_values())
            kparts.append(_pad_tokens(_slice_tokens(k, _tokens(k) - n), p, 0))
            vparts.append(_pad_tokens(_slice_tokens(v, _tokens(v) - n), p, 0))
        batch.keys, batch.values = _cat_packed(kparts, 0), _cat_packed(vparts, 0)
        batch.offset = mx.array([c.offset for c in caches], dtype=mx.int32)
        batch._idx = batch._offset = max_length
        batch._log("merge")
        return batch

    # ------------------------------------------------------------ updates
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.key_codec is None:
            self._make_codecs(keys.shape[-1], values.shape[-1])
            self.dtype = keys.dtype
        if not all(self._has_mean):
            self._block_start = self.offset.tolist()
            self._update_means(keys, 0)
        keys = self._scaled(keys)   # held as k/s, as in TurboKVCache
        self._settle()
        k, v = self._encode(keys, values)
        if keys.shape[2] == 1:
            self._write_ring(k, v)
        else:
            self._write_block(k, v)
        return self.keys_and_values()

    def _valid_range(self, i: int, start: int, n: int, left_padding: list) -> tuple:
        """Columns of the block holding row i's real tokens (positions >= 0 and, in a
        right-padded prefill, before the row's end)."""
        at = self._block_start[i]
        hi = n if self._ends is None else min(n, self._ends[i] - at)
        return max(0, -at), hi

    def _temporal_order(self) -> None:
        if self.rotated:
            self.keys, self.values = _roll(self.keys, -self._idx), _roll(self.values, -self._idx)
            self._idx = self.capacity
            self.rotated = False

    def _roll_right_padded(self) -> None:
        """Rows whose real tokens ended before the block's: their padding moves to the
        left, where trimming cannot drop real tokens."""
        shift = mx.maximum(0, self.offset - mx.array(self._ends, dtype=mx.int32))
        self.keys, self.values = _roll_rows(self.keys, shift), _roll_rows(self.values, shift)
        self.left_padding = self.left_padding + shift
        self.offset = self.offset - shift

    def _write_block(self, k: dict, v: dict) -> None:
        """BatchRotatingKVCache._update_concat: at most max_size - 1 old tokens stay, so
        each query of the block sees max_size keys."""
        n = _tokens(k)
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self._temporal_order()
            if self.capacity > self._idx:
                self.keys = _slice_tokens(self.keys, None, self._idx)
                self.values = _slice_tokens(self.values, None, self._idx)
            if self._ends is not None:
                self._roll_right_padded()
            trim = max(0, self._idx - self.max_size + 1)
            self.left_padding = self.left_padding - trim
            self.keys = _cat_packed([_slice_tokens(self.keys, trim), k], 2)
            self.values = _cat_packed([_slice_tokens(self.values, trim), v], 2)
        self.offset = self.offset + n
        self._offset += n
        self._idx = self.capacity

    def _write_ring(self, k: dict, v: dict) -> None:
        """BatchRotatingKVCache._update_in_place: grow to max_size, then write round."""
        if self._ends is not None:
            raise RuntimeError("finalize() must come before decoding")
        prev = self._offset
        if self.keys is None or (prev >= self.capacity and self.capacity < self.max_size):
            grow = min(self.step, self.max_size - prev)
            zk, zv = _zeros(k, grow), _zeros(v, grow)
            if self.keys is None:
                self.keys, self.values = zk, zv
            else:
                self.keys = _cat_packed([self.keys, zk], 2)
                self.values = _cat_packed([self.values, zv], 2)
            self._idx = prev
        trim = self.capacity - self.max_size
        if trim > 0:
            self.keys = _slice_tokens(self.keys, trim)
            self.values = _slice_tokens(self.values, trim)
            self._idx = self.max_size
            self.left_padding = self.left_padding - trim
        if self._idx == self.max_size:
            self.rotated, self._idx = True, 0
        if self.rotated:
            self.left_padding = self.left_padding - 1
        for store, fresh in ((self.keys, k), (self.values, v)):
            for name, a in fresh.items():
                store[name][:, :, self._idx:self._idx + 1] = a
        self._offset += 1
        self.offset = self.offset + 1
        self._idx += 1

    def keys_and_values(self):
        if self._offset < self.capacity:
            return (_slice_tokens(self.keys, None, self._offset),
                    _slice_tokens(self.values, None, self._offset))
        return self.keys, self.values

    # ------------------------------------------------------------ batching
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None:
            self._add_left_padding(left_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._ends = (mx.array(lengths, dtype=mx.int32) + self.offset).tolist()

    def finalize(self) -> None:
        if self._ends is not None:
            if self.keys is not None:
                self._roll_right_padded()
            self._ends = None

    def filter(self, batch_indices: List[int]) -> None:
        """In place: keep the given rows (the ring keeps its layout)."""
        if not self._keep_rows(batch_indices):
            self._offset, self.rotated = 0, False

    def extend(self, other: "BatchTurboRotatingKVCache") -> None:
        """In place: append other's rows, both rings aligned at one write index."""
        if self.key_codec is not None and other.key_codec is not None \
                and (_codec_key(self) != _codec_key(other) or self.max_size != other.max_size):
            raise ValueError("cannot batch sliding-window caches of different settings")
        n_self, n_other = self.batch_size, other.batch_size
        self._extend_statistics(other)
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        if self.rotated != other.rotated or self._idx != other._idx:
            self._temporal_order()
            other._temporal_order()
        max_idx = max(self._idx, other._idx)
        size = max(c.capacity for c in (self, other))
        ref = self if self.keys is not None else other

        def pad(c, rows):
            if c.keys is None:   # (rows of the other batch's shape, no tokens)
                k, v = _zeros_like_rows(ref.keys, rows, 0), _zeros_like_rows(ref.values, rows, 0)
            else:
                k, v = c.keys, c.values
            left = max_idx - c._idx
            right = size - _tokens(k) - left
            if right < 0:
                k, v = _slice_tokens(k, None, right), _slice_tokens(v, None, right)
                right = 0
            return _pad_tokens(k, left, right), _pad_tokens(v, left, right), c.left_padding + left

        ks, vs, lp = pad(self, n_self)
        ko, vo, lo = pad(other, n_other)
        self.keys, self.values = _cat_packed([ks, ko], 0), _cat_packed([vs, vo], 0)
        self.left_padding = mx.concatenate([lp, lo])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = max_idx
        self._offset = max(self._offset, other._offset)
        self._log("extend")

    def extract(self, idx: int) -> TurboRotatingKVCache:
        """Row ``idx`` as a single-request TurboRotatingKVCache (temporal order)."""
        c = TurboRotatingKVCache(self.key_method, self.key_bits, self.value_method,
                                 self.value_bits, self.seed, self.layer, self.center_keys, 0,
                                 self.scale_keys, max_size=self.max_size)
        c.key_codec, c.value_codec, c.dtype = self.key_codec, self.value_codec, self.dtype
        if self.key_mean is not None and self._has_mean[idx]:
            c.key_mean = mx.contiguous(self.key_mean[idx:idx + 1])
            if self.center_keys or self.scale_keys:
                c.key_scale = mx.contiguous(self.key_scale[idx:idx + 1])
        c.offset = self.offset[idx].item()
        if self.keys is None:
            return c
        pad = max(0, self.left_padding[idx].item())
        k = {n: a[idx:idx + 1] for n, a in self.keys.items()}
        v = {n: a[idx:idx + 1] for n, a in self.values.items()}
        end = self._idx
        if self.rotated:
            k, v, end = _roll(k, -self._idx), _roll(v, -self._idx), self.max_size
        c.keys = {n: mx.contiguous(a[:, :, pad:end]) for n, a in k.items()}
        c.values = {n: mx.contiguous(a[:, :, pad:end]) for n, a in v.items()}
        c._idx = _tokens(c.keys)
        c._inplace = False
        return c

    # ------------------------------------------------------------ cache API
    def size(self) -> int:
        return min(self._offset, self.max_size)

    def is_trimmable(self) -> bool:
        return self._offset < self.max_size

    def trim(self, n: int) -> int:
        n = min(self._offset, n)
        self._offset -= n
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None,
                  return_array: bool = False):
        return BatchRotatingKVCache.make_mask(self, N, window_size, return_array)
