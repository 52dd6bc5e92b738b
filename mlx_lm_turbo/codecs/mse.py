"""TurboQuant-MSE (arXiv 2504.19874): Lloyd-Max codes of each rotated coordinate.

x̂ = ρ Πᵀ c[idx], with c the optimal b-bit quantizer of one coordinate of a uniform
unit vector in R^d. Unit-vector distortion at d=128: 0.361, 0.116, 0.034, 0.0093 for
b = 1..4.

The stored scale ρ follows one rule, by bit width:

- 2 bits and more: norm-corrected, ρ = ‖x‖ / ‖c[idx]‖, so x̂ has exactly x's norm. The
  plain centroid reconstruction is shorter than x by a factor √(1 - D) on average, which
  shrinks every attention logit and output by the same factor (a temperature error, not
  noise); the correction costs no bits and raises the MSE by only ~D²/4, so attention
  through the corrected codes is the more accurate.
- 1 bit: plain Lloyd-Max, ρ = ‖x‖. There D is large (0.36), the correction would add
  ~10% to the MSE, and the extra noise costs attention more than the shrinkage does: the
  plain reconstruction is the better estimator in both vector MSE and attention output.

Decoding is ρ·c[idx] either way, so codes written under either rule decode alike.
"""

import mlx.core as mx

from ..codebooks import lloyd_max, quantize
from ..packing import pack, unpack, words_per_vector
from .common import NORM_BITS, RotatedCodec, check_input, corrected_norm, normalize

PLAIN_SCALE_BITS = 1   # the width stored with the plain Lloyd-Max scale ρ = ‖x‖


class MSECodec(RotatedCodec):
    METHOD = "turboquant_mse"
    BITS = range(1, 9)

    def __init__(self, bits: int, dim: int, seed: int):
        super().__init__(bits, dim, seed)
        c, b, self.unit_mse = lloyd_max("sphere", bits, dim)
        self.centroids, self.boundaries = mx.array(c), mx.array(b)
        self.bits_per_vector = 32 * words_per_vector(dim, bits) + NORM_BITS

    def encode(self, x: mx.array) -> dict:
        check_input(x, self.dim)
        unit, norm = normalize(x)
        idx = quantize(self.rotation.forward(unit), self.boundaries, self.bits)
        # (the module docstring's rule: plain at 1 bit, norm-corrected above)
        rho = norm if self.bits == PLAIN_SCALE_BITS else corrected_norm(norm, self.centroids[idx])
        return {"codes": pack(idx, self.bits), "norm": rho}

    def decode_rotated(self, packed: dict) -> mx.array:
        idx = unpack(packed["codes"], self.bits, self.dim)
        return self.centroids[idx] * packed["norm"].astype(mx.float32)[..., None]
