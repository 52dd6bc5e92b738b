"""KV-vector codecs over packed codes.

    from mlx_lm_turbo import codecs
    c = codecs.make("turboquant_mse", bits=3, dim=128, seed=0)
    p = c.encode(x)          # dict of packed uint32 codes + per-vector fp16 scalars
    x_hat = c.decode(p)      # (..., dim)

Every codec also offers what attention needs: ``rotate(q)`` and ``decode_rotated(p)``
(reconstruction in the rotated domain, so that ⟨q, x̂⟩ = ⟨rotate(q), decode_rotated(p)⟩
and no inverse rotation per key is needed), ``unrotate`` for outputs accumulated in that
domain, and ``score(q, p)`` = ⟨q, x̂⟩ (the unbiased estimate for prod and qjl).
"""

from .mse import MSECodec
from .polar import PolarCodec
from .prod import ProdCodec
from .qjl import QJLCodec
from .rvq import RVQCodec

_CODECS = {
    "turboquant_mse": MSECodec,
    "turboquant_prod": ProdCodec,
    "turboquant_rvq": RVQCodec,
    "polar": PolarCodec,
    "qjl": QJLCodec,
}
METHODS = tuple(_CODECS)
ALIASES = {"mse": "turboquant_mse", "prod": "turboquant_prod", "rvq": "turboquant_rvq",
           "polarquant": "polar"}
# Methods that reconstruct vectors well enough to serve as values; prod and qjl are
# inner-product estimators for keys.
VALUE_METHODS = ("turboquant_mse", "turboquant_rvq", "polar")


def canonical_name(method: str) -> str:
    name = ALIASES.get(method, method)
    if name not in _CODECS:
        raise ValueError(
            f"unknown KV method {method!r}; valid methods: {', '.join(METHODS)} "
            f"(short names: {', '.join(ALIASES)})"
        )
    return name


def bits_range(method: str) -> range:
    return _CODECS[canonical_name(method)].BITS


def make(method: str, bits: int, dim: int, seed: int = 0, keys: bool = False):
    """Build the codec ``method`` at ``bits`` for head vectors of size ``dim``; ``keys``:
    it codes keys (turboquant_mse picks its stored scale by role: see codecs/mse.py)."""
    cls = _CODECS[canonical_name(method)]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in cls.BITS:
        raise ValueError(
            f"bits={bits!r} is out of range for {cls.METHOD}: "
            f"allowed {cls.BITS.start}..{cls.BITS.stop - 1}"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim!r}")
    role = {"keys": keys} if cls is MSECodec else {}
    return cls(bits=bits, dim=dim, seed=int(seed), **role)


def layer_seed(seed: int, layer: int, is_value: bool) -> int:
    """Per-layer, per-K/V seed: files store the global seed, never matrices."""
    return (seed * 1_000_003 + 2 * layer + int(is_value)) & 0x7FFFFFFF


def packed_nbytes(packed: dict) -> int:
    """Bytes held by a packed dict."""
    return sum(a.nbytes for a in packed.values())
