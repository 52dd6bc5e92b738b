"""The evaluator's cache configurations and measurements (``eval`` runs them).

A configuration name (``parse_spec``, see ``eval``'s docstring) becomes a ``Spec``, whose
``make_cache`` builds a fresh prompt cache; the measurements run a model through such
caches: perplexity on WikiText-2 windows, greedy agreement with fp16, needle retrieval,
bytes held and decode speed, block prefill vs token-by-token decode.
"""

import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

from .cache import TurboKVCache
from .prompt_cache import make_prompt_cache
from .config import TurboConfig, split_bits

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
DEFAULT_MODEL = str(REPO / "models" / "smollm2-135m")   # python -m mlx_lm_turbo.smollm2 ...
DEFAULT_CONFIGS = (
    "fp16,"
    "affine8g64,affine8g32,affine4g64,affine4g32,affine3g64,affine3g32,affine2g64,affine2g32,"
    "mse4,mse3,mse2,mse1,rvq2,rvq1,polar4,polar3,prod4,prod3,"
    "k8v4-mse,k4v3-mse,k4v2-mse,k3v2-mse"
)
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
        if re.match(r"kv\d", self.name):
            return "--kv-bits (keys +1, values -1)" + window
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
    m = re.fullmatch(r"kv(\d)", n)
    if m:   # what --kv-method turboquant_mse --kv-bits b gives
        kb, vb = split_bits("turboquant_mse", int(m.group(1)))
        return Spec(n, "turbo", turbo=TurboConfig("turboquant_mse", kb, "turboquant_mse", vb,
                                                  seed=seed))
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
        "{mse,rvq,polar,prod,qjl}{b}, kv{b}, rq{target} or k{kb}v{vb}-{method}[-{value method}], "
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

def load_model(path: str, model_config: Optional[dict] = None):
    """Load with mlx-lm (``model_config`` overrides config.json entries), dequantize the
    weights and run in float32 (fast on CPU)."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(path, model_config=model_config or {})
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
