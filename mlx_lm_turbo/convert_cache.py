"""Compress, inspect and restore mlx-lm prompt-cache files.

    python -m mlx_lm_turbo.convert-cache IN OUT --kv-method turboquant_mse --kv-bits 3
    python -m mlx_lm_turbo.convert-cache OUT RESTORED --to fp16
    python -m mlx_lm_turbo.convert-cache --info FILE

IN is a prompt-cache safetensors file written by ``mlx_lm.cache_prompt`` (fp16/bf16/fp32
``KVCache`` layers, or mlx-lm's affine ``QuantizedKVCache``) or by mlx_lm_turbo
(``TurboKVCache``). OUT holds ``TurboKVCache`` layers that a patched ``mlx_lm.generate
--prompt-cache-file OUT`` (``python -m mlx_lm_turbo generate``) continues from; with
``--to fp16`` it holds plain ``KVCache`` layers that an unpatched mlx-lm loads. The user
metadata of IN ("model", "tokenizer_config", ...) is carried over.

Safety: OUT is written to a temporary file ``.OUT.tmp-<pid>-<random>.safetensors`` in
OUT's folder, fsynced and renamed over OUT only when complete (an error, Ctrl-C or
SIGTERM removes the temporary file; those left by killed processes are removed when the
next run starts writing into that folder). OUT is never overwritten without ``--force``; IN is only read; OUT == IN is refused.
Bad input gives one ``error:`` line on stderr and exit status 1 (2 for bad flags).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

# Reading and checking files lives in cache_file (mlx_lm.generate --prompt-cache-file
# uses the same checks); re-exported here for callers of convert_cache.
from .cache_file import (FORMAT, META_PREFIX, CacheFile, CacheFileError, _state_nbytes,
                         check_model, layer_shape, load_cache_file)
from .config import codec_label

PROG = "python -m mlx_lm_turbo.convert-cache"


# ------------------------------------------------------------------ layers
def to_kv_cache(c: Any) -> Any:
    """A plain KVCache holding exactly ``offset`` tokens (model dtype) for a KVCache,
    QuantizedKVCache or TurboKVCache layer, mlx-lm's fp16 RotatingKVCache for a
    TurboRotatingKVCache; other layers are returned unchanged."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from .cache import TurboKVCache
    from .rotating_cache import TurboRotatingKVCache

    if isinstance(c, TurboRotatingKVCache):
        return c.to_fp16()
    if isinstance(c, TurboKVCache):
        if c.keys is None or not c.offset:
            return KVCache()
        kv = c.to_fp16()
    elif type(c) is QuantizedKVCache:
        kv = KVCache()
        if c.keys is not None and c.offset:
            def deq(q):
                w, s, b = (x[..., :c.offset, :] for x in q)
                return mx.dequantize(w, s, b, group_size=c.group_size, bits=c.bits)
            kv.keys, kv.values, kv.offset = deq(c.keys), deq(c.values), c.offset
        return kv
    elif type(c) is KVCache:
        kv = c
    else:
        return c
    out = KVCache()
    if kv.keys is not None and kv.offset:
        out.keys = kv.keys[..., :kv.offset, :]
        out.values = kv.values[..., :kv.offset, :]
        out.offset = kv.offset
    return out


def is_kv_layer(c: Any) -> bool:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    from .cache import TurboKVCache

    return isinstance(c, TurboKVCache) or type(c) in (KVCache, QuantizedKVCache,
                                                      RotatingKVCache)


def same_settings(c: Any, config: Any, layer: int) -> bool:
    from .cache import TurboKVCache

    kb, vb = config.bits_for_layer(layer)
    return (isinstance(c, TurboKVCache) and c.layer == layer
            and (c.key_method, c.key_bits, c.value_method, c.value_bits, c.seed,
                 c.fp16_window, c.center_keys)
            == (config.key_method, kb, config.value_method, vb, config.seed,
                config.fp16_window, config.center_keys))


def convert_layer(c: Any, layer: int, to: str, config: Any = None, dtype: Any = None) -> Any:
    """One layer of OUT: a TurboKVCache (``to == 'turbo'``, kept as is when it already
    has these settings) or a plain KVCache (``to == 'fp16'``, cast to ``dtype``);
    sliding-window layers become a TurboRotatingKVCache or mlx-lm's RotatingKVCache."""
    import mlx.core as mx

    from .rotating_cache import compress_layer

    if not is_kv_layer(c):
        return c  # hybrid and other layers pass through unchanged
    if to == "turbo":
        if same_settings(c, config, layer):
            return c
        out = compress_layer(to_kv_cache(c), config, layer)
        if out.keys is not None:
            mx.eval(out.keys, out.values, out.key_mean)
        return out
    kv = to_kv_cache(c)
    if kv.keys is not None and dtype is not None:
        kv.keys, kv.values = kv.keys.astype(dtype), kv.values.astype(dtype)
    if kv.keys is not None:
        mx.eval(kv.keys, kv.values)
    return kv


def layer_elements(c: Any) -> int:
    s = layer_shape(c)
    return 0 if s is None else s[0] * s[1] * s[2] * (s[3] + s[4])


def describe_layer(c: Any) -> str:
    from .cache import TurboKVCache

    if isinstance(c, TurboKVCache):
        return (codec_label(c.key_method, c.key_bits, c.value_method, c.value_bits)
                + f" (seed {c.seed})")
    if type(c).__name__ == "QuantizedKVCache":
        return f"affine {c.bits}-bit, group {c.group_size}"
    keys = getattr(c, "keys", None)
    if type(c).__name__ in ("KVCache", "RotatingKVCache") and keys is not None:
        return str(keys.dtype).split(".")[-1]
    return "-"


# ------------------------------------------------------------------ RateQuant
def _load_model(model_path: str):
    """(model, tokenizer) for RateQuant's calibration (a function so tests can swap it)."""
    from mlx_lm.utils import load

    return load(model_path)[:2]


def ratequant_config(config: Any, model_path: str) -> Any:
    """``config`` with RateQuant's per-layer bits (``--ratequant-target``/``-load``),
    calibrated on the model at ``model_path``."""
    from . import patch, ratequant

    patch.apply()  # calibration records queries through the patched attention
    try:
        model, tokenizer = _load_model(model_path)
    except Exception as e:  # noqa: BLE001 - any load failure is a user-facing error
        raise CacheFileError(f"--model {model_path}: cannot load the model for RateQuant: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        return ratequant.resolve(model, tokenizer, config, verbose=False)
    except ValueError as e:
        raise CacheFileError(f"RateQuant: {e}") from None


# ------------------------------------------------------------------ writing
# A temporary OUT of ours: ".<name>.tmp-<pid>-<8 hex>.safetensors" (see atomic_save).
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}\.safetensors$")


def clean_stale_temps(folder: Path) -> list[str]:
    """Remove our temporary files in ``folder`` whose writer process is gone (kill -9
    leaves them behind, possibly hundreds of MB, whatever OUT they were for)."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(str(folder)), ".*.tmp-*.safetensors")):
        m = _TEMP_NAME.match(Path(p).name)
        if m is None or not Path(p).is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running (another conversion)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(out: Path, layers: list, metadata: dict) -> None:
    """save_prompt_cache into a temp file beside ``out``, fsync, rename over ``out``."""
    from mlx_lm.models.cache import save_prompt_cache

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
    try:
        save_prompt_cache(str(tmp), layers, metadata)
        fsync(tmp)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        fsync(out.parent)   # the rename itself
    except OSError:
        pass


def output_path(out: str) -> Path:
    p = Path(out)
    if p.suffix != ".safetensors":  # mlx's save_safetensors (and mlx-lm's loader) expect it
        p = p.with_name(p.name + ".safetensors")
    return p


# ------------------------------------------------------------------ commands
def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def kv_stats(layers: list, layer_bytes: Optional[list] = None) -> tuple[int, int, int]:
    """(bytes of the KV layers' arrays, elements they hold, fp16 bytes for them)."""
    held = elements = 0
    for i, c in enumerate(layers):
        if layer_shape(c) is None:
            continue
        elements += layer_elements(c)
        held += layer_bytes[i] if layer_bytes is not None else _state_nbytes(c.state)
    return held, elements, 2 * elements


def info_text(cf: CacheFile) -> str:
    md = cf.metadata
    tokens = max((c.offset for c in cf.layers if getattr(c, "offset", None) is not None
                  and isinstance(c.offset, int)), default=0)
    lines = [f"file: {cf.path} ({fmt_bytes(cf.size)}, {cf.size} bytes)",
             f"model: {md.get('model', '(not recorded)')}",
             f"tokens: {tokens}",
             f"layers: {len(cf.layers)}"]
    if md.get(META_PREFIX + "format"):
        lines.append(f"written by: mlx_lm_turbo {md.get(META_PREFIX + 'version', '?')} "
                     f"(method {md.get(META_PREFIX + 'method', '?')}, bits "
                     f"{md.get(META_PREFIX + 'bits', '?')}, "
                     f"seed {md.get(META_PREFIX + 'seed', '?')})")
    other = {k: v for k, v in md.items() if k != "model" and not k.startswith(META_PREFIX)}
    for k, v in other.items():
        lines.append(f"{k}: {v}")
    lines.append(f"{'layer':>5}  {'class':<17} {'method / bits':<52} {'tokens':>7} "
                 f"{'bytes':>11} {'bits/elt':>8}")
    for i, c in enumerate(cf.layers):
        e = layer_elements(c)
        b = cf.layer_bytes[i]
        bpe = f"{8 * b / e:.3f}" if e else "-"
        offset = getattr(c, "offset", None)
        n = offset if isinstance(offset, int) else "-"
        lines.append(f"{i:>5}  {cf.classes[i]:<17} {describe_layer(c):<52} {n:>7} "
                     f"{b:>11} {bpe:>8}")
    held, elements, fp16 = kv_stats(cf.layers, cf.layer_bytes)
    if elements:
        lines.append(f"total: {held} bytes of KV data for {elements} elements: "
                     f"{8 * held / elements:.3f} bits/element; fp16 would be {fp16} bytes "
                     f"({fp16 / held:.2f}x)")
    else:
        lines.append("total: no KV data")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import add_arguments

    p = _Parser(
        prog=PROG,
        description="Compress an mlx-lm prompt-cache file (from mlx_lm.cache_prompt) into "
                    "an mlx_lm_turbo one, restore one to plain fp16 (--to fp16), or "
                    "describe one (--info).",
        epilog="examples:\n"
               f"  {PROG} doc.safetensors doc-3bit.safetensors --kv-method turboquant_mse "
               "--kv-bits 3\n"
               f"  {PROG} doc-3bit.safetensors doc-fp16.safetensors --to fp16\n"
               f"  {PROG} --info doc-3bit.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", metavar="IN", help="prompt-cache file to read")
    p.add_argument("output", nargs="?", metavar="OUT",
                   help="file to write (.safetensors is appended if missing)")
    p.add_argument("--info", metavar="FILE", help="describe FILE and exit")
    p.add_argument("--to", choices=("turbo", "fp16"), default="turbo",
                   help="turbo: compressed TurboKVCache layers (default); fp16: plain "
                        "mlx-lm KVCache layers that an unpatched mlx-lm loads")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "original"),
                   default="float16",
                   help="dtype of the keys/values written by --to fp16 (default float16; "
                        "original: the dtype the cache was made with)")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="bits per coordinate (per stage for turboquant_rvq)")
    add_arguments(p)
    p.add_argument("--model", metavar="PATH",
                   help="model folder: check that the cache matches it (layers, KV heads, "
                        "head_dim)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return p


def _install_sigterm() -> Any:
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import mlx.core as mx
    from tqdm import tqdm

    from . import __version__
    from .config import config_from_args

    if args.info:
        if args.input or args.output:
            parser.error("--info FILE takes no IN/OUT")
        cf = load_cache_file(args.info)
        if args.model:
            check_model(cf, args.model)
        print(info_text(cf))
        return 0
    if not args.input or not args.output:
        parser.error("IN and OUT are required (or --info FILE)")
    config = None
    if args.to == "turbo":
        if args.kv_method is None:
            parser.error("--kv-method is required (or --to fp16)")
        try:
            config = config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
    else:
        flags = [f for f in ("kv_method", "kv_bits", "kv_key_bits", "kv_value_bits",
                             "kv_value_method", "ratequant_target")
                 if getattr(args, f, None) is not None]
        if flags:
            parser.error(f"--to fp16 takes no --{flags[0].replace('_', '-')}")
    rq_target = getattr(args, "ratequant_target", None)
    rq = rq_target is not None or getattr(args, "ratequant_load", None) is not None
    if rq and not args.model:
        parser.error("--ratequant-target/--ratequant-load need --model (RateQuant "
                     "calibrates on the model)")

    src, out = Path(args.input), output_path(args.output)
    if not src.exists():
        raise CacheFileError(f"{src}: no such file")
    if (out.exists() and os.path.samefile(src, out)) or src.resolve() == out.resolve():
        raise CacheFileError("OUT is IN: write to another file (IN is never modified)")
    if not out.parent.is_dir():
        raise CacheFileError(f"{out.parent}: no such folder for OUT")
    if out.exists() and not args.force:
        raise CacheFileError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and not out.is_file():
        raise CacheFileError(f"{out} exists and is not a regular file")
    clean_stale_temps(out.parent)

    cf = load_cache_file(src)
    if args.model:
        check_model(cf, args.model)
    if not any(layer_shape(c) for c in cf.layers):
        raise CacheFileError(f"{src}: holds no KV layers with tokens; nothing to convert")
    if rq:
        config = ratequant_config(config, args.model)

    dtype = None if args.dtype == "original" else getattr(mx, args.dtype)
    layers, kept = [], 0
    for i, c in enumerate(tqdm(cf.layers, desc="layers", unit="layer", disable=None,
                               file=sys.stderr)):
        new = convert_layer(c, i, args.to, config, dtype)
        kept += new is c and is_kv_layer(c)
        layers.append(new)

    metadata = {k: v for k, v in cf.metadata.items() if not k.startswith(META_PREFIX)}
    if args.to == "turbo":
        kbits = sorted({config.bits_for_layer(i)[0] for i in range(len(layers))})
        vbits = sorted({config.bits_for_layer(i)[1] for i in range(len(layers))})
        metadata.update({
            META_PREFIX + "format": FORMAT,
            META_PREFIX + "version": __version__,
            META_PREFIX + "method": (config.key_method if config.key_method == config.value_method
                                     else f"{config.key_method}/{config.value_method}"),
            META_PREFIX + "bits": (
                str(kbits[0]) if kbits == vbits and len(kbits) == 1
                else f"K{','.join(map(str, kbits))}/V{','.join(map(str, vbits))}"),
            META_PREFIX + "seed": str(config.seed),
        })
    metadata = {str(k): str(v) for k, v in metadata.items()}

    atomic_save(out, layers, metadata)

    held, elements, fp16 = kv_stats(layers)
    before, after = cf.size, out.stat().st_size
    in_held, _, _ = kv_stats(cf.layers, cf.layer_bytes)
    in_bpe = 8 * in_held / elements if elements else float("nan")
    if args.to == "fp16":
        what = f"KVCache {args.dtype if dtype is not None else '(original dtype)'}"
    elif config.layer_bits:
        what = (f"{metadata[META_PREFIX + 'method']}, RateQuant per-layer bits "
                f"{metadata[META_PREFIX + 'bits']}")
    else:
        what = config.describe()
    tokens = max(layer_shape(c)[2] for c in layers if layer_shape(c))
    vs_in = (f"{before / after:.2f}x smaller than IN" if before >= after
             else f"{after / before:.2f}x larger than IN")
    note = f" ({kept} layers kept as they were)" if kept and args.to == "turbo" else ""
    print(f"{src} -> {out}: {what}{note}, {tokens} tokens, {len(layers)} layers; "
          f"{fmt_bytes(before)} ({in_bpe:.2f} bits/element) -> {fmt_bytes(after)} "
          f"({8 * held / max(elements, 1):.3f} bits/element); "
          f"{vs_in}, {fp16 / after:.2f}x smaller than fp16 "
          f"({fmt_bytes(fp16)} of fp16 KV)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    old = _install_sigterm()
    try:
        return run(args, parser)
    except CacheFileError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; OUT was not written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:  # one line, never a traceback
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"{PROG}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
