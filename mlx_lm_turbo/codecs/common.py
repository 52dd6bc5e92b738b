"""Pieces every codec shares: input checks, the norm + rotation front end."""

import mlx.core as mx

from ..rotation import Rotation

NORM_DTYPE = mx.float16
NORM_BITS = 16


def check_input(x: mx.array, dim: int) -> None:
    if not isinstance(x, mx.array):
        raise ValueError(f"expected an mx.array, got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"expected a float array (fp16, bf16 or fp32), got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"last dimension must be dim={dim}, got shape {tuple(x.shape)}")


def normalize(x: mx.array) -> tuple[mx.array, mx.array]:
    """(unit vectors in fp32, norms rounded to the stored fp16)."""
    x = x.astype(mx.float32)
    norm = mx.sqrt((x * x).sum(axis=-1, keepdims=True))
    unit = x / mx.maximum(norm, 1e-30)
    return unit, norm[..., 0].astype(NORM_DTYPE)


def corrected_norm(norm: mx.array, recon_unit: mx.array) -> mx.array:
    """‖x‖ / ‖x̂_unit‖ in the stored fp16, so that ρ·x̂_unit has x's norm."""
    recon_norm = mx.sqrt((recon_unit * recon_unit).sum(axis=-1))
    return (norm.astype(mx.float32) / mx.maximum(recon_norm, 1e-30)).astype(NORM_DTYPE)


class RotatedCodec:
    """Shared front end: ρ = ‖x‖ stored in fp16, y = Π x/ρ coded by the subclass."""

    METHOD = ""
    BITS = range(1, 9)

    def __init__(self, bits: int, dim: int, seed: int):
        self.bits = bits
        self.dim = dim
        self.seed = seed
        self.rotation = Rotation(dim, seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, dim={self.dim}, seed={self.seed})"

    @property
    def bits_per_element(self) -> float:
        """All stored bits per element (codes with word padding, norms, scales)."""
        return self.bits_per_vector / self.dim

    def rotate(self, x: mx.array) -> mx.array:
        return self.rotation.forward(x.astype(mx.float32))

    def unrotate(self, y: mx.array) -> mx.array:
        return self.rotation.inverse(y)

    def decode(self, packed: dict, dtype=mx.float32) -> mx.array:
        return self.unrotate(self.decode_rotated(packed)).astype(dtype)

    def score(self, q: mx.array, packed: dict) -> mx.array:
        """⟨q, x̂⟩ for each vector (q broadcasts against the encoded vectors)."""
        return (self.rotate(q) * self.decode_rotated(packed)).sum(axis=-1)
