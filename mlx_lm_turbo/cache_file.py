"""Prompt-cache files: read one with one-line errors, and check that it fits a model.

``load_cache_file`` reads a safetensors prompt-cache file written by ``mlx_lm.cache_prompt``
(``KVCache``/``QuantizedKVCache`` layers) or by mlx_lm_turbo (``TurboKVCache``); a missing,
empty, truncated, random or directory path, or a malformed layer, raises ``CacheFileError``
with a one-line reason. ``check_fits`` compares its layers with a model's config (layer
count, KV heads, head dim). ``convert-cache`` and the patched ``mlx_lm.generate
--prompt-cache-file`` both use them, so both refuse the same files with the same words.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

FORMAT = "mlx_lm_turbo"
META_PREFIX = "mlx_lm_turbo_"  # our keys in the file's user metadata (no dots: mlx-lm
# unflattens metadata keys on ".")
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                      "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
                      "U64": 8, "I64": 8, "F64": 8, "C64": 8}
MAX_HEADER = 100 * 2**20

class CacheFileError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ------------------------------------------------------------------ reading
def check_safetensors(path: Path) -> dict:
    """Validate the safetensors framing of ``path`` without loading tensors: the header
    parses and every tensor lies inside the file, which ends where the last one ends.
    Returns the header's ``__metadata__`` (a dict of strings)."""
    if not path.exists():
        raise CacheFileError(f"{path}: no such file")
    if not path.is_file():
        raise CacheFileError(f"{path}: not a regular file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CacheFileError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CacheFileError(f"{path}: truncated or not a safetensors file "
                                     f"(header of {n} bytes, file of {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CacheFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            if not 0 <= start <= stop or stop - start != count * SAFETENSORS_DTYPES[info["dtype"]]:
                raise ValueError(f"tensor {name!r} has inconsistent offsets")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CacheFileError(f"{path}: truncated or not a safetensors file ({e})") from None
    if 8 + n + end != size:
        raise CacheFileError(f"{path}: truncated or corrupt safetensors file (tensor data "
                             f"ends at byte {8 + n + end}, file has {size} bytes)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CacheFileError(f"{path}: not a prompt-cache file (bad metadata)")
    return meta


@dataclass
class CacheFile:
    path: Path
    layers: list  # cache objects (KVCache, QuantizedKVCache, TurboKVCache, others as loaded)
    classes: list  # class names as stored
    metadata: dict  # the user metadata ("model", "tokenizer_config", ours)
    size: int = 0
    layer_bytes: list = field(default_factory=list)  # bytes of each layer's arrays in the file


def _not_a_cache(path: Path, why: str) -> CacheFileError:
    return CacheFileError(f"{path}: not an mlx-lm prompt-cache file ({why})")


def _check_version(path: Path, where: str, version: Any) -> None:
    from . import __version__

    def parse(v: str) -> tuple:
        return tuple(int(p) for p in str(v).split(".")[:3])

    try:
        file_v = parse(version)
    except ValueError:
        raise CacheFileError(f"{path}: {where}: bad mlx_lm_turbo version {version!r}") from None
    if file_v[:1] != parse(__version__)[:1] or file_v > parse(__version__):
        raise CacheFileError(
            f"{path}: written by mlx_lm_turbo {version}, which this mlx_lm_turbo "
            f"{__version__} cannot read; upgrade mlx-lm-turbo")


def _turbo_from_state(path: Path, layer: int, state: Any, cls: str = "TurboKVCache"):
    from . import codecs
    from .cache import TurboKVCache
    from .rotating_cache import TurboRotatingKVCache

    if not isinstance(state, list) or len(state) not in (5, 7) or not isinstance(state[3], str):
        raise _not_a_cache(path, f"layer {layer}: malformed TurboKVCache state")
    try:
        meta = json.loads(state[3])
        if meta.get("format") != FORMAT:
            raise CacheFileError(f"{path}: layer {layer}: format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r}")
        _check_version(path, f"layer {layer}", meta.get("version"))
        for m, b in ((meta["key_method"], meta["key_bits"]),
                     (meta["value_method"], meta["value_bits"])):
            if b not in codecs.bits_range(m):
                raise ValueError(f"bits {b} out of range for {m}")
        klass = TurboRotatingKVCache if cls == "TurboRotatingKVCache" else TurboKVCache
        c = klass.from_state(tuple(state))
    except CacheFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise _not_a_cache(path, f"layer {layer}: bad TurboKVCache state: {e}") from None
    if c.keys is not None:
        n = next(iter(c.keys.values())).shape
        if n[2] < c.size():
            raise _not_a_cache(path, f"layer {layer}: {c.size()} tokens > {n[2]} stored")
    return c


def load_cache_file(path: str | os.PathLike) -> CacheFile:
    """Read a prompt-cache file; raise CacheFileError with a one-line reason if it is
    missing, truncated, not a prompt cache, or from an mlx_lm_turbo it cannot read."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as mlx_cache

    path = Path(path)
    check_safetensors(path)
    try:
        arrays, raw_meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise CacheFileError(f"{path}: cannot load: {str(e).splitlines()[0]}") from None
    try:
        tree = tree_unflatten(list(raw_meta.items())) if raw_meta else None
        if not (isinstance(tree, list) and len(tree) == 3 and isinstance(tree[0], dict)
                and isinstance(tree[1], list) and isinstance(tree[2], list)):
            raise _not_a_cache(path, "no cache metadata")
        metadata, classes, scalars = tree
        if not classes or not all(isinstance(c, str) for c in classes):
            raise _not_a_cache(path, "no layer classes")
        for entry in scalars[1:]:
            pos, kind = entry
            a = arrays[pos]
            if kind == "scalar":
                arrays[pos] = a.item()
            elif kind == "string":
                arrays[pos] = "".join(chr(i) for i in a.tolist())
            elif kind == "none":
                arrays[pos] = None
            else:
                raise ValueError(f"unknown scalar type {kind!r}")
        states = tree_unflatten(list(arrays.items())) if arrays else []
    except CacheFileError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise _not_a_cache(path, f"bad cache metadata: {e}") from None
    if not isinstance(states, list) or len(states) != len(classes):
        raise _not_a_cache(path, f"{len(classes)} layer classes but "
                                 f"{len(states) if isinstance(states, list) else 0} layer states")
    if (META_PREFIX + "format") in metadata:
        if metadata[META_PREFIX + "format"] != FORMAT:
            raise CacheFileError(f"{path}: unknown format {metadata[META_PREFIX + 'format']!r}")
        _check_version(path, "file", metadata.get(META_PREFIX + "version"))

    layers, layer_bytes = [], []
    for i, (cls, state) in enumerate(zip(classes, states)):
        if cls in ("TurboKVCache", "TurboRotatingKVCache"):
            c = _turbo_from_state(path, i, state, cls)
        else:
            klass = getattr(mlx_cache, cls, None)
            if not (isinstance(klass, type) and issubclass(klass, mlx_cache._BaseCache)):
                raise _not_a_cache(path, f"layer {i}: unknown cache class {cls!r}")
            try:
                c = klass.from_state(tuple(state) if isinstance(state, list) else state)
            except (ValueError, TypeError) as e:
                raise _not_a_cache(path, f"layer {i}: bad {cls} state: {e}") from None
            if cls in ("KVCache", "QuantizedKVCache"):
                _check_plain_layer(path, i, c)
        layers.append(c)
        layer_bytes.append(_state_nbytes(state))
    return CacheFile(path, layers, list(classes), dict(metadata), path.stat().st_size,
                     layer_bytes)


def _check_plain_layer(path: Path, i: int, c: Any) -> None:
    import mlx.core as mx

    if not isinstance(c.offset, int) or c.offset < 0:
        raise _not_a_cache(path, f"layer {i}: bad offset {c.offset!r}")
    if c.keys is None:
        return
    keys = c.keys[0] if isinstance(c.keys, (list, tuple)) else c.keys
    if not isinstance(keys, mx.array) or keys.ndim != 4 or keys.shape[2] < c.offset:
        raise _not_a_cache(path, f"layer {i}: keys do not hold {c.offset} tokens")


def _state_nbytes(state: Any) -> int:
    import mlx.core as mx

    if isinstance(state, mx.array):
        return state.nbytes
    if isinstance(state, (list, tuple)):
        return sum(_state_nbytes(s) for s in state)
    if isinstance(state, dict):
        return sum(_state_nbytes(s) for s in state.values())
    return 0


def layer_shape(c: Any) -> Optional[tuple[int, int, int, int, int]]:
    """(batch, kv_heads, tokens, key_dim, value_dim) of a KV layer; None if empty or not
    a KV layer we know."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    from .cache import TurboKVCache

    if isinstance(c, TurboKVCache):
        if c.keys is None:
            return None
        b, h = next(iter(c.keys.values())).shape[:2]
        return b, h, c.size(), c.key_codec.dim, c.value_codec.dim
    if type(c) in (KVCache, RotatingKVCache) and c.keys is not None:
        return (*c.keys.shape[:2], c.size(), c.keys.shape[-1], c.values.shape[-1])
    if type(c) is QuantizedKVCache and c.keys is not None:
        return (*c.keys[0].shape[:2], c.offset, c.keys[0].shape[-1] * 32 // c.bits,
                c.values[0].shape[-1] * 32 // c.bits)
    return None


# ------------------------------------------------------------------ checks
def model_dims(model_path: str) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) from a model folder's config.json."""
    cfg_path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CacheFileError(f"--model {model_path}: no config.json there") from None
    except (OSError, ValueError) as e:
        raise CacheFileError(f"--model {model_path}: cannot read config.json: {e}") from None
    return config_dims(cfg, f"--model {model_path}: config.json")


def config_dims(cfg: Any, where: str = "the model's config") -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) from a model config dict (as in config.json)."""
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CacheFileError(f"{where} lacks {e}") from None
    return layers, kv_heads, head_dim


def check_model(cf: CacheFile, model_path: str) -> None:
    check_fits(cf, model_dims(model_path), f"--model {model_path}")


def check_fits(cf: CacheFile, dims: tuple[int, int, int], model: str) -> None:
    """Refuse a file whose layers are not the model's (``dims`` from ``config_dims``):
    attention would read garbage, or crash mid-generation."""
    layers, kv_heads, head_dim = dims
    if len(cf.layers) != layers:
        raise CacheFileError(f"{cf.path} does not match {model}: the cache has "
                             f"{len(cf.layers)} layers, the model {layers}")
    for i, c in enumerate(cf.layers):
        s = layer_shape(c)
        if s is None:
            continue
        if s[1] != kv_heads or s[3] != head_dim:
            raise CacheFileError(
                f"{cf.path} does not match {model}: layer {i} holds {s[1]} KV "
                f"heads of dim {s[3]}, the model has {kv_heads} KV heads of dim {head_dim}")
