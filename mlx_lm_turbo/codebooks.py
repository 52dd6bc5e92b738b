"""Lloyd-Max scalar codebooks for the densities the codecs meet.

Each codebook is computed once with numpy by iterating the two optimality
conditions (every centroid is the mean of its cell, every boundary is the midpoint of
its neighbours) on a fine grid of the exact density, and then cached.
"""

from functools import lru_cache
from math import lgamma, pi

import mlx.core as mx
import numpy as np

_GRID = 40001


def _density(name: str, param: int):
    """(grid, pdf on grid) for a named density."""
    if name == "sphere":
        # One coordinate of a uniform unit vector in R^param: (1 - y^2)^((d-3)/2) on [-1, 1].
        d = param
        # Mass beyond 12 standard deviations (1/sqrt(d) each) is negligible.
        edge = min(1.0, 12 / np.sqrt(d))
        x = np.linspace(-edge, edge, _GRID)
        with np.errstate(divide="ignore"):
            logp = (d - 3) / 2 * np.log(np.clip(1 - x * x, 1e-300, None))
        logp += lgamma(d / 2) - lgamma((d - 1) / 2) - 0.5 * np.log(pi)
        return x, np.exp(logp)
    if name == "gaussian":
        x = np.linspace(-9, 9, _GRID)
        return x, np.exp(-0.5 * x * x) / np.sqrt(2 * pi)
    if name == "laplace":
        # Unit variance: scale 1/sqrt(2).
        b = 1 / np.sqrt(2)
        x = np.linspace(-16, 16, _GRID)
        return x, np.exp(-np.abs(x) / b) / (2 * b)
    if name == "uniform_angle":
        x = np.linspace(0, 2 * pi, _GRID)
        return x, np.full_like(x, 1 / (2 * pi))
    if name == "polar_angle":
        # Angle atan(|b|/|a|) of two independent chi vectors with `param` dims each:
        # density ∝ sin(2ψ)^(param-1) on [0, π/2].
        x = np.linspace(0, pi / 2, _GRID)
        p = np.sin(2 * x) ** (param - 1)
        return x, p / np.trapezoid(p, x)
    raise ValueError(f"unknown density {name!r}")


@lru_cache(maxsize=None)
def lloyd_max(name: str, bits: int, param: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Centroids (sorted, 2**bits), inner boundaries (2**bits - 1) and the mean squared
    error of the optimal scalar quantizer for density ``name``."""
    x, p = _density(name, param)
    w = p / p.sum()
    n = 2**bits
    # Start from the high-resolution optimum (point density ∝ p^(1/3)): Lloyd's
    # iteration alone converges very slowly with many levels.
    comp = np.cumsum(np.cbrt(w))
    c = np.interp((np.arange(n) + 0.5) / n, comp / comp[-1], x)
    for _ in range(2000):
        b = (c[1:] + c[:-1]) / 2
        cell = np.searchsorted(b, x)
        mass = np.bincount(cell, w, n)
        mean = np.bincount(cell, w * x, n) / np.maximum(mass, 1e-300)
        new = np.where(mass > 0, mean, c)
        done = np.max(np.abs(new - c)) < 1e-10 * (x[-1] - x[0])
        c = new
        if done:
            break
    b = (c[1:] + c[:-1]) / 2
    mse = float(np.sum(w * (x - c[np.searchsorted(b, x)]) ** 2))
    return c.astype(np.float32), b.astype(np.float32), mse


def quantize(x: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """Index of the cell of each element: the count of boundaries below it, found by a
    ``bits``-step binary search (memory stays O(x.size) even at 8 bits)."""
    idx = mx.zeros(x.shape, dtype=mx.uint32)
    for step in range(bits):
        half = 1 << (bits - 1 - step)
        probe = idx + half
        idx = mx.where(x > boundaries[probe - 1], probe, idx)
    return idx
