"""What the flags ask for: ``TurboConfig``, mlx-lm-turbo's command-line flags and their parsing.

``add_arguments`` adds the flags to a parser; ``config_from_args`` reads them into a
``TurboConfig`` (None without ``--kv-method``) and refuses bad input with a ValueError
whose message is the user's. ``unset_start_default`` and ``resolve_start`` make asking for
a compressed cache compress from the first token unless ``--quantized-kv-start`` was given.
"""

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import codecs

DEFAULT_BITS = {"turboquant_mse": 4, "turboquant_prod": 4, "turboquant_rvq": 2,
                "polar": 4, "qjl": 3}


def split_bits(method: str, bits: int) -> tuple[int, int]:
    """(key bits, value bits) that ``--kv-bits bits`` asks for. With turboquant_mse keys and
    values, 2..7 bits on average are spent as one bit more on keys than on values: a key's
    coding error moves its logit, which softmax amplifies, while a value's is averaged over
    the keys a query attends to. At equal bytes this never measured worse, and on keys with
    loud channels (Qwen2.5) it is the difference between +6% and +1-2% perplexity at 4 bits
    (reports/README.md). Other methods take ``bits`` for both."""
    if method == "turboquant_mse" and 2 <= bits <= 7:
        return bits + 1, bits - 1
    return bits, bits


@dataclass(frozen=True)
class TurboConfig:
    """What the flags ask for. Values default to the key method and bits (to
    turboquant_mse for the key-only methods). ``layer_bits`` (RateQuant) overrides bits
    per layer as a list of (key_bits, value_bits)."""

    key_method: str = "turboquant_mse"
    key_bits: int = 4
    value_method: Optional[str] = None
    value_bits: Optional[int] = None
    seed: int = 0
    quantized_kv_start: int = 0
    layer_bits: Optional[tuple] = None
    # RateQuant request (resolved into layer_bits once the model is loaded).
    ratequant_target: Optional[float] = None
    ratequant_solver: str = "greedy"
    ratequant_save: Optional[str] = None
    ratequant_load: Optional[str] = None
    ratequant_calibration: Optional[str] = None
    center_keys: bool = True
    scale_keys: bool = True
    fp16_window: int = 0

    def __post_init__(self):
        if self.fp16_window < 0:
            raise ValueError(f"fp16 window must be >= 0 tokens, got {self.fp16_window}")
        key_method = codecs.canonical_name(self.key_method)
        if self.value_method is None:
            default = key_method if key_method in codecs.VALUE_METHODS else "turboquant_mse"
            object.__setattr__(self, "value_method", default)
        value_method = codecs.canonical_name(self.value_method)
        if self.value_bits is None:
            bits = self.key_bits if self.key_bits in codecs.bits_range(value_method) else 4
            object.__setattr__(self, "value_bits", bits)
        if value_method not in codecs.VALUE_METHODS:
            raise ValueError(
                f"{value_method} is a key-only method (an inner-product estimator); values "
                f"need one of {', '.join(codecs.VALUE_METHODS)}"
            )
        object.__setattr__(self, "key_method", key_method)
        object.__setattr__(self, "value_method", value_method)
        for method, bits in ((key_method, self.key_bits), (value_method, self.value_bits)):
            if bits not in codecs.bits_range(method):
                r = codecs.bits_range(method)
                raise ValueError(
                    f"bits={bits} is out of range for {method}: allowed {r.start}..{r.stop - 1}"
                )

    def bits_for_layer(self, layer: int) -> tuple[int, int]:
        if self.layer_bits is not None and layer < len(self.layer_bits) \
                and self.layer_bits[layer] is not None:
            return tuple(self.layer_bits[layer])
        return self.key_bits, self.value_bits

    def describe(self) -> str:
        if self.ratequant_target is not None:
            text = f"{self.key_method} RateQuant {self.ratequant_target:g} bits/element"
        else:
            text = codec_label(self.key_method, self.key_bits, self.value_method,
                               self.value_bits)
        return text + self.options_label()

    def options_label(self) -> str:
        """The key statistics (named only where they differ from the default, both on)
        and the fp16 window, as a suffix of ``describe``."""
        text = {(True, True): "", (True, False): ", centred keys",
                (False, True): ", scaled keys", (False, False): ", raw keys"}[
            (self.center_keys, self.scale_keys)]
        return text + (f" + {self.fp16_window} fp16 tokens" if self.fp16_window else "")


def codec_label(key_method: str, key_bits: int, value_method: str, value_bits: int) -> str:
    """"turboquant_mse 4-bit", or "K turboquant_mse 5-bit / V turboquant_mse 3-bit"."""
    if key_method == value_method and key_bits == value_bits:
        return f"{key_method} {key_bits}-bit"
    return f"K {key_method} {key_bits}-bit / V {value_method} {value_bits}-bit"


def check_target(target: float) -> None:
    """What any model refuses (the reachable range needs the model: ``check_budget``)."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ValueError(f"--ratequant-target must be a finite number > 0, got {target}")


def check_save_path(path: Optional[str]) -> None:
    """--ratequant-save must be writable before calibrating: a failed save would lose it."""
    if not path:
        return
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"--ratequant-save {path}: is a folder; give a file name")
    if not folder.is_dir():
        raise ValueError(f"--ratequant-save {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--ratequant-save {path}: not writable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = list(codecs.METHODS) + list(codecs.ALIASES)
    g = parser.add_argument_group("mlx-lm-turbo KV cache compression")
    g.add_argument("--kv-method", choices=names, default=None,
                   help="Compress the KV cache with this method; --kv-bits then sets its "
                        "bits (per stage for turboquant_rvq) instead of mlx-lm's affine "
                        "quantization.")
    g.add_argument("--kv-key-bits", type=int, default=None,
                   help="Bits for keys (overrides --kv-bits; turboquant_mse's --kv-bits b "
                        "gives keys b+1 and values b-1 bits for b in 2..7).")
    g.add_argument("--kv-value-bits", type=int, default=None, help="Bits for values (overrides --kv-bits).")
    g.add_argument("--kv-value-method", choices=names, default=None,
                   help="Method for values (default: --kv-method, or turboquant_mse for "
                        "the key-only methods turboquant_prod and qjl).")
    g.add_argument("--kv-seed", type=int, default=0, help="Seed of the rotations and sketches.")
    g.add_argument("--kv-center-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="Subtract each head's mean key (of the first 64 tokens) before "
                        "coding; exact for attention (default: on).")
    g.add_argument("--kv-scale-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="Divide each key channel by a scale fixed from the first 64 tokens "
                        "(queries multiplied by it: exact for attention), so outlier "
                        "channels do not set every key's coding error (default: on).")
    g.add_argument("--kv-fp16-window", type=int, default=0, metavar="N",
                   help="Also keep the N newest tokens uncompressed (fp16, counted in the "
                        "bytes held): each query reads its N nearest keys/values exactly. "
                        "16-64 removes most of the quality loss at 2-3 bits for ~0.1 "
                        "bits/element (default 0: codes only).")
    g.add_argument("--ratequant-target", type=float, default=None,
                   help="RateQuant: average bits/element (metadata counted) to spend, "
                        "allocated per layer and K/V after a short calibration.")
    g.add_argument("--ratequant-solver", choices=("greedy", "waterfill"), default="greedy",
                   help="greedy: marginal gains on measured attention errors; waterfill: "
                        "closed form on the key/value norm proxy.")
    g.add_argument("--ratequant-calibration", default=None, metavar="FILE",
                   help="Text file to calibrate on (default: a built-in ~500-token text).")
    g.add_argument("--ratequant-save", default=None, metavar="FILE",
                   help="Save the allocation as JSON (a restart can --ratequant-load it).")
    g.add_argument("--ratequant-load", default=None, metavar="FILE",
                   help="Use a saved allocation instead of calibrating.")


def config_from_args(args: argparse.Namespace) -> Optional[TurboConfig]:
    """Read our flags; raise ValueError with a user-facing message on bad input."""
    method = getattr(args, "kv_method", None)
    if method is None:
        if getattr(args, "kv_fp16_window", 0):
            raise ValueError("--kv-fp16-window needs --kv-method")
        for flag in ("kv_center_keys", "kv_scale_keys"):   # (given, either way)
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--[no-]{flag.replace('_', '-')} needs --kv-method")
        for flag in ("kv_key_bits", "kv_value_bits", "kv_value_method", "ratequant_target",
                     "ratequant_load", "ratequant_save", "ratequant_calibration"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --kv-method")
        return None
    key_method = codecs.canonical_name(method)
    if args.kv_value_method is not None:
        value_method = codecs.canonical_name(args.kv_value_method)
    else:
        value_method = key_method if key_method in codecs.VALUE_METHODS else "turboquant_mse"
    bits = getattr(args, "kv_bits", None)
    key_bits, value_bits = args.kv_key_bits, args.kv_value_bits
    if key_bits is None and value_bits is None and key_method == value_method:
        key_bits, value_bits = split_bits(
            key_method, DEFAULT_BITS[key_method] if bits is None else bits)
    key_bits = bits if key_bits is None else key_bits
    value_bits = bits if value_bits is None else value_bits
    key_bits = DEFAULT_BITS[key_method] if key_bits is None else key_bits
    if value_bits is None:
        value_bits = DEFAULT_BITS[value_method]
    elif value_bits not in codecs.bits_range(value_method) and bits == value_bits \
            and args.kv_value_bits is None and value_method != key_method:
        value_bits = DEFAULT_BITS[value_method]  # e.g. qjl 1-bit keys, default values
    if getattr(args, "kv_group_size", 64) != 64:
        raise ValueError("--kv-group-size applies to mlx-lm's affine cache, not --kv-method")
    target = getattr(args, "ratequant_target", None)
    if (args.ratequant_save or args.ratequant_calibration) and target is None:
        raise ValueError("--ratequant-save/--ratequant-calibration need --ratequant-target")
    if target is not None:  # here, not after loading the model and calibrating
        check_target(target)
        check_save_path(args.ratequant_save)
    if args.ratequant_load and target is None:
        target = -1.0  # the saved allocation decides
    return TurboConfig(key_method, key_bits, value_method, value_bits,
                       seed=args.kv_seed,
                       quantized_kv_start=getattr(args, "quantized_kv_start", 0) or 0,
                       ratequant_target=target, ratequant_solver=args.ratequant_solver,
                       ratequant_save=args.ratequant_save, ratequant_load=args.ratequant_load,
                       ratequant_calibration=args.ratequant_calibration,
                       center_keys=getattr(args, "kv_center_keys", None) is not False,
                       scale_keys=getattr(args, "kv_scale_keys", None) is not False,
                       fp16_window=getattr(args, "kv_fp16_window", 0) or 0)


# The default of mlx-lm's --quantized-kv-start while parsing: tells "not given" from any value.
UNSET = object()


def unset_start_default(parser: argparse.ArgumentParser) -> Optional[int]:
    """Make --quantized-kv-start default to UNSET; return mlx-lm's default (None if the
    parser has no such flag)."""
    if not any(a.dest == "quantized_kv_start" for a in parser._actions):
        return None
    default = parser.get_default("quantized_kv_start")
    if default is UNSET:  # parsed before: mlx-lm's default was kept then
        return parser._turbo_start_default
    parser._turbo_start_default = default
    parser.set_defaults(quantized_kv_start=UNSET)
    return default


def resolve_start(args: argparse.Namespace, default: Optional[int]) -> None:
    """Asking for a compressed cache (--kv-method) compresses from the first token unless
    --quantized-kv-start was given: mlx-lm's default (5000) would leave most prompts fp16."""
    if getattr(args, "quantized_kv_start", None) is not UNSET:
        return
    args.quantized_kv_start = 0 if getattr(args, "kv_method", None) is not None else default
