"""Turbo caches in mlx-lm's distributed mode (``mlx.launch``, ``sharded_load``).

mlx-lm shards a model two ways (``mlx_lm.utils.sharded_load``, used by ``mlx_lm.server``,
``mlx_lm.chat`` and ``mlx_lm.benchmark``; ``--pipeline`` picks the second):

- tensor sharding (``model.shard(group)``): every rank holds every layer with
  ``n_kv_heads / N`` KV heads. A rank's caches are built from its model, so they hold its
  heads only; the codecs depend on (seed, layer, K/V) and act per head vector, so a head is
  coded exactly as in one process. Nothing to do here.
- pipeline sharding (``PipelineMixin.pipeline(group)``): rank r holds a slice of the layers
  and ``model.layers`` lists only those, so mlx-lm's cache list is numbered locally from 0.
  Seeds and RateQuant bits are per *global* layer: ``use_global_layers`` renumbers.
  Pipeline models also write ``cache[-1].keys = mx.depends(cache[-1].keys, h)``, which
  needs an array; our caches hold a dict of packed arrays, so the model's module gets an
  ``mx`` whose ``depends`` maps over a dict.

RateQuant over ranks is ratequant's (``resolve_on_ranks``); ``check_same_config`` verifies
that all ranks hold the same method, bits and seed.

Prompt-cache files are per rank: a rank saves and loads its own heads (tensor) or layers
(pipeline); ``rank_file`` names them. The stored ``layer`` is global, so seeds survive.
"""

import sys
import types
import zlib
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .cache import TurboKVCache
from .config import TurboConfig
from .rotating_cache import TurboRotatingKVCache, compress_layer


def world() -> Optional[mx.distributed.Group]:
    """The world group when this process is one of several ranks, else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def pipeline_stage(model) -> Optional[object]:
    """The model's ``PipelineMixin`` module when it is split over more than one rank."""
    from mlx_lm.models.pipeline import PipelineMixin

    for module in model.modules():
        if isinstance(module, PipelineMixin):
            return module if module.pipeline_size > 1 else None
    return None


def layer_offset(model) -> int:
    """Global index of this rank's first cache layer (0 unless pipelined)."""
    stage = pipeline_stage(model)
    return 0 if stage is None else stage.start_idx


def _depends(inputs, dependencies):
    if isinstance(inputs, dict):  # a TurboKVCache's packed keys
        names = list(inputs)
        return dict(zip(names, mx.depends([inputs[n] for n in names], dependencies)))
    return mx.depends(inputs, dependencies)


def _allow_dict_depends(stage) -> None:
    """Give the module that runs the pipeline forward an ``mx`` whose ``depends`` also
    takes a dict (the module's code is unchanged; ``mx.depends`` itself is untouched)."""
    module = sys.modules[type(stage).__call__.__module__]
    if getattr(module.mx, "_turbo", False):
        return
    proxy = types.ModuleType(mx.__name__)
    proxy.__dict__.update(vars(mx))
    proxy.depends = _depends
    proxy._turbo = True
    module.mx = proxy


def use_global_layers(model, caches: list, config: TurboConfig) -> None:
    """Renumber a pipeline rank's caches by global layer (in place)."""
    stage = pipeline_stage(model)
    if stage is None:
        return
    _allow_dict_depends(stage)
    for i, c in enumerate(caches):
        layer = stage.start_idx + i
        if isinstance(c, TurboKVCache):  # still empty: rebuilt for its global layer
            ring = (c.max_size, c.keep) if isinstance(c, TurboRotatingKVCache) else ()
            caches[i] = type(c).from_config(config, layer, *ring)
        elif type(c) in (KVCache, RotatingKVCache):
            # compressed later (--quantized-kv-start): remember
            c.turbo_layer = layer


def maybe_compress(caches: list, config: TurboConfig, quantized_kv_start: int) -> None:
    """Compress fp16 layers (plain and sliding-window) in place once their offset reaches
    ``quantized_kv_start``, keeping a pipeline rank's global layer numbers."""
    for i, c in enumerate(caches):
        if type(c) in (KVCache, RotatingKVCache) and c.offset >= quantized_kv_start:
            caches[i] = compress_layer(c, config, getattr(c, "turbo_layer", i))


def _fingerprint(config: TurboConfig) -> list:
    text = repr((config.key_method, config.key_bits, config.value_method, config.value_bits,
                 config.seed, config.center_keys, config.layer_bits,
                 getattr(config, "fp16_window", 0), getattr(config, "scale_keys", False)))
    crc = zlib.crc32(text.encode())
    return [config.seed & 0x7FFFFFFF, crc & 0xFFFF, crc >> 16]


def check_same_config(config: TurboConfig, group: mx.distributed.Group) -> None:
    """Raise ValueError unless every rank holds the same cache settings (seed included)."""
    mine = mx.array(_fingerprint(config), dtype=mx.int32)
    lo = mx.distributed.all_min(mine, group=group)
    hi = mx.distributed.all_max(mine, group=group)
    if not bool(mx.all(lo == hi).item()):
        raise ValueError("the ranks were started with different --kv-* / RateQuant settings "
                         "(method, bits, seed or allocation differ); give every rank the "
                         "same flags")


def rank_file(path: str, group: Optional[mx.distributed.Group] = None) -> str:
    """``doc.safetensors`` -> ``doc.rank1-of-2.safetensors`` (unchanged in one process):
    each rank saves and loads the caches of its own heads or layers."""
    group = group if group is not None else world()
    if group is None:
        return path
    stem, dot, ext = path.rpartition(".")
    tag = f"rank{group.rank()}-of-{group.size()}"
    return f"{stem}.{tag}.{ext}" if dot else f"{path}.{tag}"
