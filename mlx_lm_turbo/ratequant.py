"""RateQuant: integer bits per (layer, K/V) at a fractional average budget.

Calibration runs the model once on a short text (built-in ``calibration.txt``, ~500
tokens, or a user file) with fp32 caches that record each layer's queries, keys and
values. Two sensitivities per (layer, K/V):

- ``proxy`` (the seeds' activation proxy): mean squared norm of the layer's keys / values;
  the allocation is closed-form reverse water-filling on D(b) = s·2^(-β·b), β fitted on
  the codec's own distortion curve.
- ``measured``: the relative error of the layer's attention output when only its K (or V)
  goes through the codec at b bits, for every allowed b (one attention call each); the
  allocation is a greedy marginal-gain solver on these curves.

Both spend exactly the budget the integer choices allow: the mean bits/element
(metadata counted, from the codecs) is the largest reachable value <= target.

Over several ranks (``mlx.launch``): every rank calibrates what it holds (the forward pass
needs all ranks anyway), ``merge_calibration`` sums the per-layer statistics over ranks
into the whole model's, rank 0 allocates and ``computed_once`` hands its allocation to
every rank.
"""

import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import base as mlx_base
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import codecs, distributed
from .codecs import layer_seed
from .config import TurboConfig, check_save_path, check_target

DEFAULT_CHOICES = (1, 2, 3, 4, 8)
CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")


class CalibrationCache(KVCache):
    """An fp32 KVCache that also keeps the queries the patched attention shows it."""

    def __init__(self):
        super().__init__()
        self.calibration_queries = []


@dataclass
class Calibration:
    layers: list  # index of each calibrated layer in the model's cache list
    head_dims: list  # (k_dim, v_dim) per calibrated layer
    kv_heads: list
    n_cache_layers: int
    proxy: np.ndarray  # (layers, 2)
    measured: dict  # bits -> (layers, 2) relative attention-output error
    seconds: float


def model_signature(n_cache_layers: int, layers: Sequence[int], kv_heads: Sequence[int],
                    head_dims: Sequence[tuple]) -> dict:
    return {"cache_layers": n_cache_layers, "layers": list(layers),
            "kv_heads": list(kv_heads), "head_dims": [list(h) for h in head_dims]}


def calibrate(model, tokenizer, method: str, choices: Sequence[int] = DEFAULT_CHOICES,
              text: Optional[str] = None, max_tokens: int = 256, seed: int = 0,
              value_method: Optional[str] = None) -> Calibration:
    """One forward pass, then per-layer codec trials on the recorded K/V. Needs mlx-lm
    patched (``patch.apply()``, which the start-up hook and every command run): the
    patched attention shows each CalibrationCache its queries."""
    from tqdm import tqdm

    if not getattr(mlx_base, "_mlx_lm_turbo_patched", False):
        raise RuntimeError("RateQuant calibration records queries through the patched "
                           "attention: call mlx_lm_turbo.patch.apply() first")
    t0 = time.perf_counter()
    method = codecs.canonical_name(method)
    value_method = codecs.canonical_name(value_method or (
        method if method in codecs.VALUE_METHODS else "turboquant_mse"))
    text = text if text is not None else CALIBRATION_TEXT.read_text()
    tokens = mx.array(tokenizer.encode(text)[:max_tokens])
    # mlx-lm's own factory (the patched one keeps it as __wrapped__), never turbo caches
    caches = inspect.unwrap(mlx_cache.make_prompt_cache)(model)
    # Sliding-window layers too: the model's window mask applies to a plain cache as well
    # (the reference below is causal, the same while the text is within the window).
    layers = [i for i, c in enumerate(caches) if type(c) in (KVCache, RotatingKVCache)]
    offset = distributed.layer_offset(model)  # pipeline rank: global layer of caches[0]
    for i in layers:
        caches[i] = CalibrationCache()
    mx.eval(model(tokens[None], cache=caches))
    proxy, measured = [], {b: [] for b in choices}
    kv_heads, head_dims = [], []
    # No bar for a shape probe (no bit choices): it takes a moment and may end in an error.
    for i in tqdm(layers, desc="RateQuant calibration", leave=False, disable=not choices):
        c = caches[i]
        # The last 96 queries see >= max_tokens - 96 keys each: enough signal at a
        # fraction of the attention cost.
        q = c.calibration_queries[0][:, :, -96:].astype(mx.float32)
        k = c.keys[:, :, :c.offset].astype(mx.float32)
        v = c.values[:, :, :c.offset].astype(mx.float32)
        kv_heads.append(k.shape[1])
        head_dims.append((k.shape[-1], v.shape[-1]))
        scale = 1 / math.sqrt(q.shape[-1])
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        ref_norm = mx.sum(ref * ref)
        proxy.append([(k * k).sum(-1).mean(), (v * v).sum(-1).mean()])
        mu = k.mean(axis=2, keepdims=True)
        for b in choices:
            row = []
            for is_value, m, x in ((False, method, k - mu), (True, value_method, v)):
                if b not in codecs.bits_range(m):
                    row.append(mx.array(float("nan")))
                    continue
                codec = codecs.make(m, b, x.shape[-1], layer_seed(seed, offset + i, is_value),
                                    keys=not is_value)
                xh = codec.decode(codec.encode(x))
                kk, vv = (k, xh) if is_value else (xh, v)
                out = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=scale, mask="causal")
                row.append(mx.sum((out - ref) ** 2) / ref_norm)
            measured[b].append(mx.stack(row))
        mx.eval(proxy[-1], [measured[b][-1] for b in choices])  # one sync per layer
    proxy = np.array([[float(a), float(b)] for a, b in proxy])
    measured = {b: np.array([np.array(r) for r in rows]) for b, rows in measured.items()}
    return Calibration(layers, head_dims, kv_heads, len(caches), proxy, measured,
                       time.perf_counter() - t0)


def _bits_per_element(method: str, bits: int, dim: int) -> float:
    return codecs.make(method, bits, dim).bits_per_element


def _options(method: str, choices: Sequence[int], dim: int) -> list:
    """Allowed (bits, bits/element) for a method, sorted by cost."""
    valid = [b for b in choices if b in codecs.bits_range(method)]
    if not valid:
        raise ValueError(f"none of the bit choices {list(choices)} is valid for {method}")
    return sorted((b, _bits_per_element(method, b, dim)) for b in valid)


def _slots(cal: Calibration, method: str, value_method: str, choices: Sequence[int]) -> tuple:
    """(layer, K/V) slots, their allowed (bits, bits/element) and their element weights."""
    slots = [(i, kv) for i in range(len(cal.layers)) for kv in (0, 1)]
    costs = [_options(value_method if kv else method, choices, cal.head_dims[i][kv])
             for i, kv in slots]
    weights = np.array([cal.kv_heads[i] * cal.head_dims[i][kv] for i, kv in slots], float)
    return slots, costs, weights


def check_budget(cal: Calibration, method: str, value_method: str, target: float,
                 choices: Sequence[int] = DEFAULT_CHOICES) -> None:
    """Refuse a target the bit choices cannot reach on these layers (needs only their
    shapes, so a 4-token probe is enough: no one waits for a calibration to hear it)."""
    check_target(target)
    _budget_check(*_slots(cal, method, value_method, choices)[1:], target)


def _budget_check(costs: list, weights: np.ndarray, target: float) -> None:
    lo = sum(w * c[0][1] for w, c in zip(weights, costs)) / weights.sum()
    hi = sum(w * c[-1][1] for w, c in zip(weights, costs)) / weights.sum()
    if not lo - 1e-9 <= target <= hi + 1e-9:
        raise ValueError(f"--ratequant-target {target} is outside what the bit choices allow "
                         f"for this method: {lo:.3f} .. {hi:.3f} bits/element")


def _fill(levels: list, costs: list, weights: np.ndarray, target: float, gain) -> list:
    """Upgrade the slot with the best gain per extra bit until the budget is spent."""
    total = weights.sum()
    spent = sum(w * c[l][1] for w, c, l in zip(weights, costs, levels)) / total
    while True:
        best, best_score = None, -math.inf
        for j, (c, l) in enumerate(zip(costs, levels)):
            if l + 1 >= len(c):
                continue
            extra = weights[j] * (c[l + 1][1] - c[l][1]) / total
            if spent + extra > target + 1e-9:
                continue
            score = gain(j, l) / extra
            if score > best_score:
                best, best_score = j, score
        if best is None:
            return levels
        c, l = costs[best], levels[best]
        spent += weights[best] * (c[l + 1][1] - c[l][1]) / total
        levels[best] = l + 1


def allocate(cal: Calibration, method: str, target: float,
             choices: Sequence[int] = DEFAULT_CHOICES, solver: str = "greedy",
             value_method: Optional[str] = None) -> list:
    """Integer (key_bits, value_bits) per calibrated layer with mean bits/element <= target."""
    method = codecs.canonical_name(method)
    value_method = codecs.canonical_name(value_method or (
        method if method in codecs.VALUE_METHODS else "turboquant_mse"))
    slots, costs, weights = _slots(cal, method, value_method, choices)
    _budget_check(costs, weights, target)
    levels = [0] * len(slots)
    if solver == "greedy":
        def gain(j, l):
            i, kv = slots[j]
            d0 = cal.measured[costs[j][l][0]][i, kv]
            d1 = cal.measured[costs[j][l + 1][0]][i, kv]
            return max(d0 - d1, 0.0)
    elif solver == "waterfill":
        # Reverse water-filling on D(b) = s·2^(-β b), β fitted on the codec's own curve:
        # b_j = b̄ + (log2 s_j - mean log2 s) / β, rounded to the nearest allowed choice,
        # then the budget is met exactly by moving the cheapest steps of the same model.
        beta = fit_beta(method, choices, cal.head_dims[0][0])
        sens = np.array([max(cal.proxy[i, kv], 1e-12) for i, kv in slots])
        overhead = np.average([c[0][1] - c[0][0] for c in costs], weights=weights)
        ideal = (target - overhead) + (np.log2(sens) - np.log2(sens).mean()) / beta
        levels = [int(np.argmin([abs(b - ideal[j]) for b, _ in c])) for j, c in enumerate(costs)]

        def model_gain(j, l):
            b0, b1 = costs[j][l][0], costs[j][l + 1][0]
            return sens[j] * (2.0 ** (-beta * b0) - 2.0 ** (-beta * b1))

        def spent():
            return sum(w * c[l][1] for w, c, l in zip(weights, costs, levels)) / weights.sum()

        while spent() > target + 1e-9:  # drop the step that loses least per bit saved
            j = min((j for j in range(len(slots)) if levels[j] > 0),
                    key=lambda j: model_gain(j, levels[j] - 1)
                    / (costs[j][levels[j]][1] - costs[j][levels[j] - 1][1]))
            levels[j] -= 1
        gain = model_gain
    else:
        raise ValueError(f"unknown solver {solver!r}: use 'greedy' or 'waterfill'")
    levels = _fill(levels, costs, weights, target, gain)
    bits = [[0, 0] for _ in cal.layers]
    for (i, kv), c, l in zip(slots, costs, levels):
        bits[i][kv] = c[l][0]
    return [tuple(b) for b in bits]


def fit_beta(method: str, choices: Sequence[int], dim: int) -> float:
    """Slope of log2 distortion vs bits for the method, on random unit vectors."""
    x = mx.random.normal((2048, dim), key=mx.random.key(0))
    pts = []
    for b in choices:
        if b in codecs.bits_range(method) and b <= 4:
            c = codecs.make(method, b, dim)
            pts.append((b, math.log2(float(((x - c.decode(c.encode(x))) ** 2).sum() / (x * x).sum()))))
    if len(pts) < 2:
        return 2.0
    b, d = np.array(pts).T
    return float(-np.polyfit(b, d, 1)[0])


def mean_bits_per_element(cal: Calibration, method: str, value_method: str, bits: list) -> float:
    num = den = 0.0
    for i, (kb, vb) in enumerate(bits):
        for kv, (m, b) in enumerate(((method, kb), (value_method, vb))):
            w = cal.kv_heads[i] * cal.head_dims[i][kv]
            num += w * _bits_per_element(m, b, cal.head_dims[i][kv])
            den += w
    return num / den


def layer_bits_for_cache(cal: Calibration, bits: list) -> tuple:
    """Per cache-list index (key_bits, value_bits); layers not calibrated get None."""
    out = [None] * cal.n_cache_layers
    for i, b in zip(cal.layers, bits):
        out[i] = tuple(b)
    return tuple(out)


def format_table(bits: list) -> str:
    ks = " ".join(str(k) for k, _ in bits)
    vs = " ".join(str(v) for _, v in bits)
    return f"RateQuant bits per layer\n  K: {ks}\n  V: {vs}"


def save(path: str, cal: Calibration, config: TurboConfig, target: float, bits: list) -> None:
    data = {
        "format": "mlx_lm_turbo.ratequant", "target": target,
        "key_method": config.key_method, "value_method": config.value_method,
        "model": model_signature(cal.n_cache_layers, cal.layers, cal.kv_heads, cal.head_dims),
        "bits": [list(b) for b in bits],
        "bits_per_element": mean_bits_per_element(cal, config.key_method, config.value_method, bits),
        "calibration_seconds": cal.seconds,
    }
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as e:
        raise ValueError(f"cannot save the RateQuant allocation to {path}: "
                         f"{e.strerror or e}") from None


def load(path: str, signature: dict, config: TurboConfig) -> list:
    """Bits saved by ``save``; errors if they were made for another model or method."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read RateQuant allocation {path}: {e}") from None
    if data.get("format") != "mlx_lm_turbo.ratequant":
        raise ValueError(f"{path} is not a RateQuant allocation file")
    if data["model"] != signature:
        raise ValueError(f"{path} was made for another model (layers/heads/head dims differ): "
                         f"{data['model']} vs {signature}")
    if (data["key_method"], data["value_method"]) != (config.key_method, config.value_method):
        raise ValueError(f"{path} was made for {data['key_method']}/{data['value_method']}, "
                         f"not {config.key_method}/{config.value_method}")
    return [tuple(b) for b in data["bits"]]


def resolve(model, tokenizer, config: TurboConfig, verbose: bool = True,
            group=None) -> TurboConfig:
    """Calibrate and allocate (or load a saved allocation) for ``config``'s target:
    the returned config carries per-layer bits. With a distributed ``group`` (sharded
    model) every rank calibrates its share, the statistics are merged, and rank 0's
    allocation is broadcast (``merge_calibration``, ``computed_once``)."""
    import dataclasses

    lead = group is None or group.rank() == 0

    if config.ratequant_load:
        probe = calibrate(model, tokenizer, config.key_method, choices=(), max_tokens=4,
                          seed=config.seed, value_method=config.value_method)
        if group is not None:
            probe = merge_calibration(probe, model, group)
        signature = model_signature(probe.n_cache_layers, probe.layers, probe.kv_heads,
                                    probe.head_dims)
        bits = computed_once(
            lambda: load(config.ratequant_load, signature, config), len(probe.layers), group)
        cal = probe
    else:
        check_save_path(config.ratequant_save if lead else None)
        text = None
        if config.ratequant_calibration:
            try:
                text = Path(config.ratequant_calibration).read_text()
            except OSError as e:
                raise ValueError(f"cannot read --ratequant-calibration file: {e}") from None
        probe = calibrate(model, tokenizer, config.key_method, choices=(), max_tokens=4,
                          seed=config.seed, value_method=config.value_method)
        if group is not None:
            probe = merge_calibration(probe, model, group)
        check_budget(probe, config.key_method, config.value_method, config.ratequant_target)
        cal = calibrate(model, tokenizer, config.key_method, seed=config.seed, text=text,
                        value_method=config.value_method)
        if group is not None:
            cal = merge_calibration(cal, model, group)
        bits = computed_once(
            lambda: allocate(cal, config.key_method, config.ratequant_target,
                             solver=config.ratequant_solver, value_method=config.value_method),
            len(cal.layers), group)
    if verbose and lead:
        bpe = mean_bits_per_element(cal, config.key_method, config.value_method, bits)
        how = (f"loaded from {config.ratequant_load}" if config.ratequant_load else
               f"{config.ratequant_solver} solver, calibrated in {cal.seconds:.1f} s")
        print(f"{format_table(bits)}\n  {bpe:.3f} bits/element ({how})", flush=True)
    if config.ratequant_save and not config.ratequant_load and lead:
        save(config.ratequant_save, cal, config, config.ratequant_target, bits)
    return dataclasses.replace(config, layer_bits=layer_bits_for_cache(cal, bits))


# ---------------------------------------------------------------- over ranks (mlx.launch)
def merge_calibration(cal, model, group: mx.distributed.Group):
    """The whole model's RateQuant calibration from each rank's own.

    Per global layer, every rank adds its row (zeros for layers it does not hold) and a
    count of 1: statistics are averaged over the ranks holding the layer (tensor: all,
    with their own heads; pipeline: one, exact), KV heads are summed (the heads of a
    layer are split over its ranks).
    """
    offset = distributed.layer_offset(model)
    n = int(mx.distributed.all_max(mx.array(offset + cal.n_cache_layers), group=group).item())
    choices = sorted(cal.measured)
    table = np.zeros((n, 2 + 2 * len(choices) + 4), np.float32)
    for j, i in enumerate(cal.layers):
        measured = [x for b in choices for x in cal.measured[b][j]]
        table[offset + i] = [*cal.proxy[j], *measured, cal.kv_heads[j], *cal.head_dims[j], 1]
    total = np.array(mx.distributed.all_sum(mx.array(table), group=group))
    count = total[:, -1]
    rows = np.flatnonzero(count > 0)
    mean = total[rows] / count[rows, None]
    measured = {b: mean[:, 2 + 2 * k:4 + 2 * k].astype(np.float64)
                for k, b in enumerate(choices)}
    return Calibration(
        layers=[int(r) for r in rows],
        head_dims=[(int(round(k)), int(round(v))) for k, v in mean[:, -3:-1]],
        kv_heads=[int(round(h)) for h in total[rows, -4]],
        n_cache_layers=n, proxy=mean[:, :2].astype(np.float64), measured=measured,
        seconds=float(mx.distributed.all_max(mx.array(cal.seconds), group=group).item()))


def computed_once(allocate: Callable[[], list], n_layers: int,
                  group: Optional[mx.distributed.Group]) -> list:
    """``allocate()`` on rank 0 only, its (key_bits, value_bits) per layer broadcast to
    every rank (an all_sum of a table that is zero elsewhere). A ValueError on rank 0
    reaches every rank (rank 0 raises it, the others say so) instead of a hang."""
    if group is None:
        return allocate()
    table = np.zeros((n_layers + 1, 2), np.int32)  # row 0: ok flag
    error = None
    if group.rank() == 0:
        try:
            table[1:] = np.array(allocate(), np.int32).reshape(n_layers, 2)
            table[0, 0] = 1
        except ValueError as e:
            error = e
    total = np.array(mx.distributed.all_sum(mx.array(table), group=group))
    if error is not None:
        raise error
    if total[0, 0] != 1:
        raise ValueError("RateQuant allocation failed on rank 0 (its error says why)")
    return [(int(k), int(v)) for k, v in total[1:]]


def resolve_on_ranks(model, tokenizer, config: TurboConfig) -> TurboConfig:
    """After ``sharded_load``: resolve RateQuant over all ranks, check they agree."""
    group = distributed.world()
    if config.ratequant_target is not None and config.layer_bits is None:
        config = resolve(model, tokenizer, config, group=group)
    if group is not None:
        distributed.check_same_config(config, group)
    return config
