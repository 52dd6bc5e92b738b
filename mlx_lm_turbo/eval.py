"""Quality evidence for compressed KV caches: perplexity, greedy agreement, needle
retrieval, bytes held and decode speed, for fp16, mlx-lm's affine cache and ours.

    python -m mlx_lm_turbo.eval --configs fp16,affine4g64,mse4,rvq2,k4v2-mse

Every number goes through a real layer cache: prefill runs in blocks through the cache,
so every key and value the model attends to (the current block's included) went through
the codec. Configuration names:

    fp16                 mlx-lm KVCache holding float16 keys/values
    affine{b}g{g}        mlx-lm QuantizedKVCache(group_size=g, bits=b) from the first token
    {method}{b}          ours, keys and values at b bits (mse, rvq, polar; prod/qjl keys
                         pair with mse values at the same bits)
    k{kb}v{vb}-{method}  ours with separate key/value bits (k4v2-mse, k8v4-mse, ...);
    k{kb}v{vb}-{km}-{vm} separate key and value methods (k3v3-prod-mse)
    rq{t}                turboquant_mse with RateQuant bits at target t (rq2.9; calibrated
                         on the model when the run starts, --ratequant-target)
    ...-c                any of ours with centred keys only, no channel scales
                         (--no-kv-scale-keys; mse3-c)
    ...-raw              any of ours with neither (--no-kv-center-keys --no-kv-scale-keys)
    ...-w{n}             any of ours plus an fp16 window of the n newest tokens (mse3-w16)

The model runs in float32 on CPU (dequantized weights: much faster than fp16 there);
fp16 and affine caches store float16 (scales and biases included) exactly as they would
for a float16 model, so their bytes and rounding are the real ones.
"""

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

from .cache import TurboConfig, TurboKVCache, make_prompt_cache

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(it=None, **kwargs):
        return it if it is not None else _NullBar()

    class _NullBar:
        def update(self, n=1):
            pass

        def close(self):
            pass

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_MODEL = str(SHARED / "models" / "smollm2-135m-instruct-4bit")
DEFAULT_DATA = str(SHARED / "data")
DEFAULT_CONFIGS = (
    "fp16,"
    "affine8g64,affine8g32,affine4g64,affine4g32,affine3g64,affine3g32,affine2g64,affine2g32,"
    "mse4,mse3,mse2,mse1,rvq2,rvq1,polar4,polar3,prod4,prod3,"
    "k8v4-mse,k4v3-mse,k4v2-mse,k3v2-mse"
)
DEFAULT_NEEDLE_CONFIGS = "fp16,affine4g32,affine3g32,mse4,mse3,k4v2-mse,k3v2-mse,rvq1"
SHORT_METHODS = {"mse": "turboquant_mse", "prod": "turboquant_prod", "rvq": "turboquant_rvq",
                 "polar": "polar", "qjl": "qjl"}
KEY_ONLY = ("turboquant_prod", "qjl")


# ----------------------------------------------------------------------------- caches

class Float16KVCache(mlx_cache.KVCache):
    """A KVCache that stores float16 and hands float32 to a float32 model."""

    def update_and_fetch(self, keys, values):
        dtype = keys.dtype
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        return k.astype(dtype), v.astype(dtype)


class Float16QuantizedKVCache(mlx_cache.QuantizedKVCache):
    """mlx-lm's affine cache with float16 scales and biases (as for a float16 model)."""

    def update_and_fetch(self, keys, values):
        return super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))


@dataclass
class Spec:
    """One cache configuration under test."""

    name: str
    kind: str  # "fp16" | "affine" | "turbo"
    bits: int = 16
    group_size: int = 0
    turbo: Optional[TurboConfig] = None

    @property
    def family(self) -> str:
        if self.kind == "fp16":
            return "fp16"
        if self.kind == "affine":
            return f"mlx-lm affine g{self.group_size}"
        t = self.turbo
        km, vm = t.key_method.replace("turboquant_", ""), t.value_method.replace("turboquant_", "")
        stats = {(True, True): "", (True, False): " centred", (False, True): " scaled",
                 (False, False): " raw keys"}[(t.center_keys, t.scale_keys)]
        window = stats + (
            f" + fp16 window {t.fp16_window}" if t.fp16_window else "")
        if t.ratequant_target is not None:
            return f"RateQuant ({km})" + window
        if self.name.startswith("k") and re.match(r"k\d+v\d+", self.name):
            return (f"K/V split ({km}/{vm})" if km != vm else f"K/V split ({km})") + window
        return km + window

    def describe(self) -> str:
        if self.kind == "fp16":
            return "fp16 KVCache"
        if self.kind == "affine":
            return f"mlx-lm affine {self.bits}b g{self.group_size}"
        return self.turbo.describe()


def parse_spec(name: str, seed: int = 0) -> Spec:
    """Parse a configuration name (see the module docstring)."""
    n = name.strip().lower()
    m = re.fullmatch(r"(.+)-w(\d+)", n)
    if m:
        base = parse_spec(m.group(1), seed)
        if base.kind != "turbo":
            raise ValueError(f"{name}: an fp16 window (-w{{n}}) applies to our methods only")
        return Spec(n, "turbo", turbo=replace(base.turbo, fp16_window=int(m.group(2))))
    m = re.fullmatch(r"(.+)-(c|raw)", n)
    if m:
        base = parse_spec(m.group(1), seed)
        if base.kind != "turbo":
            raise ValueError(f"{name}: key statistics (-c, -raw) apply to our methods only")
        return Spec(n, "turbo", turbo=replace(base.turbo, center_keys=m.group(2) == "c",
                                              scale_keys=False))
    if n in ("fp16", "fp"):
        return Spec(n, "fp16")
    m = re.fullmatch(r"affine(\d)g(\d+)", n)
    if m:
        bits, group = int(m.group(1)), int(m.group(2))
        if bits not in (2, 3, 4, 5, 6, 8) or group not in (32, 64, 128):
            raise ValueError(f"{name}: affine needs bits in 2,3,4,5,6,8 and group 32/64/128")
        return Spec(n, "affine", bits, group)
    m = re.fullmatch(r"rq(\d+(?:\.\d+)?)", n)
    if m:
        return Spec(n, "turbo", turbo=TurboConfig("turboquant_mse", 4, seed=seed,
                                                  ratequant_target=float(m.group(1))))
    m = re.fullmatch(r"k(\d)v(\d)-([a-z_]+)(?:-([a-z_]+))?", n)
    if m:
        kb, vb, km, vm = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        km = SHORT_METHODS.get(km, km)
        vm = SHORT_METHODS.get(vm, vm) if vm else ("turboquant_mse" if km in KEY_ONLY else km)
        return Spec(n, "turbo", turbo=TurboConfig(km, kb, vm, vb, seed=seed))
    m = re.fullmatch(r"([a-z_]+?)(\d)", n)
    if m:
        method, bits = SHORT_METHODS.get(m.group(1), m.group(1)), int(m.group(2))
        vm = "turboquant_mse" if method in KEY_ONLY else method
        return Spec(n, "turbo", turbo=TurboConfig(method, bits, vm, bits, seed=seed))
    raise ValueError(
        f"unknown configuration {name!r}: use fp16, affine{{b}}g{{g}}, "
        "{mse,rvq,polar,prod,qjl}{b}, rq{target} or k{kb}v{vb}-{method}[-{value method}], "
        "optionally followed by -c (centred keys) and -w{n} (fp16 window)")


def make_cache(model: nn.Module, spec: Spec) -> list:
    """A fresh prompt cache for ``spec``; only plain KVCache layers are replaced."""
    if spec.kind == "turbo":
        return make_prompt_cache(model, spec.turbo)
    caches = mlx_cache.make_prompt_cache(model)
    for i, c in enumerate(caches):
        if type(c) is mlx_cache.KVCache:
            caches[i] = (Float16KVCache() if spec.kind == "fp16"
                         else Float16QuantizedKVCache(spec.group_size, spec.bits))
    return caches


def route_attention() -> str:
    """Send attention over TurboKVCache layers to our code. Uses ``mlx_lm_turbo.patch``
    when present; otherwise patches the loaded mlx_lm.models modules here."""
    try:
        from . import patch  # noqa: F401
    except ImportError:
        patch = None
    if patch is not None and hasattr(patch, "apply"):
        patch.apply()
        return "mlx_lm_turbo.patch.apply()"
    import sys

    from mlx_lm.models import base

    from .attention import turbo_attention

    original = base.scaled_dot_product_attention
    if getattr(original, "_turbo_eval", False):
        return "local patch"

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, TurboKVCache):
            return turbo_attention(queries, keys, values, cache, scale, mask, sinks)
        return original(queries, keys, values, cache, scale, mask, sinks)

    sdpa._turbo_eval = True
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("mlx_lm.models") and getattr(
                mod, "scaled_dot_product_attention", None) is original:
            mod.scaled_dot_product_attention = sdpa
    return "local patch"


def cache_bytes(caches: list) -> int:
    return sum(c.nbytes for c in caches if not c.empty())


def cache_elements(caches: list) -> int:
    """Number of K and V scalars the caches stand for (tokens x heads x dims)."""
    total = 0
    for c in caches:
        if c.empty():
            continue
        if isinstance(c, TurboKVCache):
            b, h = next(iter(c.keys.values())).shape[:2]
            total += b * h * c.offset * (c.key_codec.dim + c.value_codec.dim)
        elif isinstance(c, mlx_cache.QuantizedKVCache):
            b, h = c.keys[0].shape[:2]  # head dim = groups x group size
            dk, dv = (x[1].shape[-1] * c.group_size for x in (c.keys, c.values))
            total += b * h * c.offset * (dk + dv)
        else:
            b, h, _, dk = c.keys.shape
            total += b * h * c.offset * (dk + c.values.shape[-1])
    return total


def nominal_bits(caches: list) -> float:
    """Bits/element the codecs declare (TurboKVCache.bits_per_element), element-weighted."""
    turbo = [c for c in caches if isinstance(c, TurboKVCache) and not c.empty()]
    if not turbo:
        return float("nan")
    w = [c.offset * (c.key_codec.dim + c.value_codec.dim) for c in turbo]
    return sum(c.bits_per_element * x for c, x in zip(turbo, w)) / sum(w)


# ----------------------------------------------------------------------------- model + data

def load_model(path: str):
    """Load with mlx-lm, dequantize the weights and run in float32 (fast on CPU)."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(path)
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model, tokenizer


def wikitext_windows(tokenizer, data_dir: str, n_windows: int, window: int) -> list:
    """The first ``n_windows`` non-overlapping windows of the WikiText-2 raw test split
    (0 = all of it). Only as much text as needed is tokenized."""
    text = (Path(data_dir) / "wikitext2_test.raw").read_text()
    if n_windows > 0:
        need, chars = n_windows * window, 6 * n_windows * window
        while True:
            ids = tokenizer.encode(text[:chars])
            if len(ids) > need or chars >= len(text):
                break
            chars *= 2
    else:
        ids = tokenizer.encode(text)
    count = len(ids) // window if n_windows <= 0 else min(n_windows, len(ids) // window)
    return [mx.array(ids[i * window:(i + 1) * window]) for i in range(count)]


def block_prefill(model: nn.Module, tokens: mx.array, cache: list, block: int,
                  on_logits: Optional[Callable] = None) -> mx.array:
    """Run ``tokens`` (1-D) through ``cache`` in blocks; ``on_logits(start, logits)`` sees
    each block's logits. Returns the last block's logits. Without ``on_logits`` only the
    last block goes through the output head (the others run the backbone only)."""
    logits = None
    backbone = getattr(model, "model", None) if on_logits is None else None
    for s in range(0, tokens.shape[0], block):
        x = tokens[None, s:s + block]
        if backbone is not None and s + block < tokens.shape[0]:
            mx.eval(backbone(x, cache=cache))
            continue
        logits = model(x, cache=cache)
        if on_logits is not None:
            on_logits(s, logits)
        mx.eval(logits)
    return logits


def window_nll(model: nn.Module, tokens: mx.array, spec: Spec, block: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[1:] given the prefix, with prefill in
    blocks through a fresh ``spec`` cache."""
    cache = make_cache(model, spec)
    total = [0.0, 0]

    def score(start: int, logits: mx.array):
        n = logits.shape[1]
        targets = tokens[start + 1:start + 1 + n]
        lg = logits[0, :targets.shape[0]].astype(mx.float32)
        nll = mx.logsumexp(lg, axis=-1) - mx.take_along_axis(lg, targets[:, None], -1)[:, 0]
        total[0] += nll.sum().item()
        total[1] += targets.shape[0]

    block_prefill(model, tokens, cache, block, score)
    return total[0], total[1]


def perplexity(model: nn.Module, windows: list, spec: Spec, block: int) -> float:
    nll, n = 0.0, 0
    for w in windows:
        a, b = window_nll(model, w, spec, block)
        nll, n = nll + a, n + b
    return math.exp(nll / n)


def attention_path_check(spec: Spec, keys: mx.array, values: mx.array, queries: mx.array,
                         block: int) -> dict:
    """One layer's cache + attention on identical inputs: block updates with a causal
    mask vs one token at a time. Isolates the cache path from the model's float noise."""
    from mlx_lm.models.base import scaled_dot_product_attention as sdpa

    scale = keys.shape[-1] ** -0.5
    c1, c2 = make_cache_layer(spec), make_cache_layer(spec)
    by_block, by_token = [], []
    for s in range(0, keys.shape[2], block):
        k, v = c1.update_and_fetch(keys[:, :, s:s + block], values[:, :, s:s + block])
        by_block.append(sdpa(queries[:, :, s:s + block], k, v, c1, scale=scale, mask="causal"))
    for i in range(keys.shape[2]):
        k, v = c2.update_and_fetch(keys[:, :, i:i + 1], values[:, :, i:i + 1])
        by_token.append(sdpa(queries[:, :, i:i + 1], k, v, c2, scale=scale, mask=None))
    a, b = mx.concatenate(by_block, axis=2), mx.concatenate(by_token, axis=2)
    return {"max_abs_diff": mx.abs(a - b).max().item(),
            "max_abs_output": mx.abs(b).max().item()}


def make_cache_layer(spec: Spec, layer: int = 0):
    if spec.kind == "turbo":
        return TurboKVCache.from_config(spec.turbo, layer)
    if spec.kind == "fp16":
        return Float16KVCache()
    return Float16QuantizedKVCache(spec.group_size, spec.bits)


def prefill_vs_decode(model: nn.Module, tokens: mx.array, spec: Spec, block: int) -> dict:
    """Block prefill vs token-by-token decode through the same kind of cache: logits,
    argmax and perplexity of the whole model, plus the single-layer attention check on
    the layer-0 keys/values of ``tokens``."""
    blocks = []
    block_prefill(model, tokens, make_cache(model, spec), block,
                  lambda s, lg: blocks.append(lg[0]))
    by_block = mx.concatenate(blocks, axis=0)
    cache = make_cache(model, spec)
    steps = []
    for i in range(tokens.shape[0]):
        lg = model(tokens[None, i:i + 1], cache=cache)
        mx.eval(lg)
        steps.append(lg[0])
    by_token = mx.concatenate(steps, axis=0)

    def ppl(lg):
        t = tokens[1:]
        lg = lg[:-1]
        return math.exp((mx.logsumexp(lg, -1) - mx.take_along_axis(
            lg, t[:, None], -1)[:, 0]).mean().item())

    diff = mx.abs(by_block - by_token)
    agree = (mx.argmax(by_block, -1) == mx.argmax(by_token, -1)).astype(mx.float32).mean()
    k, v = capture_kv(model, tokens, block)[0]
    h = model.args.num_attention_heads // k.shape[1] if hasattr(model, "args") else 1
    q = mx.repeat(k, h, axis=1) if h > 1 else k  # real key vectors as queries
    layer = attention_path_check(spec, k, v, q, block)
    return {"config": spec.name, "tokens": int(tokens.shape[0]), "block": block,
            "max_abs_logit_diff": diff.max().item(),
            "max_logit_magnitude": mx.abs(by_token).max().item(),
            "argmax_agreement": agree.item(),
            "ppl_block": ppl(by_block), "ppl_token": ppl(by_token),
            "layer0_attention_max_abs_diff": layer["max_abs_diff"],
            "layer0_attention_max_abs_output": layer["max_abs_output"]}


# ----------------------------------------------------------------------------- generation

def greedy(model: nn.Module, prompt: list, spec: Spec, max_tokens: int,
           eos: set, block: int = 256) -> tuple[list, float, int]:
    """Greedy continuation through a fresh ``spec`` cache. Returns (tokens, decode
    seconds, decode steps); stops at an EOS token (included)."""
    cache = make_cache(model, spec)
    logits = block_prefill(model, mx.array(prompt), cache, block)
    y = mx.argmax(logits[0, -1], axis=-1)
    mx.eval(y)
    out = [y.item()]
    tic, steps = time.perf_counter(), 0
    while len(out) < max_tokens and out[-1] not in eos:
        logits = model(y.reshape(1, 1), cache=cache)
        y = mx.argmax(logits[0, -1], axis=-1)
        mx.eval(y)
        out.append(y.item())
        steps += 1
    return out, time.perf_counter() - tic, steps


def chat_prompts(tokenizer, data_dir: str, n: int) -> list:
    """MT-Bench first turns with the chat template applied, as token lists."""
    rows = [json.loads(line) for line in
            (Path(data_dir) / "prompts_mt_bench.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for r in rows[:n]:
        msgs = [{"role": "user", "content": r["turns"][0]}]
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
    return out


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


NEEDLE = "The secret passphrase is {word}."
PASSPHRASES = ["amber falcon", "silver lantern", "crimson orchard", "velvet compass",
               "copper meadow", "indigo harbor", "golden thistle", "marble sparrow",
               "scarlet glacier", "emerald beacon"]
QUESTION = ("What is the secret passphrase mentioned in the text above? "
            "Answer with the passphrase only.")
ANSWER_PREFIX = "The secret passphrase is"  # the assistant turn starts with it


def haystack_text(data_dir: str) -> str:
    text = (Path(data_dir) / "book_war_and_peace.txt").read_text()
    start = text.find("CHAPTER I\n\n\"Well, Prince")
    return text[start if start > 0 else 0:]


def needle_prompt(tokenizer, hay_ids: list, length: int, depth: float, word: str) -> list:
    """Chat prompt of about ``length`` tokens: book text with the needle sentence at
    ``depth`` (0 = start, 1 = end of the text), then the question."""
    needle = " " + NEEDLE.format(word=word) + " "
    overhead = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": needle + "\n\n" + QUESTION}], add_generation_prompt=True))
    body = hay_ids[:max(length - overhead, 16)]
    cut = int(round(depth * len(body)))
    before, after = tokenizer.decode(body[:cut]), tokenizer.decode(body[cut:])
    # move the cut to the end of the sentence it falls in, if one ends nearby
    m = re.search(r"[.!?][\"']?\s", after[:400])
    if m and depth < 1.0:
        before, after = before + after[:m.end()], after[m.end():]
    content = before.rstrip() + needle + after.lstrip() + "\n\n" + QUESTION
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True)
    return list(ids) + tokenizer.encode(ANSWER_PREFIX)


def needle_test(model: nn.Module, tokenizer, spec: Spec, prompts: list,
                max_tokens: int, block: int, eos: set) -> dict:
    hits, answers = [], []
    for (length, depth, word, ids) in prompts:
        toks, _, _ = greedy(model, ids, spec, max_tokens, eos, block)
        answer = tokenizer.decode([t for t in toks if t not in eos])
        ok = word.lower() in answer.lower()
        hits.append(ok)
        answers.append({"length": length, "tokens": len(ids), "depth": depth,
                        "passphrase": word, "answer": answer, "found": ok})
    by_len = {}
    for a in answers:
        by_len.setdefault(str(a["length"]), []).append(a["found"])
    return {"rate": sum(hits) / max(len(hits), 1),
            "rate_by_length": {k: sum(v) / len(v) for k, v in by_len.items()},
            "trials": answers}


class RecordingKVCache(mlx_cache.KVCache):
    """A KVCache that also keeps every key/value block it is given (float32)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def update_and_fetch(self, keys, values):
        self.seen.append((keys, values))
        return super().update_and_fetch(keys, values)


def capture_kv(model: nn.Module, tokens: mx.array, block: int) -> list:
    """The keys/values every layer produces on ``tokens`` (uncompressed model run);
    one (keys, values) pair per layer."""
    caches = mlx_cache.make_prompt_cache(model)
    for i, c in enumerate(caches):
        if type(c) is mlx_cache.KVCache:
            caches[i] = RecordingKVCache()
    block_prefill(model, tokens, caches, block)
    out = []
    for c in caches:
        if isinstance(c, RecordingKVCache):
            out.append((mx.concatenate([k for k, _ in c.seen], axis=2),
                        mx.concatenate([v for _, v in c.seen], axis=2)))
        else:
            out.append(None)
    mx.eval(out)
    return out


def kv_bytes_and_speed(model: nn.Module, captured: list, spec: Spec, block: int,
                       decode_steps: int) -> dict:
    """Fill a fresh ``spec`` cache with the captured keys/values in ``block``-token
    updates, read the bytes it holds (cache.nbytes) and the bits/element they amount
    to, then time greedy decode steps of the model at that context."""
    cache = make_cache(model, spec)
    n = 0
    for c, kv in zip(cache, captured):
        if kv is None:
            continue
        k, v = kv
        n = k.shape[2]
        for s in range(0, n, block):
            mx.eval(c.update_and_fetch(k[:, :, s:s + block], v[:, :, s:s + block]))
    held, elts = cache_bytes(cache), cache_elements(cache)
    y = mx.array([[0]])
    mx.eval(model(y, cache=cache))  # warm-up step
    tic = time.perf_counter()
    for _ in range(decode_steps):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(y)
    decode_s = time.perf_counter() - tic
    return {"context": n, "kv_bytes": held,
            "bits_per_element": 8 * held / max(elts, 1),
            "nominal_bits_per_element": nominal_bits(cache) if spec.kind == "turbo"
            else (16.0 if spec.kind == "fp16" else spec.bits + 32 / spec.group_size),
            "decode_tok_s": decode_steps / decode_s}


# ----------------------------------------------------------------------------- report

def _fmt(x, spec="{:.2f}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return spec.format(x)


def markdown_table(results: dict) -> str:
    rows = results["configs"]
    base = next((r for r in rows if r["name"] == "fp16"), None)
    ppl0 = base and base.get("ppl")
    speed0 = base and base.get("kv", {}).get("decode_tok_s")
    lines = ["| config | cache | bits/elt | KV MiB @{} | ppl | vs fp16 | greedy identical | "
             "mean match | needle | decode tok/s (x fp16) |".format(results["settings"]["kv_tokens"]),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    # Speeds of rows kept from an earlier run (--resume) were measured beside another
    # run's fp16: no ratio against this run's.
    earlier = set(results["settings"].get("resumed_rows", [])) - {"fp16"}
    for r in rows:
        kv = r.get("kv", {})
        ppl = r.get("ppl")
        rel = f"{100 * (ppl / ppl0 - 1):+.2f}%" if ppl and ppl0 and r["name"] != "fp16" else "–"
        g = r.get("greedy")
        agree = f"{100 * g['agreement']:.0f}%" if g else "–"
        match = f"{g['mean_match']:.1f}/{g['mean_len']:.1f}" if g else "–"
        nd = r.get("needle")
        needle = f"{100 * nd['rate']:.0f}%" if nd else "–"
        if nd and len(nd.get("rate_by_length", {})) > 1:   # per haystack length
            needle += " (" + " / ".join(f"{100 * v:.0f}" for v in nd["rate_by_length"].values()) + ")"
        sp = kv.get("decode_tok_s")
        if kv.get("fp16_decode_tok_s"):   # merged from a parallel run: its own fp16
            speed = f"{sp:.1f} ({sp / kv['fp16_decode_tok_s']:.2f}x)"
        elif r["name"] in earlier:
            speed = f"{_fmt(sp, '{:.1f}')} (earlier run)"
        else:
            speed = f"{sp:.1f} ({sp / speed0:.2f}x)" if sp and speed0 else _fmt(sp, "{:.1f}")
        lines.append(
            f"| {r['name']} | {r['describe']} | {_fmt(kv.get('bits_per_element'), '{:.3f}')} | "
            f"{_fmt(kv.get('kv_bytes') and kv['kv_bytes'] / 2**20, '{:.2f}')} | "
            f"{_fmt(ppl, '{:.3f}')} | {rel} | {agree} | {match} | {needle} | {speed} |")
    return "\n".join(lines)


def targets(results: dict) -> list:
    """The issue's targets, evaluated on the measured rows (a miss is reported)."""
    rows = [r for r in results["configs"] if r.get("ppl") and r.get("kv")]
    base = next((r for r in rows if r["name"] == "fp16"), None)
    if base is None:
        return ["fp16 row missing: targets not evaluated"]
    p0 = base["ppl"]
    out = []

    def bits(r):
        return r["kv"]["bits_per_element"]

    def best_under(limit, kinds=("turbo",)):
        c = [r for r in rows if r["kind"] in kinds and bits(r) <= limit + 1e-9]
        return min(c, key=lambda r: r["ppl"]) if c else None

    for limit, tol in ((3.2, 1.0), (2.2, 5.0)):
        b = best_under(limit, ("turbo", "affine"))
        if b is None:
            out.append(f"≤{limit} bits/elt within +{tol:g}%: no configuration measured")
            continue
        d = 100 * (b["ppl"] / p0 - 1)
        out.append(f"≤{limit} bits/elt within +{tol:g}% of fp16: best is {b['name']} "
                   f"({bits(b):.3f} bits, ppl {b['ppl']:.3f}, {d:+.2f}%) → "
                   f"{'MET' if d <= tol else 'MISSED'}")
    wins, losses = [], []
    for a in (r for r in rows if r["kind"] == "affine"):
        b = best_under(bits(a))
        if b is None:
            continue
        (wins if b["ppl"] < a["ppl"] else losses).append(
            f"{a['name']} ({bits(a):.2f} b, {a['ppl']:.2f}) vs {b['name']} "
            f"({bits(b):.2f} b, {b['ppl']:.2f})")
    out.append(f"ours beats affine at equal or fewer bits: {len(wins)}/{len(wins) + len(losses)}"
               + (f"; losses: {'; '.join(losses)}" if losses else ""))
    g_rows = [r for r in rows if r.get("greedy") and r["kind"] == "turbo"]
    for target_bits, tol, goal in ((4.0, 0.5, 0.90), (3.0, 0.5, 0.75)):
        c = [r for r in g_rows if abs(bits(r) - target_bits) <= tol]
        if not c:
            out.append(f"greedy agreement at ~{target_bits:g} bits: no configuration measured")
            continue
        b = max(c, key=lambda r: r["greedy"]["agreement"])
        a = b["greedy"]["agreement"]
        out.append(f"greedy agreement ≥{100 * goal:.0f}% at ~{target_bits:g} bits: best "
                   f"{b['name']} ({bits(b):.2f} b) {100 * a:.0f}% → "
                   f"{'MET' if a >= goal else 'MISSED'}")
    nb = base.get("needle")
    n3 = [r for r in rows if r.get("needle") and r["kind"] == "turbo"
          and abs(bits(r) - 3.0) <= 0.5]
    if nb and n3:
        b = max(n3, key=lambda r: r["needle"]["rate"])
        ok = b["needle"]["rate"] >= nb["rate"]
        out.append(f"needle at ~3 bits equal to fp16 ({100 * nb['rate']:.0f}%): best "
                   f"{b['name']} ({bits(b):.2f} b) {100 * b['needle']['rate']:.0f}% → "
                   f"{'MET' if ok else 'MISSED'}")
    return out


def plot(results: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG (pip install matplotlib)"
    rows = [r for r in results["configs"] if r.get("ppl") and r.get("kv")]
    fams = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab20").colors   # one colour per family (the default cycle has 10)
    for i, (fam, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r["kv"]["bits_per_element"])
        x = [r["kv"]["bits_per_element"] for r in rs]
        y = [r["ppl"] for r in rs]
        style = "--s" if fam.startswith("mlx-lm") else ("*" if fam == "fp16" else
                                                          ("D" if "split" in fam else "-o"))
        ax.plot(x, y, style, label=fam, markersize=10 if fam == "fp16" else 5,
                color=colors[i % len(colors)])
        if "split" in fam:
            for r in rs:
                ax.annotate(r["name"].split("-")[0], (r["kv"]["bits_per_element"], r["ppl"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    base = next((r for r in rows if r["name"] == "fp16"), None)
    if base:
        ax.axhline(base["ppl"], color="gray", lw=0.8)
        ax.axhline(base["ppl"] * 1.01, color="gray", lw=0.6, ls=":")
        ax.axhline(base["ppl"] * 1.05, color="gray", lw=0.6, ls=":")
    ax.set_yscale("log")
    if base:  # keep the interesting range readable; label what falls off the top
        top = min(max(r["ppl"] for r in rows) * 1.05, base["ppl"] * 3)
        ax.set_ylim(base["ppl"] * 0.97, top)
        for r in rows:
            if r["ppl"] > top:
                ax.annotate(f"{r['name']}: {r['ppl']:.0f} ↑", (r["kv"]["bits_per_element"], top),
                            fontsize=7, xytext=(0, -12), textcoords="offset points",
                            ha="center", rotation=90, va="top")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.set_xlabel("bits per K/V element (metadata counted, from cache.nbytes)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    s = results["settings"]
    ax.set_title(f"{Path(s['model']).name}: {s['ppl_windows']}×{s['window']} tokens; "
                 "dotted: fp16 +1%, +5%", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_markdown(results: dict, path: Path, command: str) -> str:
    s = results["settings"]
    eq = results.get("prefill_vs_decode", [])
    parts = [
        f"# KV cache quality: {Path(s['model']).name}",
        "",
        "Generated by `mlx_lm_turbo.eval` (do not edit by hand; re-run the command).",
        "",
        "```",
        *results.get("commands", [command]),
        "```",
        "",
        f"Environment: mlx {s.get('mlx', '?')}, mlx-lm {s.get('mlx_lm', '?')}, device "
        f"{s.get('device', '?')}. Run from the repository root with `PYTHONPATH=.` (on the "
        "2-core x86 CPU used here also `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/"
        "libblas.so.3` for a fast BLAS). Defaults (no flags) are the issue's full protocol: "
        "2 windows, 80 prompts x 128 tokens, needle at 2k/4k/8k for every config, all "
        "configurations. `--quick` is the tiny slice of `tests/test_eval.py`; "
        "`--resume FILE` keeps rows of an earlier run; `--from-json FILE` re-writes this report."
        + (f" Rows kept from an earlier run with the same settings: "
           f"{', '.join(s['resumed_rows'])} (its decode speed re-measured in this run)."
           if s.get("resumed_rows") else ""),
        "",
        f"Protocol: the model runs in float32 (weights dequantized) on {s.get('device', '?')}; "
        "fp16 and mlx-lm affine "
        "caches store float16 (scales/biases included), ours store packed codes plus float16 "
        "scalars. Prefill runs in blocks of "
        f"{s['block']} tokens through the real cache, so every attended key/value went through "
        f"the codec, the current block's included. Attention routing: {s['routing']}.",
        "",
        f"- perplexity: WikiText-2 raw test, first {s['ppl_windows']} window(s) of "
        f"{s['window']} tokens ({s['ppl_tokens']} scored tokens), each window from an empty cache;",
        f"- greedy: first {s['prompts']} MT-Bench first-turn prompts (chat template), run for "
        f"{'all configs' if s['greedy_configs'] == s['configs'] else ', '.join(s['greedy_configs'])}, "
        f"up to {s['max_tokens']} greedy tokens (stop at EOS); agreement = continuation identical "
        "to fp16's; mean match = mean common-prefix length / mean fp16 length;",
        f"- needle: passphrase sentence at {s['needle_depths']} depths in War and Peace at "
        f"{s['needle_lengths']} tokens, greedy answer (≤{s['needle_max_tokens']} tokens) must "
        f"contain it (the assistant turn is primed with '{ANSWER_PREFIX}'); run for: {', '.join(s['needle_configs']) or 'none'};",
        f"- bits/elt and KV MiB: `cache.nbytes` of all layers (K+V) after the keys/values of a "
        f"{s['kv_tokens']}-token WikiText-2 prefill (captured once, uncompressed) were fed "
        f"to the cache in {s['block']}-token updates; decode tok/s: "
        f"{s['decode_steps']} greedy steps of the model on that {s['kv_tokens']}-token cache, "
        "same run, relative to fp16 " + (
            "(GPU: our caches decode through the fused kernels; at this model size a decode "
            "step costs about one kernel launch per op, so speed tracks the op count)."
            if "gpu" in str(s.get("device", "")) else
            "(shared 2-core CPU: expect noise; on the CPU the reference attention path "
            "dequantizes the whole cache per step)."),
        "",
        markdown_table(results),
        "",
    ]
    if len(s["needle_lengths"]) > 1:
        parts[-1:-1] = [f"Needle: overall rate (rate at {' / '.join(map(str, s['needle_lengths']))} "
                        "tokens)."]
    if any(r.get("kv", {}).get("fp16_decode_tok_s") for r in results["configs"]):
        parts[-1:-1] = ["Rows merged from runs made side by side: each speed ratio is against "
                        "the fp16 speed measured in that row's own run (the fp16 row shows "
                        "the first file's)."]
    if eq:
        exact = all(e["layer0_attention_max_abs_diff"] <= 1e-3 * e["layer0_attention_max_abs_output"]
                    for e in eq)
        parts += [
            "Block prefill vs token-by-token decode through the cache (first tokens of window 1). "
            "Single layer on identical inputs (the model's layer-0 keys/values, keys as queries): "
            + ("the two paths agree to float noise. " if exact else
               "**the two paths DIFFER beyond float noise: the stored codes depend on how the "
               "prompt is split into blocks.** ")
            + "Whole model: float32 rounding differs between a block matmul and a one-row "
            "matmul; one ulp can move a coordinate across a quantizer boundary and the flip "
            "grows through the layers, so whole-model logits differ more than fp16's would; "
            "compare the two perplexities.", "",
            "| config | tokens | block | 1 layer: max abs Δout (max abs out) | model: max abs "
            "Δlogit (max abs logit) | argmax agreement | ppl block / token |",
            "|---|---:|---:|---:|---:|---:|---:|"]
        for e in eq:
            parts.append(
                f"| {e['config']} | {e['tokens']} | {e['block']} | "
                f"{e['layer0_attention_max_abs_diff']:.1e} ({e['layer0_attention_max_abs_output']:.2f}) | "
                f"{e['max_abs_logit_diff']:.2e} ({e['max_logit_magnitude']:.1f}) | "
                f"{100 * e['argmax_agreement']:.1f}% | {e['ppl_block']:.3f} / {e['ppl_token']:.3f} |")
        parts.append("")
    parts += ["Targets (issue 5):", ""] + [f"- {t}" for t in results.get("targets", [])] + [""]
    if results.get("png"):
        parts += [f"![perplexity vs bits/element]({results['png']})", ""]
    if results.get("conclusion"):
        parts += ["## Conclusion", "", results["conclusion"], ""]
    parts += [f"Run time, summed over the configurations (parallel runs overlap): "
              f"{results['wall_s'] / 60:.1f} min.", ""]
    text = "\n".join(parts)
    path.write_text(text)
    return text


def conclusion(results: dict) -> str:
    """A plain paragraph derived from the numbers (re-generated on every run)."""
    rows = [r for r in results["configs"] if r.get("ppl") and r.get("kv")]
    base = next((r for r in rows if r["name"] == "fp16"), None)
    if base is None:
        return ""
    p0 = base["ppl"]
    ours = [r for r in rows if r["kind"] == "turbo"]
    aff = [r for r in rows if r["kind"] == "affine"]

    def pct(r):
        return f"{100 * (r['ppl'] / p0 - 1):+.1f}%"

    out = []
    for limit in (6.5, 4.5, 3.5, 2.6):
        c = [r for r in ours if r["kv"]["bits_per_element"] <= limit]
        a = [r for r in aff if r["kv"]["bits_per_element"] <= limit]
        if not c:
            continue
        b = min(c, key=lambda r: r["ppl"])
        s = (f"with at most {limit} bits/element use {b['name']} "
             f"({b['kv']['bits_per_element']:.2f} b, perplexity {pct(b)}")
        if b.get("greedy"):
            s += (f", {100 * b['greedy']['agreement']:.0f}% of greedy continuations identical, "
                  f"{b['greedy']['mean_match']:.0f}/{b['greedy']['mean_len']:.0f} tokens matching")
        s += ")"
        if a:
            ba = min(a, key=lambda r: r["ppl"])
            s += (f"; mlx-lm's best there is {ba['name']} "
                  f"({ba['kv']['bits_per_element']:.2f} b, {pct(ba)})")
        else:
            s += "; mlx-lm's affine cache has no setting that small"
        out.append(s)
    if not out:
        return ""
    met = sum("→ MET" in t for t in results.get("targets", []))
    missed = sum("→ MISSED" in t for t in results.get("targets", []))
    text = ("Measured on this model (automatic summary, re-written on every run): "
            + "; ".join(out) + ". ")
    if met or missed:
        text += (f"{met} of the issue's targets are met and {missed} missed (list above). ")
    return text


# ----------------------------------------------------------------------------- driver

def _mlx_lm_version() -> str:
    try:
        import mlx_lm

        return mlx_lm.__version__
    except Exception:
        return "?"


def load_results(paths: str) -> dict:
    """Results JSON, or a comma list of them merged (runs made in parallel with the same
    settings): the first file holding a config wins; checks and commands are pooled."""
    merged = None
    files = [f for f in paths.split(",") if f]
    for f in files:
        prev = json.loads(Path(f).read_text())
        prev.setdefault("prefill_vs_decode", [])
        prev["commands"] = prev.get("commands", [prev.get("command", "")])
        base = next((r for r in prev["configs"] if r["name"] == "fp16"), None)
        if len(files) > 1 and base and base.get("kv", {}).get("decode_tok_s"):
            # Speeds only compare within one run: keep each row's own run's fp16 speed.
            for r in prev["configs"]:
                if r["name"] != "fp16" and r.get("kv"):
                    r["kv"].setdefault("fp16_decode_tok_s", base["kv"]["decode_tok_s"])
        if merged is None:
            merged = prev
            continue
        names = {r["name"] for r in merged["configs"]}
        merged["configs"] += [r for r in prev["configs"] if r["name"] not in names]
        seen = {e["config"] for e in merged["prefill_vs_decode"]}
        merged["prefill_vs_decode"] += [e for e in prev["prefill_vs_decode"]
                                        if e["config"] not in seen]
        merged["commands"] += [c for c in prev["commands"] if c not in merged["commands"]]
    if merged is None:
        raise ValueError(f"no results file in {paths!r}")
    s = merged["settings"]
    rows = merged["configs"]
    for r in rows:   # labels follow the current code (families group the plot's lines)
        try:
            spec = parse_spec(r["name"])
        except ValueError:
            continue
        r["family"], r["describe"] = spec.family, spec.describe()
    s["configs"] = [r["name"] for r in rows]
    s["greedy_configs"] = [r["name"] for r in rows if r.get("greedy")]
    s["needle_configs"] = [r["name"] for r in rows if r.get("needle")]
    merged["wall_s"] = sum(r.get("seconds", 0) for r in rows)
    return merged


def evaluate(args: argparse.Namespace, command: str = "") -> dict:
    t_start = time.perf_counter()
    specs = [parse_spec(n, args.seed) for n in args.configs.split(",") if n.strip()]
    names = [s.name for s in specs]
    if "fp16" not in names:
        specs.insert(0, parse_spec("fp16"))
    needle_names = [n.strip().lower() for n in args.needle_configs.split(",") if n.strip()]
    if args.needle_configs == "all":
        needle_names = [s.name for s in specs]
    greedy_names = ([s.name for s in specs] if args.greedy_configs == "all" else
                    [n.strip().lower() for n in args.greedy_configs.split(",") if n.strip()])
    routing = route_attention()
    model, tokenizer = load_model(args.model)
    from . import ratequant

    for spec in specs:   # RateQuant configs: calibrate and allocate once, on this model
        if spec.kind == "turbo" and spec.turbo.ratequant_target is not None:
            spec.turbo = ratequant.resolve(model, tokenizer, spec.turbo, verbose=False)
    eos = set(tokenizer.eos_token_ids) if hasattr(tokenizer, "eos_token_ids") else {
        tokenizer.eos_token_id}
    windows = wikitext_windows(tokenizer, args.data_dir, args.windows, args.window)
    captured = None
    if args.kv_tokens > 0:
        kv_tokens = wikitext_windows(tokenizer, args.data_dir, 1, args.kv_tokens)[0]
        captured = capture_kv(model, kv_tokens, args.block)
    prompts = chat_prompts(tokenizer, args.data_dir, args.prompts) if args.prompts > 0 else []
    lengths = [int(x) for x in str(args.needle_lengths).split(",") if x.strip()]
    depths = [i / (args.needle_depths - 1) if args.needle_depths > 1 else 0.5
              for i in range(args.needle_depths)]
    hay = tokenizer.encode(haystack_text(args.data_dir)[:8 * max(lengths + [1])]) \
        if lengths else []
    needles = [(L, d, PASSPHRASES[i % len(PASSPHRASES)],
                needle_prompt(tokenizer, hay, L, d, PASSPHRASES[i % len(PASSPHRASES)]))
               for L in lengths for i, d in enumerate(depths)]
    settings = {
        "model": args.model, "configs": [s.name for s in specs], "window": args.window,
        "ppl_windows": len(windows), "ppl_tokens": sum(w.shape[0] - 1 for w in windows),
        "block": args.block, "prompts": len(prompts), "max_tokens": args.max_tokens,
        "needle_lengths": lengths, "needle_depths": len(depths),
        "needle_max_tokens": args.needle_max_tokens,
        "greedy_configs": [s.name for s in specs if s.name in greedy_names or s.name == "fp16"]
        if prompts else [],
        "needle_configs": [n for n in needle_names if n in [s.name for s in specs]] if needles
        else [], "kv_tokens": args.kv_tokens, "decode_steps": args.decode_steps,
        "seed": args.seed, "routing": routing, "mlx": mx.__version__,
        "mlx_lm": _mlx_lm_version(), "device": str(mx.default_device()),
    }
    results = {"settings": settings, "configs": [], "prefill_vs_decode": [],
               "command": command}
    fp16_greedy, done = None, {}
    results["commands"] = []
    if args.resume:  # keep the rows of earlier (partial, or parallel) runs, same settings
        prev = load_results(args.resume)
        done = {r["name"]: r for r in prev["configs"]}
        results["prefill_vs_decode"] = prev["prefill_vs_decode"]
        results["commands"] = prev["commands"]
    results["commands"].append(command)
    bar = tqdm(total=len(specs), desc="configs", position=0)
    for spec in specs:
        if spec.name in done:
            row = done[spec.name]
            if spec.name == "fp16" and prompts:
                if len(row.get("greedy_tokens", [])) != len(prompts):
                    row["greedy_tokens"] = [greedy(model, p, spec, args.max_tokens, eos,
                                                   args.block)[0]
                                            for p in tqdm(prompts, desc="fp16 reference",
                                                          leave=False, position=1)]
                fp16_greedy = row["greedy_tokens"]
            if spec.name == "fp16" and captured is not None:  # speed reference: this run
                row["kv"] = kv_bytes_and_speed(model, captured, spec, args.block,
                                               args.decode_steps)
            results["configs"].append(row)
            bar.update(1)
            continue
        row = {"name": spec.name, "kind": spec.kind, "family": spec.family,
               "describe": spec.describe()}
        t0 = time.perf_counter()
        timing = row["stage_seconds"] = {}
        if windows:
            nll, n = 0.0, 0
            for w in tqdm(windows, desc=f"{spec.name} ppl", leave=False, position=1):
                a, b = window_nll(model, w, spec, args.block)
                nll, n = nll + a, n + b
            row["ppl"] = math.exp(nll / n)
            timing["ppl"] = time.perf_counter() - t0
        if captured is not None:
            t1 = time.perf_counter()
            row["kv"] = kv_bytes_and_speed(model, captured, spec, args.block, args.decode_steps)
            timing["kv"] = time.perf_counter() - t1
        if prompts and (spec.name in greedy_names or spec.name == "fp16"):
            outs, dec_s, dec_n, t1 = [], 0.0, 0, time.perf_counter()
            for p in tqdm(prompts, desc=f"{spec.name} greedy", leave=False, position=1):
                toks, s, n = greedy(model, p, spec, args.max_tokens, eos, args.block)
                outs.append(toks)
                dec_s, dec_n = dec_s + s, dec_n + n
            row["greedy_tokens"] = outs
            if spec.name == "fp16":
                fp16_greedy = outs
            ref = fp16_greedy or outs
            match = [common_prefix(a, b) for a, b in zip(outs, ref)]
            row["greedy"] = {
                "agreement": sum(a == b for a, b in zip(outs, ref)) / len(outs),
                "mean_match": sum(match) / len(match),
                "mean_len": sum(len(b) for b in ref) / len(ref),
                "decode_tok_s": dec_n / dec_s if dec_s else None,
            }
            timing["greedy"] = time.perf_counter() - t1
        if needles and spec.name in needle_names:
            t1 = time.perf_counter()
            row["needle"] = needle_test(model, tokenizer, spec, [
                (L, d, w, ids) for (L, d, w, ids) in needles], args.needle_max_tokens,
                args.block, eos)
            timing["needle"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        if args.check_tokens > 0 and windows and spec.name in [c.strip() for c in args.check.split(",")]:
            results["prefill_vs_decode"].append(prefill_vs_decode(
                model, windows[0][:args.check_tokens],
                spec, args.block))
            timing["check"] = time.perf_counter() - t1
        row["seconds"] = time.perf_counter() - t0
        results["configs"].append(row)
        bar.update(1)
        tqdm.write(f"{spec.name}: ppl {_fmt(row.get('ppl'), '{:.3f}')}, bits "
                   f"{_fmt(row.get('kv', {}).get('bits_per_element'), '{:.3f}')}, greedy "
                   f"{_fmt(row.get('greedy', {}).get('agreement'), '{:.2f}')}, needle "
                   f"{_fmt(row.get('needle', {}).get('rate'), '{:.2f}')} "
                   f"({row['seconds']:.0f} s)")
        if args.out_dir:  # partial results survive an interrupted sweep
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.out_dir) / "quality.partial.json").write_text(json.dumps(results, indent=1))
    bar.close()
    settings["resumed_rows"] = sorted(done)
    settings["greedy_configs"] = [r["name"] for r in results["configs"] if r.get("greedy")]
    settings["needle_configs"] = [r["name"] for r in results["configs"] if r.get("needle")]
    results["targets"] = targets(results)
    results["conclusion"] = conclusion(results)
    results["wall_s"] = time.perf_counter() - t_start + sum(
        r.get("seconds", 0) for r in done.values())
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="KV cache quality: perplexity, greedy agreement, needle, bytes, speed.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma list: fp16, affine{b}g{g}, mse{b}, rvq{b}, polar{b}, prod{b}, "
                        "k{kb}v{vb}-{method}")
    p.add_argument("--windows", type=int, default=2,
                   help="WikiText-2 windows for perplexity (0 = the whole test set)")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--block", type=int, default=256, help="prefill block size")
    p.add_argument("--prompts", type=int, default=80, help="MT-Bench prompts (0 = skip)")
    p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--greedy-configs", default="all",
                   help="configs that run greedy agreement ('all' or a comma list; fp16 always)")
    p.add_argument("--needle-lengths", default="2048,4096,8192",
                   help="comma list of haystack lengths in tokens ('' = skip)")
    p.add_argument("--needle-depths", type=int, default=10)
    p.add_argument("--needle-max-tokens", type=int, default=8)
    p.add_argument("--needle-configs", default="all",
                   help="configs that run the needle test ('all' or a comma list)")
    p.add_argument("--kv-tokens", type=int, default=4096,
                   help="prefill length for bytes held and decode speed (0 = skip)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--check", default="fp16,mse3",
                   help="configs for the block-prefill vs token-decode check")
    p.add_argument("--check-tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "reports"))
    p.add_argument("--resume", default=None,
                   help="results JSON (e.g. reports/quality.partial.json) whose configs are "
                        "kept instead of re-run, or a comma list of them (rows of runs made "
                        "in parallel); use the same settings")
    p.add_argument("--from-json", default=None,
                   help="re-write the report from a saved (or partial) results JSON, or from "
                        "a comma list of them (runs made in parallel, merged)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--quick", action="store_true",
                   help="tiny slice for tests: 1 window of 256 tokens, 1 prompt x 6 tokens, "
                        "needle at 192 tokens x 2 depths, bytes at 256 tokens")
    return p


QUICK = {"windows": 1, "window": 256, "block": 64, "prompts": 1, "max_tokens": 6,
         "needle_lengths": "192", "needle_depths": 2, "needle_max_tokens": 4,
         "kv_tokens": 256, "decode_steps": 2, "check_tokens": 72}


def main(argv: Optional[list] = None) -> dict:
    import shlex
    import sys

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        results = load_results(args.from_json)
        results["targets"] = targets(results)
        results["conclusion"] = conclusion(results)
        command = results.get("command", "python -m mlx_lm_turbo.eval")
        out = Path(args.out_dir)
        print(markdown_table(results))
        msg = plot(results, out / "quality.png")
        if not msg:
            results["png"] = "quality.png"
        (out / "quality.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, out / "quality.md", command)
        return results
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m mlx_lm_turbo.eval " + " ".join(shlex.quote(a) for a in argv)
    results = evaluate(args, command)
    results["command"] = command
    print(markdown_table(results))
    for e in results["prefill_vs_decode"]:
        print(f"prefill vs decode ({e['config']}, {e['tokens']} tokens): max |Δlogit| "
              f"{e['max_abs_logit_diff']:.2e}, argmax agreement {100 * e['argmax_agreement']:.1f}%")
    for t in results["targets"]:
        print("target:", t)
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        msg = plot(results, out / "quality.png")
        if msg:
            print(msg)
        else:
            results["png"] = "quality.png"
        (out / "quality.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, out / "quality.md", command)
        partial = out / "quality.partial.json"
        if partial.exists():
            partial.unlink()
        print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}"
              + ("" if msg else f", {out / 'quality.png'}"))
    return results


if __name__ == "__main__":
    main()
