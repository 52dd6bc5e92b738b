"""BatchTurboKVCache: the batch form of TurboKVCache, for mlx-lm's BatchGenerator (server).

It mirrors mlx-lm's ``BatchKVCache`` (left padding, per-sequence offsets, ``merge`` of
per-request caches, ``filter``, ``extend``, ``extract``, ``prepare``/``finalize`` for
right-padded prefill, ``make_mask``) but holds only packed codes. Every sequence of a batch
shares the codecs (same method, bits, seed and layer give the same rotation), so merging is
concatenating packed buffers along the batch axis, left-padded with zero codes (which
decode to zeros and are masked out).

The key statistics of TurboKVCache (``center_keys``, ``scale_keys``: the mean key μ/s and
the channel scales s) differ per request; they are kept per batch row, shape (B, H, 1, d),
and the queries of each row are scaled by its s. A row that enters the batch empty gets
them from the first STATS_TOKENS real tokens of its first block (padding excluded); a
request merged before it had STATS_TOKENS tokens fixes them from the keys it has. Caches
of different settings are not batched.

The fp16 window (``fp16_window``, see cache.py) is kept for the whole batch as copies of
the last n positions, right-aligned like the codes. Codes exist for every position, so a
copy can always be dropped (attention then reads the code): when rows with different
windows meet (merge, extend, or a right-padded prefill rolled into place), the batch keeps
the copies all rows have, and a row whose tokens all have copies is padded with zeros
where it has only padding.

It subclasses TurboKVCache, so the patched attention (``isinstance(cache, TurboKVCache)``)
and ``reference_attention`` take it unchanged: it exposes ``key_codec``, ``value_codec``
and ``key_mean``, and ``update_and_fetch`` returns the packed views.
"""

import logging
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import create_causal_mask, dynamic_roll

from .cache import TurboKVCache
from .key_statistics import STATS_TOKENS, key_statistics

log = logging.getLogger("mlx_lm_turbo")


_decode_batch = 0   # batch size of the last decode step (layer 0), for the log


def _codec_key(c: TurboKVCache) -> tuple:
    return (c.key_method, c.key_bits, c.value_method, c.value_bits, c.seed, c.layer,
            getattr(c, "center_keys", False), getattr(c, "fp16_window", 0),
            getattr(c, "scale_keys", False))


def _recent_rows(c: TurboKVCache, n: int) -> tuple:
    """The last n window copies of a single-request cache, left-padded with zeros where
    the request has no token (it holds copies of all its tokens there)."""
    rk, rv = c.recent_keys, c.recent_values
    have = 0 if rk is None else rk.shape[2]
    if have >= n:
        return rk[:, :, have - n:], rv[:, :, have - n:]
    pad = [(0, 0), (0, 0), (n - have, 0), (0, 0)]
    return mx.pad(rk, pad), mx.pad(rv, pad)


def _usable_copies(c: TurboKVCache) -> int:
    """How many trailing positions a batch can take copies of from this request."""
    have = 0 if c.recent_keys is None else c.recent_keys.shape[2]
    return c.fp16_window if have >= c.offset else have


def _cat_packed(parts: List[dict], axis: int) -> dict:
    return {name: mx.concatenate([p[name] for p in parts], axis=axis) for name in parts[0]}


def _pad_tokens(packed: dict, left: int, right: int) -> dict:
    out = {}
    for name, a in packed.items():
        if left or right:
            pad = [(0, 0)] * a.ndim
            pad[2] = (left, right)
            a = mx.pad(a, pad)
        out[name] = a
    return out


def _zeros_like_rows(packed: dict, rows: int, length: int) -> dict:
    return {name: mx.zeros((rows, a.shape[1], length, *a.shape[3:]), a.dtype)
            for name, a in packed.items()}


class BatchTurboKVCache(TurboKVCache):
    step = 256

    def __init__(self, left_padding: List[int], key_method: str = "turboquant_mse",
                 key_bits: int = 4, value_method: Optional[str] = None,
                 value_bits: Optional[int] = None, seed: int = 0, layer: int = 0,
                 center_keys: bool = False, fp16_window: int = 0,
                 scale_keys: bool = False):
        super().__init__(key_method, key_bits, value_method, value_bits, seed, layer,
                         center_keys, fp16_window, scale_keys)
        self.left_padding = mx.array(left_padding, dtype=mx.int32)
        self.offset = mx.array([-p for p in left_padding], dtype=mx.int32)
        self._idx = 0
        self._right_padding = None
        self._prompt_start = 0      # _idx at prepare(): where the right-padded prompt starts
        self._lengths = None        # real tokens per row of that prompt (right padding after)
        self._has_mean = [False] * len(left_padding)

    @classmethod
    def like(cls, c: TurboKVCache, left_padding: List[int]) -> "BatchTurboKVCache":
        b = cls(left_padding, c.key_method, c.key_bits, c.value_method, c.value_bits,
                c.seed, c.layer, c.center_keys, c.fp16_window, c.scale_keys)
        b.key_codec, b.value_codec, b.dtype = c.key_codec, c.value_codec, c.dtype
        return b

    # ------------------------------------------------------------ batching
    @classmethod
    def merge(cls, caches: List[TurboKVCache]) -> "BatchTurboKVCache":
        """Left-pad per-request caches to a common length and stack them."""
        if not caches:
            raise ValueError("merge needs at least one cache")
        keys0 = _codec_key(caches[0])
        for c in caches:
            if not isinstance(c, TurboKVCache) or isinstance(c, BatchTurboKVCache):
                raise TypeError(f"cannot batch {type(c).__name__} with TurboKVCache")
            if _codec_key(c) != keys0:
                raise ValueError("cannot batch TurboKVCaches of different method/bits/seed/layer")
        lengths = [c.offset for c in caches]
        batch, padding, max_length = cls._merged_frame(caches, lengths)
        if max_length == 0:
            batch._log("merge")
            return batch
        full = [c for c in caches if c.offset > 0]
        kref, vref = full[0].keys, full[0].values
        kparts, vparts = [], []
        for c, p in zip(caches, padding):
            if c.offset == 0:
                kparts.append(_zeros_like_rows(kref, 1, max_length))
                vparts.append(_zeros_like_rows(vref, 1, max_length))
            else:
                k, v = c.keys_and_values()
                kparts.append(_pad_tokens(k, p, 0))
                vparts.append(_pad_tokens(v, p, 0))
        batch.keys, batch.values = _cat_packed(kparts, 0), _cat_packed(vparts, 0)
        if batch.fp16_window:
            n = min(min(_usable_copies(c) for c in full), max_length)
            rows = [_recent_rows(c if c.offset else full[0], n) for c in caches]
            # (an empty request borrows a row's shape: its positions are all padding)
            batch.recent_keys = mx.concatenate([k for k, _ in rows], axis=0)
            batch.recent_values = mx.concatenate([v for _, v in rows], axis=0)
        batch.offset = batch.offset + max_length
        batch._idx = max_length
        batch._log("merge")
        return batch

    @classmethod
    def _merged_frame(cls, caches: List[TurboKVCache], lengths: List[int]) -> tuple:
        """(an empty batch left-padded to the longest of ``lengths``, with the rows'
        statistics; the padding per row; the longest length)."""
        max_length = max(lengths)
        padding = [max_length - n for n in lengths]
        src = next((c for c in caches if c.key_codec is not None), caches[0])
        batch = cls.like(src, padding)
        batch._merge_statistics(caches)
        return batch, padding, max_length

    def _merge_statistics(self, caches: List[TurboKVCache]) -> None:
        """The rows' key statistics (s, μ/s), fixed in each request first: every row's
        keys share one s and μ from here on."""
        for c in caches:
            c.fix_statistics()
        with_mean = [c for c in caches if c.key_mean is not None]
        if with_mean:
            m0 = with_mean[0].key_mean
            zero = mx.zeros((1, *m0.shape[1:]), m0.dtype)
            self.key_mean = mx.concatenate(
                [c.key_mean if c.key_mean is not None else zero for c in caches], axis=0)
            self.key_scale = mx.concatenate(
                [c.key_scale if c.key_scale is not None else zero + 1 for c in caches], axis=0)
            self._has_mean = [c.key_scale is not None or (c.key_mean is not None and not (
                c.center_keys or c.scale_keys)) for c in caches]

    def filter(self, batch_indices: List[int]) -> None:
        """In place: keep the given rows (then drop the common left padding)."""
        if not self._keep_rows(batch_indices):
            return
        min_left = min(self.left_padding.tolist())
        if min_left > 0:
            if self.keys is not None:
                self.keys = {n: a[:, :, min_left:] for n, a in self.keys.items()}
                self.values = {n: a[:, :, min_left:] for n, a in self.values.items()}
            self._idx -= min_left
            self.left_padding = self.left_padding - min_left

    def _keep_rows(self, batch_indices: List[int]) -> bool:
        """Keep the given rows of every per-row array; False when none is left."""
        idx = mx.array(batch_indices, dtype=mx.int32) if len(batch_indices) else None
        if idx is None:
            self.keys = self.values = self.key_mean = self.key_scale = None
            self.recent_keys = self.recent_values = None
            self.offset = self.offset[:0]
            self.left_padding = self.left_padding[:0]
            self._has_mean = []
            self._idx = 0
            return False
        if self.keys is not None:
            self.keys = {n: a[idx] for n, a in self.keys.items()}
            self.values = {n: a[idx] for n, a in self.values.items()}
        if self.key_mean is not None:
            self.key_mean = self.key_mean[idx]
        if self.key_scale is not None:
            self.key_scale = self.key_scale[idx]
        if self.recent_keys is not None:
            self.recent_keys, self.recent_values = self.recent_keys[idx], self.recent_values[idx]
        self.offset = self.offset[idx]
        self.left_padding = self.left_padding[idx]
        self._has_mean = [self._has_mean[i] for i in batch_indices]
        return True

    def _extend_statistics(self, other: "BatchTurboKVCache") -> None:
        """Take other's codecs if this batch has none; stack the rows' key statistics,
        (μ = 0, s = 1 for rows that have none yet)."""
        if self.key_codec is None and other.key_codec is not None:
            self.key_codec, self.value_codec = other.key_codec, other.value_codec
            self.dtype = other.dtype
        n_self, n_other = self.batch_size, other.batch_size
        if self.key_mean is not None or other.key_mean is not None:
            ref = self.key_mean if self.key_mean is not None else other.key_mean

            def rows(c, n, name, fill):
                a = getattr(c, name)
                return a if a is not None else mx.full((n, *ref.shape[1:]), fill, ref.dtype)

            self.key_mean = mx.concatenate([rows(self, n_self, "key_mean", 0),
                                            rows(other, n_other, "key_mean", 0)])
            self.key_scale = mx.concatenate([rows(self, n_self, "key_scale", 1),
                                             rows(other, n_other, "key_scale", 1)])
        self._has_mean = self._has_mean + other._has_mean

    def extend(self, other: "BatchTurboKVCache") -> None:
        """In place: append the rows of ``other`` (right-justified to a common index)."""
        if self.key_codec is not None and other.key_codec is not None \
                and _codec_key(self) != _codec_key(other):
            raise ValueError("cannot batch TurboKVCaches of different method/bits/seed/layer")
        self._extend_statistics(other)
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        n_self, n_other = self.batch_size, other.batch_size
        max_idx = max(self._idx, other._idx)
        ref = self if self.keys is not None else other
        max_size = max(c.capacity for c in (self, other))

        def pad(c, n):
            if c.keys is None:
                k = _zeros_like_rows(ref.keys, n, 0)
                v = _zeros_like_rows(ref.values, n, 0)
            else:
                k, v = c.keys, c.values
            size = next(iter(k.values())).shape[2]
            left = max_idx - c._idx
            right = max_size - size - left
            if right < 0:
                k = {n_: a[:, :, :right] for n_, a in k.items()}
                v = {n_: a[:, :, :right] for n_, a in v.items()}
                right = 0
            return _pad_tokens(k, left, right), _pad_tokens(v, left, right), c.left_padding + left

        ks, vs, lp = pad(self, n_self)
        ko, vo, lo = pad(other, n_other)
        self.keys, self.values = _cat_packed([ks, ko], 0), _cat_packed([vs, vo], 0)
        if self.fp16_window or other.fp16_window:
            self._extend_recent(other)
        self.left_padding = mx.concatenate([lp, lo])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = max_idx
        self._log("extend")

    def _extend_recent(self, other: "BatchTurboKVCache") -> None:
        """Stack the window copies of both batches, keeping the positions both have."""
        mine, theirs = self.recent_keys is not None, other.recent_keys is not None
        if not (mine and theirs):
            self.recent_keys = self.recent_values = None
            return
        n = min(self.recent_keys.shape[2], other.recent_keys.shape[2])
        cut = lambda a: a[:, :, a.shape[2] - n:]  # noqa: E731  (last n, right-aligned)
        self.recent_keys = mx.concatenate([cut(self.recent_keys), cut(other.recent_keys)])
        self.recent_values = mx.concatenate([cut(self.recent_values), cut(other.recent_values)])

    def extract(self, idx: int) -> TurboKVCache:
        """Row ``idx`` as a single-request TurboKVCache (padding dropped, exact size)."""
        c = TurboKVCache(self.key_method, self.key_bits, self.value_method, self.value_bits,
                         self.seed, self.layer, self.center_keys, self.fp16_window,
                         self.scale_keys)
        c.key_codec, c.value_codec, c.dtype = self.key_codec, self.value_codec, self.dtype
        if self.key_mean is not None and self._has_mean[idx]:
            c.key_mean = mx.contiguous(self.key_mean[idx:idx + 1])
            if self.center_keys or self.scale_keys:
                c.key_scale = mx.contiguous(self.key_scale[idx:idx + 1])
        if self.keys is None:
            return c
        pad = self.left_padding[idx].item()
        if pad >= self._idx:
            return c
        c.keys = {n: mx.contiguous(a[idx:idx + 1, :, pad:self._idx]) for n, a in self.keys.items()}
        c.values = {n: mx.contiguous(a[idx:idx + 1, :, pad:self._idx])
                    for n, a in self.values.items()}
        c.offset = self._idx - pad
        if self.recent_keys is not None:
            n = min(self.recent_keys.shape[2], c.offset)
            c.recent_keys = mx.contiguous(self.recent_keys[idx:idx + 1, :, -n:] if n else
                                          self.recent_keys[idx:idx + 1, :, :0])
            c.recent_values = mx.contiguous(self.recent_values[idx:idx + 1, :, -n:] if n else
                                            self.recent_values[idx:idx + 1, :, :0])
        return c

    def _add_left_padding(self, left_padding) -> None:
        if self.keys is not None:
            raise ValueError("Left padding can only be added to an empty batch cache")
        lp = mx.array(left_padding, dtype=mx.int32)
        self.left_padding = self.left_padding + lp
        self.offset = self.offset - lp

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None:
            self._add_left_padding(left_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding, dtype=mx.int32)
            self._prompt_start = self._idx
            self._lengths = list(lengths) if lengths is not None else None

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding = self._right_padding
            if self.keys is not None:
                self.keys = {n: dynamic_roll(a, padding[:, None], axis=2)
                             for n, a in self.keys.items()}
                self.values = {n: dynamic_roll(a, padding[:, None], axis=2)
                               for n, a in self.values.items()}
            if self.recent_keys is not None:
                # Rolling moves older tokens (that have no copy) into the window: keep
                # only the copies every row still has after its shift.
                shift = int(padding.max().item())
                n = max(self.recent_keys.shape[2] - shift, 0)
                rk = dynamic_roll(self.recent_keys, padding[:, None], axis=2)
                rv = dynamic_roll(self.recent_values, padding[:, None], axis=2)
                self.recent_keys = rk[:, :, rk.shape[2] - n:]
                self.recent_values = rv[:, :, rv.shape[2] - n:]
            self.offset = self.offset - padding
            self.left_padding = self.left_padding + padding
            self._right_padding = None
            self._lengths = None

    # ------------------------------------------------------------ cache API
    @property
    def batch_size(self) -> int:
        return self.left_padding.shape[0]

    def _valid_range(self, i: int, start: int, n: int, left_padding: list) -> tuple:
        lo = max(start, left_padding[i])
        hi = start + n
        if self._right_padding is not None and self._lengths is not None:
            hi = min(hi, self._prompt_start + self._lengths[i])
        return lo - start, hi - start

    def _update_means(self, keys: mx.array, start: int) -> None:
        """Key statistics (s, μ/s) for rows that have none yet, from the first
        STATS_TOKENS real tokens of this block (s = 1, μ = 0 where both are off)."""
        need = [i for i, has in enumerate(self._has_mean) if not has]
        if not need:
            return
        b, h, _, d = keys.shape
        if self.key_mean is None:
            self.key_mean = mx.zeros((b, h, 1, d), mx.float16)
        if self.key_scale is None:
            self.key_scale = mx.ones((b, h, 1, d), mx.float16)
        left_padding = self.left_padding.tolist()
        rows = [self.key_mean[i:i + 1] for i in range(b)]
        scales = [self.key_scale[i:i + 1] for i in range(b)]
        for i in need:
            lo, hi = self._valid_range(i, start, keys.shape[2], left_padding)
            if hi > lo:
                if self.center_keys or self.scale_keys:
                    block = keys[i:i + 1, :, lo:min(hi, lo + STATS_TOKENS)]
                    scales[i], rows[i] = key_statistics(block, self.center_keys,
                                                        self.scale_keys)
                self._has_mean[i] = True
        self.key_mean = mx.concatenate(rows, axis=0)
        self.key_scale = mx.concatenate(scales, axis=0)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.key_codec is None:
            self._make_codecs(keys.shape[-1], values.shape[-1])
            self.dtype = keys.dtype
        prev, n = self._idx, keys.shape[2]
        if n == 1 and self.layer == 0:
            global _decode_batch
            if keys.shape[0] != _decode_batch:
                _decode_batch = keys.shape[0]
                log.info("mlx-lm-turbo: decoding a batch of %d sequences", _decode_batch)
        self._update_means(keys, prev)
        keys = self._scaled(keys)   # held as k/s, as in TurboKVCache
        self._write(keys, values, prev)
        self.offset = self.offset + n
        self._idx += n
        return self._fetch(keys, values)

    def keys_and_values(self):
        return ({n: a[:, :, :self._idx] for n, a in self.keys.items()},
                {n: a[:, :, :self._idx] for n, a in self.values.items()})

    def size(self) -> int:
        return self._idx

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        if self.recent_keys is not None:
            keep = max(self.recent_keys.shape[2] - n, 0)
            self.recent_keys = self.recent_keys[:, :, :keep]
            self.recent_values = self.recent_values[:, :, :keep]
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    @property
    def state(self):
        if self.keys is None:
            return None, None, self.offset, self.left_padding, self.key_mean
        k, v = self.keys_and_values()
        return k, v, self.offset, self.left_padding, self.key_mean

    @state.setter
    def state(self, v):
        raise NotImplementedError("BatchTurboKVCache is not saved; extract() each row")

    def _log(self, what: str) -> None:
        """One line per batch formation (layer 0 only): the server's log proves batching."""
        if self.layer == 0:
            log.info("mlx-lm-turbo: %s -> batch of %d sequences", what, self.batch_size)
