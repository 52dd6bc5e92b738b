"""``make_prompt_cache``: mlx-lm's prompt cache with its layers compressed (plain layers by
``TurboKVCache``, sliding-window layers by ``TurboRotatingKVCache``)."""

from typing import Any, Optional

from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .cache import TurboKVCache
from .config import TurboConfig
from .rotating_cache import TurboRotatingKVCache


def make_prompt_cache(model: Any, config: TurboConfig, max_kv_size: Optional[int] = None,
                      make_base=None) -> list:
    """mlx-lm's cache for ``model`` with every ``KVCache`` layer replaced by a
    TurboKVCache and every ``RotatingKVCache`` layer by a TurboRotatingKVCache (or left
    fp16 until ``config.quantized_kv_start`` tokens)."""
    make_base = make_base or mlx_cache.make_prompt_cache
    caches = make_base(model, max_kv_size)
    if config.quantized_kv_start:
        return caches
    for i, c in enumerate(caches):
        if type(c) is KVCache:
            caches[i] = TurboKVCache.from_config(config, i)
        elif type(c) is RotatingKVCache:
            caches[i] = TurboRotatingKVCache.from_config(config, i, c.max_size, c.keep)
    return caches
