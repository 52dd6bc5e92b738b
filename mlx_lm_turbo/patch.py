"""Runtime patch of mlx-lm: attention, cache factory, prompt-cache loader, CLI flags.

``apply()`` is idempotent. Without ``--kv-method`` (or a config set by code) every
patched function calls mlx-lm's original, so mlx-lm behaves exactly as before.
"""

import argparse
import importlib
import sys
from typing import Optional

from . import cache_file, distributed, ratequant
from .attention import turbo_attention
from .batch_cache import BatchTurboKVCache
from .cache import TurboKVCache
from .prompt_cache import make_prompt_cache as make_turbo_cache
from .config import (UNSET, TurboConfig, add_arguments, codec_label, config_from_args,
                     resolve_start, unset_start_default)
from .rotating_cache import TurboRotatingKVCache

SUPPORTED_MLX_LM = ((0, 32, 0), (0, 33, 0))  # [min, max)

_config: Optional[TurboConfig] = None
_last_caches: Optional[list] = None
# The file generate's --prompt-cache-file read, checked against the model once it is loaded.
_loaded_file: Optional[cache_file.CacheFile] = None
_originals: dict = {}


def set_config(config: Optional[TurboConfig]) -> None:
    """Make every cache that mlx-lm builds from now on a turbo cache (None: plain)."""
    global _config
    _config = config


def get_config() -> Optional[TurboConfig]:
    return _config


def check_mlx_lm_version() -> None:
    import mlx_lm

    version = tuple(int(p) for p in mlx_lm.__version__.split(".")[:3] if p.isdigit())
    lo, hi = SUPPORTED_MLX_LM
    if not lo <= version < hi:
        raise RuntimeError(
            f"mlx_lm_turbo supports mlx-lm >= {'.'.join(map(str, lo))}, < "
            f"{'.'.join(map(str, hi))}; found {mlx_lm.__version__}. Install a supported "
            "mlx-lm (pip install 'mlx-lm>=0.32.2,<0.33') or upgrade mlx-lm-turbo."
        )


def _rebind(old, new, name: str) -> None:
    """Point every loaded mlx_lm module that imported ``old`` by name at ``new``."""
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("mlx_lm") and getattr(mod, name, None) is old:
            setattr(mod, name, new)


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    if isinstance(cache, TurboKVCache):
        return turbo_attention(queries, keys, values, cache, scale, mask, sinks)
    recorded = getattr(cache, "calibration_queries", None)  # ratequant.CalibrationCache
    if recorded is not None:
        recorded.append(queries)
    return _originals["sdpa"](queries, keys, values, cache, scale=scale, mask=mask,
                              sinks=sinks)


def make_prompt_cache(model, max_kv_size=None):
    global _last_caches
    if _config is None:
        return _originals["make_prompt_cache"](model, max_kv_size)
    _last_caches = make_turbo_cache(model, _config, max_kv_size,
                                    make_base=_originals["make_prompt_cache"])
    distributed.use_global_layers(model, _last_caches, _config)  # pipeline ranks
    return _last_caches


def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
    if _config is not None and kv_bits is None:
        return distributed.maybe_compress(prompt_cache, _config, quantized_kv_start)
    return _originals["maybe_quantize_kv_cache"](prompt_cache, quantized_kv_start,
                                                 kv_group_size, kv_bits)


def load_prompt_cache(file_name, return_metadata=False):
    """mlx-lm's loader for generate's --prompt-cache-file, through cache_file's checks: a
    missing, empty, truncated or foreign file is one ``error:`` line, not a traceback."""
    global _loaded_file
    try:
        cf = cache_file.load_cache_file(file_name)
    except cache_file.CacheFileError as e:
        sys.exit(f"error: {e}")
    missing = [k for k in ("model", "tokenizer_config") if k not in cf.metadata]
    if return_metadata and missing:  # generate reads both
        sys.exit(f"error: {file_name}: no {missing[0]!r} in its metadata (write it with "
                 "mlx_lm.cache_prompt or convert-cache)")
    _loaded_file = cf
    return (cf.layers, cf.metadata) if return_metadata else cf.layers


def _check_loaded_file(path, config: Optional[dict]) -> None:
    """The --prompt-cache-file must have the loaded model's layers, KV heads and head dim
    (another model's cache would be read as garbage, or crash mid-generation)."""
    global _loaded_file
    cf, _loaded_file = _loaded_file, None
    if cf is None or config is None:
        return
    try:
        dims = cache_file.config_dims(config, f"the config of {path}")
        cache_file.check_fits(cf, dims, f"the model {path}")
    except cache_file.CacheFileError as e:
        sys.exit(f"error: {e}")


def load(*args, **kwargs):
    """mlx-lm's ``load``, then the RateQuant allocation when one is asked for (it needs
    the model and its tokenizer)."""
    result = _originals["load"](*args, **kwargs)
    if kwargs.get("return_config") and len(result) > 2:  # generate's main model
        _check_loaded_file(args[0] if args else kwargs.get("path_or_hf_repo"), result[2])
    if _config is not None and _config.ratequant_target is not None \
            and _config.layer_bits is None:
        try:
            set_config(ratequant.resolve(result[0], result[1], _config))
        except ValueError as e:
            sys.exit(f"error: {e}")
    return result


def sharded_load(*args, **kwargs):
    """mlx-lm's ``sharded_load`` (``mlx.launch``): RateQuant resolved by all ranks together
    (rank 0's allocation broadcast), and a check that every rank has the same settings."""
    result = _originals["sharded_load"](*args, **kwargs)
    if _config is not None:
        try:
            set_config(ratequant.resolve_on_ranks(result[0], result[1], _config))
        except ValueError as e:
            sys.exit(f"error: {e}")
    return result


def check_loaded_cache(caches: list, config: TurboConfig) -> None:
    """A prompt-cache file's turbo layers must match the flags given with it. Its fp16
    window and key centring are fixed when it is written (the window's tokens are exact
    only if they were kept when coded), so other values are refused, not ignored."""
    for i, c in enumerate(caches):
        if not isinstance(c, TurboKVCache):
            continue
        have = (c.fp16_window, c.center_keys, c.scale_keys)
        want = (config.fp16_window, config.center_keys, config.scale_keys)
        if have != want:
            def flags(window, centred, scaled):
                return (f"--kv-fp16-window {window}"
                        + (" --kv-center-keys" if centred else " --no-kv-center-keys")
                        + (" --kv-scale-keys" if scaled else " --no-kv-scale-keys"))
            raise ValueError(
                f"--prompt-cache-file layer {i} was written with {flags(*have)}, but the "
                f"flags ask for {flags(*want)}; a file keeps the settings "
                "it was written with: drop the --kv-* flags to continue with them, or "
                "convert the file (convert-cache --to fp16, then with the new flags)")
        kb, vb = config.bits_for_layer(c.layer)  # global layer (pipeline ranks)
        want = (config.key_method, kb, config.value_method, vb, config.seed)
        have = (c.key_method, c.key_bits, c.value_method, c.value_bits, c.seed)
        if want != have:
            raise ValueError(
                f"--prompt-cache-file layer {i} was compressed with {have[0]} K{have[1]} / "
                f"{have[2]} V{have[3]} seed {have[4]}, but the flags ask for {want[0]} "
                f"K{want[1]} / {want[2]} V{want[3]} seed {want[4]}; drop the --kv-* flags "
                "to continue with the file's settings")


def cache_summary(caches: list) -> str:
    """One line: method, bits/element, KV bytes for the tokens held vs what fp16 would
    take for the same tokens (not the buffers' 256-token steps, which both round up)."""
    turbo = [c for c in caches if isinstance(c, TurboKVCache) and not c.empty()]
    if not turbo:
        return "KV cache: fp16 (no layer compressed yet; see --quantized-kv-start)"
    elts = []
    for c in turbo:
        b, h = next(iter(c.keys.values())).shape[:2]
        elts.append(b * h * c.size() * (c.key_codec.dim + c.value_codec.dim))
    held = sum(c.bits_per_element * e for c, e in zip(turbo, elts)) / 8
    fp16 = 2 * sum(elts)
    bits = 8 * held / max(sum(elts), 1)
    c0 = turbo[0]
    method = codec_label(c0.key_method, c0.key_bits, c0.value_method, c0.value_bits)
    if any((c.key_bits, c.value_bits) != (c0.key_bits, c0.value_bits) for c in turbo):
        method = f"K {c0.key_method} / V {c0.value_method} with per-layer bits (RateQuant)"
    tokens = max(c.offset for c in turbo)
    note = ""
    if c0.fp16_window:
        # Every token is coded and the newest W are also kept in fp16: a window as long as
        # the context costs its full 16 bits on top of the codes.
        note = (f" (the {c0.fp16_window}-token fp16 window holds all {tokens} tokens, "
                "each also coded)" if c0.fp16_window >= tokens
                else f" (incl. the {c0.fp16_window}-token fp16 window)")
    return (f"KV cache: {method}, {bits:.3f} bits/element{note}, {tokens} tokens, "
            f"{held / 2**20:.2f} MiB held vs {fp16 / 2**20:.2f} MiB as fp16 "
            f"({fp16 / max(held, 1):.2f}x smaller), {len(turbo)}/{len(caches)} layers compressed")


def generate(model, tokenizer, prompt, verbose=False, **kwargs):
    global _last_caches
    _last_caches = None
    loaded = kwargs.get("prompt_cache")
    unresolved = _config is not None and _config.ratequant_target is not None \
        and _config.layer_bits is None
    if loaded and _config is not None and not unresolved:
        try:
            check_loaded_cache(loaded, _config)
        except ValueError as e:
            sys.exit(f"error: {e}")
    text = _originals["generate"](model, tokenizer, prompt, verbose=verbose, **kwargs)
    caches = _last_caches or kwargs.get("prompt_cache")
    if verbose and caches and (_config is not None
                               or any(isinstance(c, TurboKVCache) for c in caches)):
        print(cache_summary(caches))
    return text


def _patch_parser_factory(module) -> None:
    original = module.setup_arg_parser
    if getattr(original, "_turbo", False):
        return

    def setup_arg_parser():
        parser = original()
        add_arguments(parser)
        default_start = unset_start_default(parser)
        parse_args = parser.parse_args

        def parse_and_configure(*a, **kw):
            args = parse_args(*a, **kw)
            resolve_start(args, default_start)
            try:
                config = config_from_args(args)
            except ValueError as e:
                parser.error(str(e))
            set_config(config)
            if config is not None:
                args.kv_bits = None  # our bits; keep mlx-lm's affine path off
            return args

        parser.parse_args = parse_and_configure
        return parser

    setup_arg_parser._turbo = True
    module.setup_arg_parser = setup_arg_parser


def apply() -> None:
    """Patch mlx-lm in this process (idempotent)."""
    import mlx_lm.models.base as base
    import mlx_lm.models.cache as mlx_cache

    if getattr(base, "_mlx_lm_turbo_patched", False):
        return
    check_mlx_lm_version()
    # mlx_lm/__init__ rebinds the name `generate` to the function: go through sys.modules.
    gen = importlib.import_module("mlx_lm.generate")
    cache_prompt = importlib.import_module("mlx_lm.cache_prompt")

    _originals["sdpa"] = base.scaled_dot_product_attention
    _originals["make_prompt_cache"] = mlx_cache.make_prompt_cache
    _originals["maybe_quantize_kv_cache"] = gen.maybe_quantize_kv_cache
    _originals["generate"] = gen.generate
    _originals["load"] = gen.load
    utils = importlib.import_module("mlx_lm.utils")
    _originals["sharded_load"] = utils.sharded_load

    base.scaled_dot_product_attention = scaled_dot_product_attention
    _rebind(_originals["sdpa"], scaled_dot_product_attention, "scaled_dot_product_attention")
    mlx_cache.make_prompt_cache = make_prompt_cache
    make_prompt_cache.__wrapped__ = _originals["make_prompt_cache"]   # (RateQuant's calibration)
    _rebind(_originals["make_prompt_cache"], make_prompt_cache, "make_prompt_cache")
    # load_prompt_cache rebuilds caches with globals()[class_name] in mlx_lm.models.cache.
    mlx_cache.TurboKVCache = TurboKVCache
    # mlx-lm's BatchGenerator (server) batches caches through merge of the first's class.
    TurboKVCache.batch_class = BatchTurboKVCache
    mlx_cache.TurboRotatingKVCache = TurboRotatingKVCache
    gen.maybe_quantize_kv_cache = maybe_quantize_kv_cache
    gen.generate = generate
    gen.load = load
    gen.load_prompt_cache = load_prompt_cache  # only generate's --prompt-cache-file
    cache_prompt.load = load
    utils.sharded_load = sharded_load  # server, chat, benchmark import it from here
    _rebind(_originals["sharded_load"], sharded_load, "sharded_load")
    _patch_parser_factory(gen)
    _patch_parser_factory(cache_prompt)
    base._mlx_lm_turbo_patched = True
    if "mlx_lm.server" in sys.modules:
        apply_server()


# ---------------------------------------------------------------- mlx_lm.server
def describe(config: TurboConfig) -> str:
    """``config.describe()``, naming the allocation file when bits come from
    --ratequant-load (its target is then only known once the file is read)."""
    if not config.ratequant_load:
        return config.describe()
    return (f"{config.key_method} RateQuant allocation from {config.ratequant_load}"
            + config.options_label())


class _ServerArgumentParser(argparse.ArgumentParser):
    """The ArgumentParser that ``mlx_lm.server.main`` builds once ``apply_server()`` ran
    (the server makes its parser inline): our flags, and the config set after parsing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_arguments(self)

    def parse_args(self, args=None, namespace=None):
        default_start = unset_start_default(self)
        ns = super().parse_args(args, namespace)
        start = getattr(ns, "quantized_kv_start", UNSET)
        resolve_start(ns, default_start)
        try:
            if getattr(ns, "kv_method", None) is not None and start is not UNSET and start:
                raise ValueError(
                    f"--quantized-kv-start {start} does not apply to mlx_lm.server with "
                    "--kv-method: every request's cache is compressed from its first "
                    "token (batched caches cannot change format mid-batch); leave it "
                    "out or pass 0")
            config = config_from_args(ns)
        except ValueError as e:
            self.error(str(e))
        set_config(config)
        if config is not None:
            ns.kv_bits = None  # our bits; mlx-lm's affine cache (and its no-batching) off
            print(f"mlx-lm-turbo: KV cache {describe(config)} for every request "
                  "(batched; prompt cache holds packed codes)", file=sys.stderr)
        return ns


def apply_server() -> None:
    """Patch ``mlx_lm.server`` (idempotent; imports it): its parser gains our flags, and
    with ``--kv-method`` every request gets turbo caches (the patched
    ``make_prompt_cache``). They have ``merge``, so the server batches them
    (``BatchTurboKVCache``); its LRU prompt cache deep-copies, trims and counts their
    real ``nbytes``. With or without our flags, no bad or abandoned request can stop the
    server or keep it busy (``server_guard``)."""
    import types

    apply()
    from . import server_guard

    server = importlib.import_module("mlx_lm.server")
    if getattr(server, "_mlx_lm_turbo_patched", False):
        return
    proxy = types.ModuleType("argparse")
    proxy.__dict__.update(vars(argparse))
    proxy.ArgumentParser = _ServerArgumentParser
    server.argparse = proxy
    if getattr(server, "make_prompt_cache", None) is _originals["make_prompt_cache"]:
        server.make_prompt_cache = make_prompt_cache
    run_http = server._run_http_server
    base_class = run_http.__defaults__[0]

    class ServerWithBacklog(base_class):
        # socketserver listens with a backlog of 5: the 6th simultaneous client is reset.
        request_queue_size = 128

    def _run_http_server(host, port, response_generator, server_class=base_class, *args):
        if _config is not None and server_class is base_class:
            server_class = ServerWithBacklog
        return run_http(host, port, response_generator, server_class, *args)

    server._run_http_server = _run_http_server
    # One bad or abandoned request must not stop the server (with or without --kv-method).
    server.ResponseGenerator = server_guard.make_response_generator(server.ResponseGenerator)
    server_guard.patch_handler(server.APIHandler)
    patched_load = globals().get("load")
    if patched_load is not None and _originals.get("load") is not None \
            and getattr(server, "load", None) is _originals["load"]:
        server.load = patched_load  # RateQuant resolves its allocation in load
    if getattr(server, "sharded_load", None) is _originals.get("sharded_load"):
        server.sharded_load = sharded_load  # mlx.launch ... -m mlx_lm.server
    server._mlx_lm_turbo_patched = True
