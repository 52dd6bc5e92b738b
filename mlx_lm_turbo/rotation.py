"""Seeded random rotations of head vectors.

After a random rotation every coordinate of a unit vector follows the same known
distribution, which is what lets one fixed codebook serve all coordinates.
Power-of-two head dims use a randomized Hadamard transform (random signs, then
``mx.hadamard_transform``: O(d log d), nothing stored but the seed); other head dims
(80, 96, 112, 160, 192, ...) use a seeded dense orthogonal matrix.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@lru_cache(maxsize=256)
def _rotation_arrays(dim: int, seed: int):
    rng = np.random.default_rng([seed, dim, 0x52])
    if _is_power_of_two(dim):
        signs = rng.integers(0, 2, size=dim).astype(np.float32) * 2 - 1
        return mx.array(signs), None
    # QR of a Gaussian matrix, sign-fixed so the result is Haar distributed.
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))[None, :]
    return None, mx.array(q.astype(np.float32))


class Rotation:
    """An orthogonal map Π of R^dim chosen by ``seed``: ``forward(x) = Π x``."""

    def __init__(self, dim: int, seed: int):
        self.dim = dim
        self.seed = seed
        self.signs, self._matrix = _rotation_arrays(dim, seed)

    def forward(self, x: mx.array) -> mx.array:
        if self.signs is not None:
            return mx.hadamard_transform(x * self.signs)
        return x @ self._matrix.T

    def inverse(self, y: mx.array) -> mx.array:
        if self.signs is not None:
            # The Sylvester Hadamard matrix is symmetric and orthonormal.
            return mx.hadamard_transform(y) * self.signs
        return y @ self._matrix

    def matrix(self) -> mx.array:
        """Dense Π (dim x dim), for kernels and tests."""
        if self._matrix is not None:
            return self._matrix
        return self.forward(mx.eye(self.dim)).T
