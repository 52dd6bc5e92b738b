"""QJL (arXiv 2406.03482): a 1-bit Johnson-Lindenstrauss sketch, for keys.

z = sign(S u) with S a seeded Gaussian m x d matrix; ⟨q, x⟩ is estimated without bias
by ρ·√(π/2)/m·⟨S q, z⟩. ``bits`` sets the sketch size m = bits·d (bits per element
before the norm). The sketch acts on the rotated vector: S Π is Gaussian too, so this
changes nothing statistically and keeps every codec in one domain.
"""

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..packing import pack, unpack, words_per_vector
from .common import NORM_BITS, RotatedCodec, check_input, normalize


@lru_cache(maxsize=64)
def sketch_matrix(rows: int, dim: int, seed: int) -> mx.array:
    rng = np.random.default_rng([seed, dim, rows, 0x514A4C])
    return mx.array(rng.standard_normal((rows, dim)).astype(np.float32))


def sign_bits(v: mx.array, sketch: mx.array) -> mx.array:
    """1 where ⟨s_i, v⟩ >= 0, as uint32 codes (..., m)."""
    return (v @ sketch.T >= 0).astype(mx.uint32)


def sketch_back(bits: mx.array, sketch: mx.array) -> mx.array:
    """Sᵀ z with z = ±1 from the stored bits (..., m) -> (..., d)."""
    return (bits.astype(mx.float32) * 2 - 1) @ sketch


class QJLCodec(RotatedCodec):
    METHOD = "qjl"
    BITS = range(1, 9)

    def __init__(self, bits: int, dim: int, seed: int):
        super().__init__(bits, dim, seed)
        self.rows = bits * dim
        self.sketch = sketch_matrix(self.rows, dim, seed)
        self.gain = math.sqrt(math.pi / 2) / self.rows
        self.bits_per_vector = 32 * words_per_vector(self.rows, 1) + NORM_BITS

    def encode(self, x: mx.array) -> dict:
        check_input(x, self.dim)
        unit, norm = normalize(x)
        z = sign_bits(self.rotation.forward(unit), self.sketch)
        return {"signs": pack(z, 1), "norm": norm}

    def decode_rotated(self, packed: dict) -> mx.array:
        z = unpack(packed["signs"], 1, self.rows)
        scale = packed["norm"].astype(mx.float32)[..., None] * self.gain
        return sketch_back(z, self.sketch) * scale
