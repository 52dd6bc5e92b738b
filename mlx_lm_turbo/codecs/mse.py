"""TurboQuant-MSE (arXiv 2504.19874): Lloyd-Max codes of each rotated coordinate.

x̂ = ρ Πᵀ c[idx], with c the optimal b-bit quantizer of one coordinate of a uniform
unit vector in R^d. Unit-vector distortion at d=128: 0.361, 0.116, 0.034, 0.0093 for
b = 1..4.

The stored scale ρ follows one rule: plain Lloyd-Max, ρ = ‖x‖, for keys at 1 bit;
norm-corrected, ρ = ‖x‖ / ‖c[idx]‖ (x̂ has exactly x's norm), everywhere else.

The plain centroid reconstruction is shorter than x by a factor √(1 - D) on average. For
values that is a bias of every attention output: the output averages many values, which
averages their coding noise away but not a common shrinkage, so the corrected scale is
the better estimator of values at every width. For keys the shrinkage only lowers the
softmax temperature; the correction removes it at the price of ~D²/4 more MSE, which wins
at 2 bits and more, but at 1 bit (D = 0.36) it adds ~10% to the MSE and attention over
the corrected keys is the less accurate.

Decoding is ρ·c[idx] under either rule, so codes written under either decode alike.
"""

import mlx.core as mx

from ..codebooks import lloyd_max, quantize
from ..packing import pack, unpack, words_per_vector
from .common import NORM_BITS, RotatedCodec, check_input, corrected_norm, normalize

PLAIN_SCALE_KEY_BITS = 1   # keys at this width store the plain Lloyd-Max scale ρ = ‖x‖


class MSECodec(RotatedCodec):
    METHOD = "turboquant_mse"
    BITS = range(1, 9)

    def __init__(self, bits: int, dim: int, seed: int, keys: bool = False):
        super().__init__(bits, dim, seed)
        # (the module docstring's rule)
        self.plain_scale = keys and bits == PLAIN_SCALE_KEY_BITS
        c, b, self.unit_mse = lloyd_max("sphere", bits, dim)
        self.centroids, self.boundaries = mx.array(c), mx.array(b)
        self.bits_per_vector = 32 * words_per_vector(dim, bits) + NORM_BITS

    def encode(self, x: mx.array) -> dict:
        check_input(x, self.dim)
        unit, norm = normalize(x)
        idx = quantize(self.rotation.forward(unit), self.boundaries, self.bits)
        rho = norm if self.plain_scale else corrected_norm(norm, self.centroids[idx])
        return {"codes": pack(idx, self.bits), "norm": rho}

    def decode_rotated(self, packed: dict) -> mx.array:
        idx = unpack(packed["codes"], self.bits, self.dim)
        return self.centroids[idx] * packed["norm"].astype(mx.float32)[..., None]
