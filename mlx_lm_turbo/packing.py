"""Bit packing of b-bit codes (1 <= b <= 8) into uint32 words.

Layout (shared with the fused kernels): the n codes of one vector form a little-endian
bit stream, code i in bits [i*b, (i+1)*b); bit p lives in word p // 32 at position
p % 32. A vector takes ceil(n*b / 32) words: no bits are wasted except the padding of
its last word. Codes may straddle two words when b does not divide 32.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np


def words_per_vector(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


@lru_cache(maxsize=None)
def _pack_plan(n: int, bits: int):
    """For each word, the codes overlapping it and the shift that places them."""
    w = words_per_vector(n, bits)
    k = -(-32 // bits) + 1  # at most this many codes touch one word
    idx = np.zeros((w, k), np.int32)
    shift = np.zeros((w, k), np.int32)
    valid = np.zeros((w, k), bool)
    for word in range(w):
        first = (32 * word) // bits
        for j in range(k):
            i = first + j
            start = i * bits - 32 * word
            if i < n and start < 32 and start + bits > 0:
                idx[word, j], shift[word, j], valid[word, j] = i, start, True
    left = np.where(valid & (shift >= 0), shift, 0).astype(np.uint32)
    right = np.where(valid & (shift < 0), -shift, 0).astype(np.uint32)
    return (mx.array(idx.reshape(-1)), mx.array(left), mx.array(right),
            mx.array(valid.astype(np.uint32)), w, k)


@lru_cache(maxsize=None)
def _unpack_plan(n: int, bits: int):
    start = np.arange(n) * bits
    lo_word = start // 32
    off = start % 32
    straddle = off + bits > 32
    hi_word = np.where(straddle, lo_word + 1, lo_word)
    hi_shift = np.where(straddle, 32 - off, 0)
    return (mx.array(lo_word.astype(np.int32)), mx.array(off.astype(np.uint32)),
            mx.array(hi_word.astype(np.int32)), mx.array(hi_shift.astype(np.uint32)),
            mx.array(straddle))


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack codes (..., n) with values < 2**bits into words (..., ceil(n*bits/32))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = codes.astype(mx.uint32)
    n = codes.shape[-1]
    if 32 % bits == 0:
        # Whole codes per word: one shift-and-sum over a reshape.
        per = 32 // bits
        pad = (-n) % per
        if pad:
            codes = mx.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
        codes = codes.reshape(*codes.shape[:-1], -1, per)
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        return (codes << shifts).sum(axis=-1).astype(mx.uint32)
    idx, left, right, valid, w, k = _pack_plan(n, bits)
    parts = mx.take(codes, idx, axis=-1).reshape(*codes.shape[:-1], w, k)
    parts = ((parts << left) >> right) * valid
    # Codes occupy disjoint bits, so the sum is their bitwise OR.
    return parts.sum(axis=-1).astype(mx.uint32)


def unpack(words: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of :func:`pack`: words (..., W) -> codes (..., n) as uint32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    mask = mx.array((1 << bits) - 1, dtype=mx.uint32)
    if 32 % bits == 0:
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        codes = (words[..., None] >> shifts) & mask
        return codes.reshape(*words.shape[:-1], -1)[..., :n]
    lo_word, off, hi_word, hi_shift, straddle = _unpack_plan(n, bits)
    lo = mx.take(words, lo_word, axis=-1) >> off
    hi = mx.where(straddle, mx.take(words, hi_word, axis=-1) << hi_shift, 0)
    return (lo | hi.astype(mx.uint32)) & mask
