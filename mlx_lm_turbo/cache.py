"""TurboKVCache: an mlx-lm layer cache that holds only packed codes.

Keys and values are encoded as they arrive; the cache keeps the codec's packed uint32
codes and per-vector fp16 scalars in buffers that grow in steps of 256 tokens, like
mlx-lm's own caches. ``update_and_fetch`` returns the packed views; the patched
``scaled_dot_product_attention`` reads them (fused kernel or pure-MLX reference).

GPU decode steps (one token, once the steady fused kernel serves this cache) skip the MLX
writes: the token is coded straight into the buffers and ``update_and_fetch`` returns
*live* dicts (whole buffers + what orders readers after the write; see
``_write_in_place``). On CUDA the attention launch codes it (the token waits in
``_pending`` until then, and any other reader writes it first: ``_flush``), elsewhere
the fused encode does, in a launch of its own. Batch-1 decode waits on host time per
graph node, and this is 1 node a layer on CUDA (the attention launch also combines its
splits), 3 on Metal, instead of ~11. The buffers are still the only copy: nothing is
held twice, ``nbytes`` is unchanged.

Key statistics (``center_keys``, ``scale_keys``; both on by default; see
key_statistics.py): the cache works in a scaled key space, every key entering as k/s,
centred by ``key_mean`` = μ/s, both fixed per head by the first ``STATS_TOKENS`` keys and
counted in ``nbytes``. The statistics depend only on those keys, never on how a prompt
is split into blocks: a cache that starts with fewer tokens keeps their exact keys
(counted) and codes them again with the statistics of the keys so far at every update
until STATS_TOKENS have arrived; from then on the codes are the same as if the first
block had brought STATS_TOKENS keys at once. Queries at positions below STATS_TOKENS read
those exact keys (attention.py), in a block prefill as in token-by-token decode, so the
whole model's result does not depend on the split either.

Optional fp16 window (``fp16_window`` W, ``--kv-fp16-window``): every token is coded, and
the newest W tokens are *also* kept uncompressed (fp16, or bf16 for bf16 models) and
counted in ``nbytes``. A query at position i reads keys/values i-W < j ≤ i from those
copies and older ones from the codes, the same rule in a prefill block as in a decode
step, so block prefill still equals token-by-token decode. ``update_and_fetch`` hands
attention the copies it needs (the W-1 tokens before the block, then the block) under
the key ``"recent"`` of the returned dicts; the cache itself keeps only the last W.
The few nearest tokens carry much of a small model's attention, so their coding error
costs the most.
"""

import copy
import copyreg
import json
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask

from . import __version__, codecs
from .codecs import layer_seed
from .config import TurboConfig
from .kernels import decode as fused_decode
from .kernels import encode as fused_encode
from .key_statistics import STATS_TOKENS, StatsCast, cast_statistics, key_statistics


def _dtype_from_name(name: str) -> mx.Dtype:
    return getattr(mx, name)


def _reduce_dtype(d: mx.Dtype):
    return _dtype_from_name, (str(d).split(".")[-1],)


# mx.Dtype (TurboKVCache.dtype) cannot be deep-copied or pickled, and mlx-lm's
# LRUPromptCache deep-copies every cache it hands out: teach copy/pickle that a dtype is
# its name (the dtypes are singletons, so a copy is the same object).
copyreg.pickle(mx.Dtype, _reduce_dtype)


# Elements (batch × heads × head dim × tokens) coded or decoded at a time when a whole
# cache changes form (from_kv_cache, to_fp16): the MLX codecs' intermediates take ~150
# bytes an element, so ~300 MB, whatever the context.
HANDOVER_ELEMENTS = 1 << 21


def handover_block(shape: tuple) -> int:
    """Tokens a hand-over step takes for keys/values of ``shape`` (B, H, S, D)."""
    return max(256, HANDOVER_ELEMENTS // (shape[0] * shape[1] * shape[-1]))


def _slice_tokens(packed: dict, start: Optional[int] = None,
                  stop: Optional[int] = None) -> dict:
    return {k: v[:, :, start:stop] for k, v in packed.items()}


class TurboKVCache(_BaseCache):
    step = 256
    # In-place appends (GPU decode steps, see update_and_fetch): allowed while the buffers
    # are this cache's alone, i.e. since its last MLX write (slice_update copies a buffer
    # anything else still holds); ``_done`` orders readers after the last one.
    _inplace = False
    _done = None
    _append = None   # (signature, the in-place launch resolved for it)
    # (key, value, position) of a decode step's token left for the attention launch to
    # code (see _write_in_place); ``_flush`` writes it where that launch does not. The
    # last such launch's output is ``_coded``: readers wait for it too (``_done`` stays
    # the in-place append's uint32 marker, one dtype for the kernels that take it).
    _pending = None
    _coded = None
    _first_span = None   # exact keys below STATS_TOKENS for this update's attention
    _stats_cast = None   # the key statistics in one dtype (``stats_in``)

    def __init__(self, key_method: str = "turboquant_mse", key_bits: int = 4,
                 value_method: Optional[str] = None, value_bits: Optional[int] = None,
                 seed: int = 0, layer: int = 0, center_keys: bool = False,
                 fp16_window: int = 0, scale_keys: bool = False):
        # (the bare class codes raw keys; TurboConfig, what the flags build, turns the
        # key statistics on)
        self.center_keys = center_keys
        self.scale_keys = scale_keys
        self.key_scale = None       # s (fp16), set by the first update
        self.first_keys = None      # exact keys held until STATS_TOKENS (module docstring)
        self.fp16_window = fp16_window
        self.recent_keys = None     # uncompressed copies of the newest fp16_window tokens
        self.recent_values = None
        self.key_method = codecs.canonical_name(key_method)
        self.value_method = codecs.canonical_name(value_method or key_method)
        self.key_bits = key_bits
        self.value_bits = key_bits if value_bits is None else value_bits
        self.seed = seed
        self.layer = layer
        self.keys = None
        self.values = None
        self.offset = 0
        self.dtype = None
        self.key_codec = None
        self.value_codec = None
        self.key_mean = None
        self._inplace, self._done, self._append = False, None, None
        self._pending = self._coded = None

    @classmethod
    def from_config(cls, config: TurboConfig, layer: int) -> "TurboKVCache":
        kb, vb = config.bits_for_layer(layer)
        return cls(config.key_method, kb, config.value_method, vb, config.seed, layer,
                   config.center_keys, config.fp16_window, config.scale_keys)

    def _make_codecs(self, k_dim: int, v_dim: int) -> None:
        self.key_codec = codecs.make(self.key_method, self.key_bits, k_dim,
                                     layer_seed(self.seed, self.layer, False), keys=True)
        self.value_codec = codecs.make(self.value_method, self.value_bits, v_dim,
                                       layer_seed(self.seed, self.layer, True))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        keys = self._key_space(keys)
        # A decode step whose attention runs the steady fused kernel: code the token
        # straight into the buffers (one launch, no slice writes or views: batch-1
        # decode waits on host time per graph node) and hand attention the live dicts.
        steady = getattr(self, "_fused_steady", None)
        if self._inplace and keys.shape[2] == 1 and not self.fp16_window \
                and steady is not None and fused_decode.live_allowed(steady) \
                and self.offset < self.capacity:
            live = self._write_in_place(keys, values)
            if live is not None:
                return live
        self._start(keys, values)
        self._write(keys, values, self.offset)
        self.offset += keys.shape[2]
        return self._with_first(*self._fetch(keys, values))

    def _start(self, keys: mx.array, values: mx.array) -> None:
        """Codecs, dtype and a zero key mean at the first update."""
        if self.key_codec is None:
            self._make_codecs(keys.shape[-1], values.shape[-1])
            self.dtype = keys.dtype
            if self.key_mean is None:   # statistics not fixed yet: μ = 0 (s = 1)
                self.key_mean = mx.zeros_like(keys[:, :, :1]).astype(mx.float16)

    def _with_first(self, k: dict, v: dict) -> tuple:
        """Attention's dicts plus, while the block holds positions below STATS_TOKENS, the
        exact keys there (k/s, under "first"): queries at those positions read them, so
        that what they compute, and the next layer's keys, do not depend on the split."""
        first, self._first_span = self._first_span, None
        return ({**k, "first": self._scaled(first)}, v) if first is not None else (k, v)

    def _key_space(self, keys: mx.array) -> mx.array:
        """Keys as the cache holds them, k/s. Until STATS_TOKENS keys have arrived, the
        statistics are those of the keys so far, and every update codes the held tokens
        again with them (from their exact copies, ``first_keys``); then they are fixed."""
        if not (self.center_keys or self.scale_keys):
            return keys
        if self.key_scale is None or self.first_keys is not None:
            seen = keys if self.first_keys is None else mx.concatenate(
                [self.first_keys.astype(keys.dtype), keys], axis=2)
            self._first_span = seen[:, :, :STATS_TOKENS]
            self.key_scale, self.key_mean = key_statistics(
                seen[:, :, :STATS_TOKENS], self.center_keys, self.scale_keys)
            held = self.first_keys
            # (in the keys' own dtype: the statistics and codes come out the same as
            # when the first block brings STATS_TOKENS keys at once)
            self.first_keys = seen if seen.shape[2] < STATS_TOKENS else None
            if held is not None:
                self._recode(held)
        return self._scaled(keys)

    def _centred(self, keys: mx.array) -> mx.array:
        """k - μ in the keys' dtype (the decode launch that codes the new token takes it in
        the queries' dtype). Every path codes this same value: block writes, in-place
        appends, recoding."""
        return keys - self.stats_in(keys.dtype).mean if self.center_keys else keys

    def _scaled(self, keys: mx.array) -> mx.array:
        return keys / self.stats_in(keys.dtype).scale if self.scale_keys else keys

    def stats_in(self, dtype: mx.Dtype, n_heads: int = 0) -> StatsCast:
        """The key statistics cast to ``dtype`` once (each decode step applies them to
        one token per layer; an fp16 statistic would promote a bf16 token to float32, and
        every extra op is host time that batch-1 decode waits on), and, for ``n_heads``
        query heads, s per query head. key_statistics rounds them through bf16 for bf16
        keys, so the cast is exact."""
        c = self._stats_cast
        if c is None or c.of_scale is not self.key_scale or c.of_mean is not self.key_mean \
                or c.dtype != dtype or (n_heads and c.query_scale is None):
            c = self._stats_cast = cast_statistics(self.key_scale, self.key_mean, dtype,
                                                   n_heads)
        return c

    def fix_statistics(self) -> None:
        """Keep the statistics as they are now, with fewer than STATS_TOKENS keys
        (batching needs every row's fixed)."""
        self.first_keys = None

    def _recode(self, held: mx.array) -> None:
        """Code the held tokens (all of them: exact keys ``held``) with the current
        statistics; the window's copies follow the new scale."""
        self._settle()
        self._inplace = False
        kx = self._scaled(held)   # the same steps as _write's
        kx = self._centred(kx)
        coded = fused_encode.encode(self.key_codec, kx)
        coded = self.key_codec.encode(kx) if coded is None else coded
        n = held.shape[2]
        for name, a in coded.items():
            self.keys[name][:, :, :n] = a
        if self.recent_keys is not None and self.recent_keys.shape[2]:
            r = self.recent_keys
            self.recent_keys = self._scaled(held[:, :, n - r.shape[2]:]).astype(r.dtype)

    def _write_in_place(self, keys: mx.array, values: mx.array):
        """(live keys, live values) after coding one token into the buffers in place, or
        None where that does not apply (the caller writes through MLX). A live dict is the
        packed dict of whole buffers plus "live": (keys held, positions array, done,
        owner: this cache), what the steady decode kernel reads; ``kernels.settle`` makes
        plain views of it. Where the steady attention launch codes the token itself, it is
        only left in ``_pending``."""
        prev = self.offset
        kx = self._centred(keys)
        if fused_decode.append_allowed(self._fused_steady):
            # The steady attention launch codes the token itself (kernels/src
            # mma_append.inc): no launch here at all.
            self._flush()
            self._pending = (kx, values, prev)
            self.offset = prev + 1
            live = fused_decode.LiveBuffers(self.offset, fused_encode.positions(prev, 1),
                                            self._done, self)
            return {**self.keys, "live": live}, {**self.values, "live": live}
        sig = (kx.shape, kx.dtype, fused_decode.switches())
        if self._append is not None and self._append[0] == sig:
            # (the launch resolved at an earlier step: host time is what this waits on)
            pos = fused_encode.positions(prev, 1)
            self._done = self._append[1](kx, values, self.keys, self.values, pos, self._done)
        else:
            w = fused_encode.write_pair_in_place(self.key_codec, self.value_codec, kx,
                                                 values, self.keys, self.values, prev,
                                                 self._done)
            if w is None:
                return None
            pos, self._done, write = w
            self._append = None if write is None else (sig, write)
        self.offset = prev + 1
        live = fused_decode.LiveBuffers(self.offset, pos, self._done, self)
        return {**self.keys, "live": live}, {**self.values, "live": live}

    def _flush(self) -> None:
        """Write a token left for the attention launch (``_pending``) that did not code it
        (another reader came first, or that launch does not apply): through the in-place
        launch, else MLX writes."""
        pending, self._pending = self._pending, None
        if pending is not None:
            kx, values, prev = pending
            w = fused_encode.write_pair_in_place(self.key_codec, self.value_codec, kx,
                                                 values, self.keys, self.values, prev,
                                                 self._done)
            if w is None:   # (_write centres what it is given: hand it the key back)
                self._write((kx + self.key_mean).astype(kx.dtype) if self.center_keys
                            else kx, values, prev)
            else:
                self._done = w[1]

    def _settle(self) -> None:
        """Wait for the last in-place append before the buffers are read or written any
        other way (a reader that does not take its ``done`` could run before it)."""
        self._flush()
        wait = [a for a in (self._done, self._coded) if a is not None]
        if wait:
            mx.eval(wait)
        self._done = self._coded = None

    def _write(self, keys: mx.array, values: mx.array, prev: int) -> None:
        """Encode a block and write its codes at token ``prev``, growing the buffers in
        steps of ``step`` tokens (shared with the batch cache)."""
        self._settle()
        k, v = self._encode(keys, values)
        n = keys.shape[2]
        if self.keys is None or prev + n > self.capacity:
            new = (self.step + n - 1) // self.step * self.step

            def grow(old: Optional[dict], fresh: dict) -> dict:
                out = {}
                for name, a in fresh.items():
                    shape = (a.shape[0], a.shape[1], new, *a.shape[3:])
                    z = mx.zeros(shape, a.dtype)
                    out[name] = z if old is None else mx.concatenate(
                        [old[name][:, :, :prev], z], axis=2)
                return out

            self.keys, self.values = grow(self.keys, k), grow(self.values, v)
        for store, fresh in ((self.keys, k), (self.values, v)):
            for name, a in fresh.items():
                store[name][:, :, prev:prev + n] = a
        self._inplace = True   # slice_update's outputs: nothing else holds them

    def _encode(self, keys: mx.array, values: mx.array) -> tuple:
        """(key codes, value codes) of a block of keys (as held, k/s) and values."""
        # Without centring key_mean is zero: skip the subtraction on the per-token path.
        kx = self._centred(keys)
        # Fused kernel launches where they apply (GPU, mse/rvq, power-of-two head dims):
        # K and V in one launch when their codecs match, else one each; otherwise the
        # codecs' MLX encode. All give the same packed dicts.
        pair = fused_encode.encode_pair(self.key_codec, self.value_codec, kx, values)
        if pair is not None:
            return pair
        k = fused_encode.encode(self.key_codec, kx)
        k = self.key_codec.encode(kx) if k is None else k
        v = fused_encode.encode(self.value_codec, values)
        v = self.value_codec.encode(values) if v is None else v
        return k, v

    def _fetch(self, keys: mx.array, values: mx.array):
        """What attention reads after an update: the packed views, plus (fp16 window) the
        block's uncompressed span under "recent"."""
        if not self.fp16_window:
            return self.keys_and_values()
        span_k, span_v = self._update_recent(keys, values)
        k_view, v_view = self.keys_and_values()
        return {**k_view, "recent": span_k}, {**v_view, "recent": span_v}

    def _update_recent(self, keys: mx.array, values: mx.array) -> tuple:
        """(the block's uncompressed span for attention, W-1 old tokens + the block); keep
        the last W. The span lives only as long as this layer's attention call."""
        dtype = mx.bfloat16 if keys.dtype == mx.bfloat16 else mx.float16
        keys, values = keys.astype(dtype), values.astype(dtype)
        if self.recent_keys is None:
            span_k, span_v = keys, values
        else:
            keep = self.fp16_window - 1
            old = self.recent_keys.shape[2]
            span_k = mx.concatenate([self.recent_keys[:, :, max(old - keep, 0):], keys], axis=2)
            span_v = mx.concatenate([self.recent_values[:, :, max(old - keep, 0):], values],
                                    axis=2)
        n = span_k.shape[2]
        if n > self.fp16_window:
            # Copies, not views: a view would keep the whole span alive (a prefill
            # block's keys and values) while nbytes counts W tokens.
            self.recent_keys = mx.contiguous(span_k[:, :, n - self.fp16_window:])
            self.recent_values = mx.contiguous(span_v[:, :, n - self.fp16_window:])
        else:
            self.recent_keys, self.recent_values = span_k, span_v
        return span_k, span_v

    def __deepcopy__(self, memo):
        """Copies the buffers (they are written in place) but shares the codecs: mlx-lm's
        LRUPromptCache deep-copies every cache it hands out."""
        self._settle()
        # The copies share the arrays (mx.array's deepcopy): neither may write in place
        # until an MLX write has given it buffers of its own.
        self._inplace = False
        new = self.__class__.__new__(self.__class__)
        for name, value in self.__dict__.items():
            if name == "_fused_steady":
                # It owns the counters of its folded launch (kernels.launchers
                # fold_launcher), which two caches must not share: the copy makes its own.
                continue
            shared = name in ("key_codec", "value_codec", "dtype", "_fused_consts",
                              "_fused_plan", "_append")
            setattr(new, name, value if shared else copy.deepcopy(value, memo))
        return new

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else next(iter(self.keys.values())).shape[2]

    def keys_and_values(self):
        self._settle()
        if self.offset == self.capacity:
            return self.keys, self.values
        return _slice_tokens(self.keys, 0, self.offset), _slice_tokens(self.values, 0, self.offset)

    def size(self) -> int:
        return self.offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        # A graph built before the trim may still read the trimmed tokens: rewrite them
        # through MLX (which copies a buffer still held) until the next write.
        self._settle()
        self._inplace = False
        if self.first_keys is not None:
            self.first_keys = self.first_keys[:, :, :self.offset]
        if self.recent_keys is not None:
            # The copies of the trimmed tokens go; older ones were never kept, so the
            # window is shorter until new tokens arrive (attention reads codes there).
            keep = max(self.recent_keys.shape[2] - n, 0)
            self.recent_keys = self.recent_keys[:, :, :keep]
            self.recent_values = self.recent_values[:, :, :keep]
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    # The batch form (batch_cache.BatchTurboKVCache, a subclass): set by patch.apply().
    batch_class = None

    @classmethod
    def merge(cls, caches: list):
        """Batch per-request caches for mlx-lm's BatchGenerator (server batching)."""
        return cls.batch_class.merge(caches)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (codes and scalars, allocated capacity)."""
        if self.keys is None:
            return 0
        mean = sum(a.nbytes for a in (self.key_mean, self.key_scale, self.first_keys)
                   if a is not None)
        recent = 0 if self.recent_keys is None else \
            self.recent_keys.nbytes + self.recent_values.nbytes
        return (codecs.packed_nbytes(self.keys) + codecs.packed_nbytes(self.values)
                + mean + recent)

    @property
    def bits_per_element(self) -> float:
        if self.key_codec is None:
            return float("nan")
        k, v = self.key_codec, self.value_codec
        coded = (k.bits_per_vector + v.bits_per_vector) / (k.dim + v.dim)
        if self.recent_keys is None or not self.offset:
            return coded
        # The window's copies, spread over the tokens held (their codes are counted above).
        return coded + 16 * self.recent_keys.shape[2] / self.size()

    def meta(self) -> dict:
        return {
            "format": "mlx_lm_turbo", "version": __version__,
            "key_method": self.key_method, "key_bits": self.key_bits,
            "value_method": self.value_method, "value_bits": self.value_bits,
            "seed": self.seed, "layer": self.layer, "center_keys": self.center_keys,
            "scale_keys": self.scale_keys, "fp16_window": self.fp16_window,
            # exact keys held while the key statistics wait for STATS_TOKENS tokens
            "first_keys": 0 if self.first_keys is None else self.first_keys.shape[2],
            "key_dim": self.key_codec.dim if self.key_codec else 0,
            "value_dim": self.value_codec.dim if self.value_codec else 0,
            "dtype": str(self.dtype).split(".")[-1] if self.dtype is not None else "",
        }

    @property
    def state(self):
        if self.keys is None:
            return None, None, 0, json.dumps(self.meta()), None
        k, v = self.keys_and_values()
        state = (k, v, self.offset, json.dumps(self.meta()), self._stats_rows())
        if self.fp16_window:
            state += (self.recent_keys, self.recent_values)
        return state

    def _stats_rows(self) -> Optional[mx.array]:
        """The key statistics as one array for files (B, H, rows, D): μ/s, then s (with
        ``scale_keys``), then the exact first keys still held; ``meta`` says which."""
        if not self.scale_keys and self.first_keys is None:
            return self.key_mean
        rows = [self.key_mean]
        if self.scale_keys:
            rows.append(self.key_scale if self.key_scale is not None
                        else mx.ones_like(self.key_mean))
        if self.first_keys is not None:
            rows.append(self.first_keys.astype(self.key_mean.dtype))   # (fp16 in files)
        return mx.concatenate(rows, axis=2)

    def _set_stats_rows(self, rows: Optional[mx.array], n_first: int) -> None:
        if rows is None:
            self.key_mean = None
            return
        self.key_mean = rows[:, :, :1]
        if self.scale_keys:
            self.key_scale = rows[:, :, 1:2]
        elif self.center_keys:
            self.key_scale = mx.ones_like(self.key_mean)
        if n_first:
            self.first_keys = rows[:, :, rows.shape[2] - n_first:]

    @state.setter
    def state(self, v):
        keys, values, offset, meta, key_mean = v[:5]
        meta = json.loads(meta)
        if meta.get("format") != "mlx_lm_turbo":
            raise ValueError("not an mlx_lm_turbo cache state")
        window = meta.get("fp16_window", 0)
        if len(v) != (7 if window else 5):
            raise ValueError(f"a cache state with fp16_window={window} has "
                             f"{7 if window else 5} entries, got {len(v)}")
        self.__init__(meta["key_method"], meta["key_bits"], meta["value_method"],
                      meta["value_bits"], meta["seed"], meta["layer"],
                      meta.get("center_keys", True), window, meta.get("scale_keys", False))
        self.keys, self.values, self.offset = keys, values, offset
        self._set_stats_rows(key_mean, meta.get("first_keys", 0))
        if window:
            self.recent_keys, self.recent_values = v[5], v[6]
        if keys is not None:
            self._make_codecs(meta["key_dim"], meta["value_dim"])
            self.dtype = getattr(mx, meta["dtype"]) if meta["dtype"] else mx.float16

    @classmethod
    def from_kv_cache(cls, kv: KVCache, config: TurboConfig, layer: int) -> "TurboKVCache":
        """Compress an fp16 KVCache (the --quantized-kv-start hand-over, convert-cache),
        a block of tokens at a time (``handover_block``): the encoder's float32
        intermediates stay one block long whatever the context."""
        c = cls.from_config(config, layer)
        n = kv.offset if kv.keys is not None else 0
        block = handover_block(kv.keys.shape) if n else 1
        for s in range(0, n, block):
            e = min(s + block, kv.offset)
            c.update_and_fetch(kv.keys[:, :, s:e], kv.values[:, :, s:e])
            mx.eval(c.keys, c.values, [a for a in (c.recent_keys, c.recent_values)
                                       if a is not None])
        return c

    def recent_span(self) -> tuple:
        """(first position, keys, values) of the uncompressed copies held, or None."""
        if self.recent_keys is None or self.recent_keys.shape[2] == 0:
            return None
        return self.offset - self.recent_keys.shape[2], self.recent_keys, self.recent_values

    def to_fp16(self) -> KVCache:
        """Decode into a plain mlx-lm KVCache (what an unpatched mlx-lm can load), a
        block of tokens at a time (``handover_block``)."""
        kv = KVCache()
        if self.keys is None or not self.offset:
            return kv
        k, v = self.keys_and_values()
        b, h = next(iter(k.values())).shape[:2]
        size = (self.offset + kv.step - 1) // kv.step * kv.step
        kv.keys = mx.zeros((b, h, size, self.key_codec.dim), self.dtype)
        kv.values = mx.zeros((b, h, size, self.value_codec.dim), self.dtype)
        mean = self.key_mean.astype(mx.float32)
        scaled = self.key_scale is not None and self.scale_keys

        def plain(keys):   # held as k/s
            return (keys * self.key_scale.astype(mx.float32) if scaled else keys).astype(
                self.dtype)

        span = self.recent_span()
        coded = self.offset if span is None else span[0]   # the window's copies are exact
        block = handover_block(kv.keys.shape)
        for s in range(0, coded, block):
            e = min(s + block, coded)
            kv.keys[:, :, s:e] = plain(self.key_codec.decode(_slice_tokens(k, s, e)) + mean)
            kv.values[:, :, s:e] = self.value_codec.decode(_slice_tokens(v, s, e), self.dtype)
            mx.eval(kv.keys, kv.values)
        if span is not None:
            kv.keys[:, :, coded:self.offset] = plain(span[1].astype(mx.float32))
            kv.values[:, :, coded:self.offset] = span[2].astype(self.dtype)
        if self.first_keys is not None:   # held exactly until the statistics exist
            n = self.first_keys.shape[2]
            kv.keys[:, :, :n] = self.first_keys.astype(self.dtype)
        kv.offset = self.offset
        return kv

