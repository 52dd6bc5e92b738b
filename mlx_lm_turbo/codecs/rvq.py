"""TurboQuant-RVQ: two scalar stages on the rotated coordinate, b + b bits.

t = √d·y is close to N(0, 1). Stage 1 codes t with the b-bit Gaussian Lloyd-Max
codebook; stage 2 codes the residual with the b-bit Laplacian (heavier tails)
Lloyd-Max codebook scaled to the residual's standard deviation, which is known in
closed form from stage 1 (its distortion), so no per-vector scale is stored. The norm is
stored corrected as in the MSE codec (x̂ keeps x's norm).
"""

import math

import mlx.core as mx

from ..codebooks import lloyd_max, quantize
from ..packing import pack, unpack, words_per_vector
from .common import NORM_BITS, RotatedCodec, check_input, corrected_norm, normalize


class RVQCodec(RotatedCodec):
    METHOD = "turboquant_rvq"
    BITS = range(1, 5)  # per stage: 2..8 bits per coordinate in all

    def __init__(self, bits: int, dim: int, seed: int):
        super().__init__(bits, dim, seed)
        c1, b1, mse1 = lloyd_max("gaussian", bits)
        c2, b2, _ = lloyd_max("laplace", bits)
        self.residual_scale = math.sqrt(mse1)
        self.scale = 1 / math.sqrt(dim)
        self.centroids1, self.boundaries1 = mx.array(c1), mx.array(b1)
        self.centroids2 = mx.array(c2) * self.residual_scale
        self.boundaries2 = mx.array(b2) * self.residual_scale
        self.bits_per_vector = 2 * 32 * words_per_vector(dim, bits) + NORM_BITS

    def encode(self, x: mx.array) -> dict:
        check_input(x, self.dim)
        unit, norm = normalize(x)
        t = self.rotation.forward(unit) / self.scale
        idx1 = quantize(t, self.boundaries1, self.bits)
        idx2 = quantize(t - self.centroids1[idx1], self.boundaries2, self.bits)
        recon = (self.centroids1[idx1] + self.centroids2[idx2]) * self.scale
        return {"codes1": pack(idx1, self.bits), "codes2": pack(idx2, self.bits),
                "norm": corrected_norm(norm, recon)}

    def decode_rotated(self, packed: dict) -> mx.array:
        idx1 = unpack(packed["codes1"], self.bits, self.dim)
        idx2 = unpack(packed["codes2"], self.bits, self.dim)
        t = self.centroids1[idx1] + self.centroids2[idx2]
        return t * (packed["norm"].astype(mx.float32)[..., None] * self.scale)
