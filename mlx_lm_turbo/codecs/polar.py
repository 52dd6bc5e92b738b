"""PolarQuant (arXiv 2502.02617): recursive polar coordinates of the rotated vector.

Coordinates pair up into (radius, angle); the radii pair up again, for 4 levels, so
each block of 16 coordinates keeps one radius (fp16) and 8 + 4 + 2 + 1 angles. After
the rotation the level-1 angles are uniform on [0, 2π) and a level-ℓ angle is
atan(|b|/|a|) of two 2^(ℓ-1)-dimensional Gaussian blocks, with density ∝ sin(2ψ)^(2^(ℓ-1)-1)
on [0, π/2]; each level gets its own Lloyd-Max codebook. ``bits`` is the level-1 width;
higher levels take ceil(bits/2): the paper's 4, 2, 2, 2 -> 3.875 bits/element.
The block radii carry the vector's scale, so no separate norm is stored.
"""

import math

import mlx.core as mx

from ..codebooks import lloyd_max, quantize
from ..packing import pack, unpack, words_per_vector
from .common import NORM_BITS, NORM_DTYPE, RotatedCodec, check_input

MAX_LEVELS = 4


class PolarCodec(RotatedCodec):
    METHOD = "polar"
    BITS = range(1, 9)

    def __init__(self, bits: int, dim: int, seed: int):
        super().__init__(bits, dim, seed)
        levels = 1
        while levels < MAX_LEVELS and dim % (2 ** (levels + 1)) == 0:
            levels += 1
        self.levels = levels
        self.block = 2**levels
        self.level_bits = [bits] + [max(1, math.ceil(bits / 2))] * (levels - 1)
        self.codebooks = []
        for level, b in enumerate(self.level_bits, start=1):
            if level == 1:
                c, bd, _ = lloyd_max("uniform_angle", b)
            else:
                c, bd, _ = lloyd_max("polar_angle", b, 2 ** (level - 1))
            self.codebooks.append((mx.array(c), mx.array(bd)))
        self.bits_per_vector = NORM_BITS * (dim // self.block) + 32 * sum(
            words_per_vector(dim >> level, b) for level, b in enumerate(self.level_bits, 1)
        )

    def encode(self, x: mx.array) -> dict:
        check_input(x, self.dim)
        r = self.rotation.forward(x.astype(mx.float32))
        packed = {}
        for level, b in enumerate(self.level_bits, start=1):
            pairs = r.reshape(*r.shape[:-1], -1, 2)
            a, c = pairs[..., 0], pairs[..., 1]
            if level == 1:
                angle = mx.arctan2(c, a)
                angle = mx.where(angle < 0, angle + 2 * math.pi, angle)
            else:
                angle = mx.arctan2(c, a)  # radii are >= 0: angle in [0, π/2]
            packed[f"angles{level}"] = pack(quantize(angle, self.codebooks[level - 1][1], b), b)
            r = mx.sqrt(a * a + c * c)
        packed["radius"] = r.astype(NORM_DTYPE)
        return packed

    def decode_rotated(self, packed: dict) -> mx.array:
        r = packed["radius"].astype(mx.float32)
        for level in range(self.levels, 0, -1):
            b = self.level_bits[level - 1]
            n = self.dim >> level
            angle = self.codebooks[level - 1][0][unpack(packed[f"angles{level}"], b, n)]
            r = mx.stack([r * mx.cos(angle), r * mx.sin(angle)], axis=-1)
            r = r.reshape(*r.shape[:-2], -1)
        return r
