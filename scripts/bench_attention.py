"""Decode attention: fused kernels over packed codes vs fp16 SDPA, mlx-lm's quantized
attention and dequantize+SDPA (our reference), plus a correctness sweep and an end-to-end
decode of a Llama-3.2-3B-shaped model with random weights. The ``encode`` section checks
the fused encode kernel (cache append) against the codecs and times it against their MLX
encode.

    python scripts/bench_attention.py --out DIR [--sections correctness,encode,micro,e2e]
    python scripts/bench_attention.py --out DIR --sections encode,append   # the encode alone

Timings are reported under two protocols: ``queued`` (20 calls built then one eval, as
inside a decode step) and ``synced`` (one eval per call, including the fixed launch and
sync cost). Ratios are vs fp16/bf16 SDPA measured in the same run.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402

from mlx_lm_turbo.attention import reference_attention, turbo_attention  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.kernels import build as kernel_build  # noqa: E402
from mlx_lm_turbo.kernels import check, decode, launchers, source  # noqa: E402
from mlx_lm_turbo.kernels import plan as planning  # noqa: E402
from mlx_lm_turbo.kernels import encode as fused_encode  # noqa: E402

RESULTS: dict = {}
OUT = "."


def save() -> None:
    with open(os.path.join(OUT, "attention.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def log(*a) -> None:
    print(*a, flush=True)


def filled_cache(km, kb, vm, vb, k, v, seed=0):
    c = TurboKVCache(km, kb, vm, vb, seed=seed)
    keys, values = c.update_and_fetch(k, v)
    mx.eval(keys, values)
    return c, keys, values


def windowed_cache(km, kb, vm, vb, k, v, W, L=1, seed=0, center=False, trim=0):
    """A cache with an fp16 window of W tokens: all but the last L tokens (plus ``trim``
    more, trimmed off again: their copies go, fewer than W remain), then the last L
    appended, so keys/values are what that step's attention gets (with "recent")."""
    c = TurboKVCache(km, kb, vm, vb, seed=seed, center_keys=center, fp16_window=W)
    S = k.shape[2] - trim
    c.update_and_fetch(k[:, :, :S - L + trim], v[:, :, :S - L + trim])
    if trim:
        c.trim(trim)
    keys, values = c.update_and_fetch(k[:, :, S - L:S], v[:, :, S - L:S])
    mx.eval(keys, values)
    return c, keys, values


# ----------------------------------------------------------------- correctness

CORRECTNESS_METHODS = [("mse", 2, "mse", 2), ("mse", 3, "mse", 3), ("mse", 4, "mse", 4),
                       ("rvq", 1, "rvq", 1), ("rvq", 2, "mse", 3), ("prod", 3, "mse", 3)]


def compare_fused(row: dict, q, keys, values, c, scale: float, mask) -> None:
    """Fill ``row`` with the fused path's max abs error against the reference (or why it
    did not run)."""
    try:
        p = planning.plan(q, keys, values, c, mask, None, check.backend())
        if p is None:
            row["status"] = "reference (no fused path)"
            return
        out = launchers.run_fused(q, keys, values, c, scale, mask, p, check.backend())
        ref = reference_attention(q, keys, values, c, scale, mask)
        err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)))
        row["max_abs_err"] = err.item()
        row["ref_max"] = mx.max(mx.abs(ref.astype(mx.float32))).item()
        row["status"] = "ok"
    except Exception as e:  # report and go on
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"


def correctness(quick: bool) -> None:
    rows = []
    shapes = []
    for D in (64, 128, 256):
        for G in (1, 4):
            for L in (1, 4):
                shapes.append((D, G, L))
    few = ((128, 4, 1), (64, 1, 4))
    for km, kb, vm, vb in CORRECTNESS_METHODS:
        for D, G, L in shapes:
            # Every shape for one method of each kind; the other methods on a few shapes
            # (each (method, shape, dtype) is a separate JIT compile).
            full = (km, kb) in (("mse", 3), ("rvq", 1), ("prod", 3))
            if (quick or not full) and (D, G, L) not in few:
                continue
            Hkv, S = 2, 1000 + 37 * L  # not a multiple of any block size
            mx.random.seed(D + G + L)
            k = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
            v = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
            c, keys, values = filled_cache(km, kb, vm, vb, k, v)
            mask = "causal" if L > 1 else None
            for dt in (mx.float16, mx.float32, mx.bfloat16):
                if dt != mx.float16 and not ((km, kb) == ("mse", 3) and (D, G, L) in few):
                    continue
                q = mx.random.normal((1, Hkv * G, L, D)).astype(dt)
                row = dict(key=f"{km}{kb}", value=f"{vm}{vb}", D=D, G=G, L=L, S=S,
                           dtype=str(dt).split(".")[-1])
                compare_fused(row, q, keys, values, c, D ** -0.5, mask)
                rows.append(row)
                log("correctness", row)
    rows += window_correctness()
    # Array masks (bool and additive) at L=4, GQA 4.
    D, Hkv, G, L, S = 128, 2, 4, 4, 777
    k = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
    v = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
    c, keys, values = filled_cache("mse", 3, "mse", 3, k, v)
    q = mx.random.normal((1, Hkv * G, L, D)).astype(mx.float16)
    for name, mask in (("bool", mx.random.uniform(shape=(1, 1, L, S)) > 0.2),
                       ("additive", mx.random.normal((1, Hkv * G, L, S)))):
        p = planning.plan(q, keys, values, c, mask, None, check.backend())
        out = launchers.run_fused(q, keys, values, c, D ** -0.5, mask, p, check.backend())
        ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
        err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
        row = dict(key="mse3", value="mse3", D=D, G=G, L=L, S=S, dtype="float16",
                   mask=name, max_abs_err=err, status="ok")
        rows.append(row)
        log("correctness", row)
    # Queries as attention layers hand them over: a transposed (B, L, H, D) view.
    qt = mx.random.normal((1, L, Hkv * G, D)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    p = planning.plan(qt, keys, values, c, "causal", None, check.backend())
    out = launchers.run_fused(qt, keys, values, c, D ** -0.5, "causal", p, check.backend())
    ref = reference_attention(qt, keys, values, c, D ** -0.5, "causal")
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    row = dict(key="mse3", value="mse3", D=D, G=G, L=L, S=S, dtype="bfloat16",
               mask="causal, transposed q", max_abs_err=err, status="ok")
    rows.append(row)
    log("correctness", row)
    # The dispatcher end to end (first-use check, warning on disagreement).
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = turbo_attention(q, keys, values, c, D ** -0.5, "causal")
        mx.eval(out)
        RESULTS["dispatcher_warnings"] = [str(x.message) for x in w]
    RESULTS["dispatcher_checked"] = {str(k): v for k, v in decode._checked.items()}
    RESULTS["correctness"] = rows
    bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("reference")]
    errs = [r["max_abs_err"] for r in rows if "max_abs_err" in r]
    log(f"correctness: {len(rows)} cases, {len(bad)} errors, max abs err "
        f"{max(errs) if errs else float('nan'):.3g}")
    save()


# (key, value, D, G, L, W, centred, trimmed, dtype): W=2000 > S reads no codes at all; a
# trim leaves fewer than W copies; L=4 blocks read codes inside the span for later rows.
WINDOW_CASES = [("mse3", "mse3", 128, 4, 1, 64, False, 0, mx.float16),
                ("mse3", "mse3", 64, 1, 1, 2000, False, 0, mx.float16),
                ("mse3", "mse3", 128, 4, 4, 16, False, 0, mx.float16),
                ("mse3", "mse3", 128, 4, 1, 64, True, 0, mx.float16),
                ("mse3", "mse3", 128, 4, 1, 64, False, 20, mx.float16),
                ("mse3", "mse3", 128, 4, 1, 64, True, 0, mx.bfloat16),
                ("mse3", "mse3", 96, 4, 2, 16, True, 0, mx.float16),     # dense rotations
                ("rvq1", "mse2", 128, 4, 1, 64, False, 0, mx.float16),
                ("rvq1", "mse2", 64, 1, 4, 16, True, 0, mx.float16),
                ("prod3", "mse3", 128, 4, 1, 64, False, 0, mx.float16)]


def window_correctness() -> list:
    """The fused path with an fp16 window (cache.py) against reference_attention, which
    applies the window rule; then the dispatcher's first-use check on a windowed cache."""
    rows = []
    Hkv, S = 2, 1037
    for key, val, D, G, L, W, center, trim, dt in WINDOW_CASES:
        mx.random.seed(D + G + L + W)
        k = (mx.random.normal((1, Hkv, S + trim, D)) + (2.0 if center else 0.0)).astype(dt)
        v = mx.random.normal((1, Hkv, S + trim, D)).astype(dt)
        c, keys, values = windowed_cache(key[:-1], int(key[-1]), val[:-1], int(val[-1]), k, v,
                                         W, L=L, center=center, trim=trim)
        q = mx.random.normal((1, Hkv * G, L, D)).astype(dt)
        mask = "causal" if L > 1 else None
        row = dict(key=key, value=val, D=D, G=G, L=L, S=S, dtype=str(dt).split(".")[-1],
                   window=W, copies=keys["recent"].shape[2], centred=center, trimmed=trim)
        compare_fused(row, q, keys, values, c, D ** -0.5, mask)
        rows.append(row)
        log("correctness window", row)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mx.eval(turbo_attention(q, keys, values, c, D ** -0.5, mask))
        RESULTS["dispatcher_window_warnings"] = [str(x.message) for x in w]
    return rows


# ----------------------------------------------------------------- encode

@contextlib.contextmanager
def forced_mode(mode: Optional[bool]):
    """Kernels forced on (True) or off (False) for a block (check.MODE, restored after)."""
    old, check.MODE = check.MODE, mode
    try:
        yield
    finally:
        check.MODE = old


ENCODE_METHODS = [("mse", b) for b in (1, 2, 3, 4, 8)] + [("rvq", b) for b in (1, 2, 3, 4)]


def encode_section(quick: bool) -> None:
    """The fused encode kernel vs the codec's MLX encode: agreement (encode.compare: codes
    equal but for rare ±1 boundary ties, norms within 2e-3) over methods, bits, head dims,
    dtypes and lengths, including transposed (B, L, H, D) views; then time per call for one
    decode token (B=1, 8 KV heads) and a 2048-token prefill block."""
    from mlx_lm_turbo import codecs
    be = check.backend()
    if be is None:
        log("encode: no GPU backend, nothing to check")
        return
    # Every method and bits at d=128 (fp16, one token and a prefill block); head dims and
    # dtypes on two of them (each (method, bits, dim, dtype) is a separate JIT compile).
    cases = [(km, kb, 128, mx.float16, L) for km, kb in ENCODE_METHODS for L in (1, 2048)]
    for km, kb in (("mse", 3), ("rvq", 2)):
        for D in (64, 128, 256):
            for dt in (mx.bfloat16, mx.float32):
                if not quick or D == 128:
                    cases.append((km, kb, D, dt, 37))
    rows = RESULTS.setdefault("encode_correctness", [])
    for km, kb, D, dt, L in cases:
        c = codecs.make(km, kb, D, seed=7)
        mx.random.seed(D + L)
        x = (4 * mx.random.normal((1, L, 8, D))).astype(dt).transpose(0, 2, 1, 3)
        row = dict(method=f"{km}{kb}", D=D, L=L, dtype=str(dt).split(".")[-1])
        try:
            out = fused_encode.run_kernel(c, x, be)
            ok, why = fused_encode.compare(c, out, c.encode(x))
            row.update(status="ok" if ok else "disagrees", detail=why)
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        log("encode", row)
    bad = [r for r in rows if r["status"] != "ok"]
    log(f"encode correctness: {len(rows)} cases, {len(bad)} not ok")
    save()

    timing = RESULTS.setdefault("encode_timing", [])
    for km, kb in (("mse", 2), ("mse", 3), ("mse", 4), ("rvq", 1), ("rvq", 2)):
        c = codecs.make(km, kb, 128, seed=7)
        for L in (1, 2048):
            for dt in (mx.float16, mx.bfloat16):
                x = mx.random.normal((1, L, 8, 128)).astype(dt).transpose(0, 2, 1, 3)
                mx.eval(x)
                row = dict(method=f"{km}{kb}", D=128, L=L, dtype=str(dt).split(".")[-1])
                for name, fn in (("kernel", lambda: fused_encode.run_kernel(c, x, be)),
                                 ("mlx", lambda: c.encode(x))):
                    try:
                        q, y = bench(fn)
                        row[f"{name}_queued_us"] = round(q, 2)
                        row[f"{name}_synced_us"] = round(y, 2)
                    except Exception as e:
                        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if "kernel_queued_us" in row and "mlx_queued_us" in row:
                    row["speedup_queued"] = round(row["mlx_queued_us"]
                                                  / row["kernel_queued_us"], 2)
                timing.append(row)
                log("encode timing", row)
    save()


def append_rows(c, k1, tag: str, add) -> None:
    """Time appending one token to the filled cache ``c`` (encode K and V + cache writes):
    fused encode kernel where it runs (GPU), then the codecs' MLX encode forced by the env
    var, side by side."""

    def append():
        c.update_and_fetch(k1, k1)
        c.trim(1)
        # The buffers themselves, not the returned views: views kept alive across the
        # queued calls share the buffers' memory, so MLX cannot write the next token in
        # place and copies the whole cache per call, which a real decode step (its views
        # die with the step) does not pay.
        return list(c.keys.values()) + list(c.values.values())
    add(f"append_1_token {tag}", append)
    with forced_mode(False):
        add(f"append_1_token mlx_encode {tag}", append)


def append_section(lengths) -> None:
    """append_1_token alone (fused encode vs MLX encode) for B=1, 8 KV heads, d=128."""
    rows = RESULTS.setdefault("append", [])
    for dt in (mx.float16, mx.bfloat16):
        for S in lengths:
            for km, kb, vm, vb in (("mse", 3, "mse", 3), ("mse", 4, "mse", 4),
                                   ("rvq", 1, "mse", 2)):
                mx.random.seed(S)
                k = mx.random.normal((1, 8, S, 128)).astype(dt)
                c, _, _ = filled_cache(km, kb, vm, vb, k, k)
                k1 = mx.random.normal((1, 8, 1, 128)).astype(dt)
                mx.eval(k1)
                res = {}

                def add(name, fn):
                    try:
                        res[name] = bench(fn)
                    except Exception as e:
                        res[name] = f"{type(e).__name__}: {str(e)[:300]}"
                append_rows(c, k1, f"{km}{kb}/{vm}{vb}", add)
                for name, t in res.items():
                    row = dict(dtype=str(dt).split(".")[-1], S=S, method=name)
                    if isinstance(t, str):
                        row["status"] = t
                    else:
                        row.update(queued_us=round(t[0], 2), synced_us=round(t[1], 2))
                    rows.append(row)
                    log("append", row)
                del c, k
                gc.collect()
                mx.clear_cache()
    save()


# ----------------------------------------------------------------- micro

def bench(fn, n_queue=20, reps=5, warm=3) -> tuple[float, float]:
    """(queued µs per call, synced µs per call), medians."""
    for _ in range(warm):
        mx.eval(fn())
    queued = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [fn() for _ in range(n_queue)]
        mx.eval(outs)
        queued.append((time.perf_counter() - t) / n_queue)
    synced = []
    for _ in range(reps * 5):
        t = time.perf_counter()
        mx.eval(fn())
        synced.append(time.perf_counter() - t)
    return 1e6 * statistics.median(queued), 1e6 * statistics.median(synced)


OURS = [("mse", 2, "mse", 2), ("mse", 3, "mse", 3), ("mse", 4, "mse", 4),
        ("rvq", 1, "mse", 2), ("prod", 3, "mse", 3)]


def micro(quick: bool, lengths) -> None:
    B, Hq, Hkv, D = 1, 32, 8, 128
    scale = D ** -0.5
    rows = RESULTS.setdefault("micro", [])
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as qsdpa
    for dt in (mx.float16, mx.bfloat16):
        for S in lengths:
            mx.random.seed(S)
            q = mx.random.normal((B, Hq, 1, D)).astype(dt)
            k = mx.random.normal((B, Hkv, S, D)).astype(dt)
            v = mx.random.normal((B, Hkv, S, D)).astype(dt)
            mx.eval(q, k, v)
            res = {}

            def add(name, fn):
                try:
                    res[name] = bench(fn)
                except Exception as e:
                    res[name] = None
                    RESULTS.setdefault("micro_errors", {})[f"{name} S={S} {dt}"] = \
                        f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"  {name}: {type(e).__name__}: {str(e)[:200]}")

            add("sdpa", lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
            for bits in (4,):
                qk = mx.quantize(k, group_size=64, bits=bits)
                qv = mx.quantize(v, group_size=64, bits=bits)
                mx.eval(qk, qv)
                add(f"mlx_lm_quant{bits}",
                    lambda qk=qk, qv=qv, bits=bits: qsdpa(q, qk, qv, scale=scale, mask=None,
                                                          group_size=64, bits=bits))
                del qk, qv
            for km, kb, vm, vb in OURS:
                c, keys, values = filled_cache(km, kb, vm, vb, k, v)
                tag = f"{km}{kb}/{vm}{vb}"
                if (km, kb) == ("mse", 3):
                    add(f"dequant_sdpa {tag}",
                        lambda: reference_attention(q, keys, values, c, scale))
                p = planning.plan(q, keys, values, c, None, None, check.backend())
                if p is None:
                    log(f"  {tag}: no fused path")
                    continue
                add(f"fused {tag}",
                    lambda: launchers.run_fused(q, keys, values, c, scale, None, p,
                                                check.backend()))
                if (km, kb) == ("mse", 3):
                    # The same with a 64-token fp16 window: the window block's cost.
                    cw, kw, vw = windowed_cache(km, kb, vm, vb, k, v, 64)
                    pw = planning.plan(q, kw, vw, cw, None, None, check.backend())
                    if pw is None:
                        log(f"  {tag} w64: no fused path")
                    else:
                        add(f"fused {tag} w64",
                            lambda: launchers.run_fused(q, kw, vw, cw, scale, None, pw,
                                                        check.backend()))
                    del cw, kw, vw
                if (km, kb) == ("mse", 3):
                    # The two kernels alone (inputs prepared once): the rest is MLX glue.
                    ins, tpl, nsp = launchers.fused_inputs(q, keys, values, c, scale, None, p)
                    mx.eval(ins)
                    cst = launchers.kernel_constants(c, scale, p)
                    odt = q.dtype if cst["rotv"] else mx.float32
                    run = launchers.launcher(tpl, p, check.backend(), cst["vmul"], cst["rotv"],
                                             odt)
                    add(f"kernels_only {tag}", lambda: run(ins, nsp))
                    if dt == mx.float16:
                        # Grid-size sweep (splits per KV head): a runtime choice, no recompile.
                        for tb in (132, 264, 1056, 2112):
                            old_tb = planning.TARGET_BLOCKS
                            planning.TARGET_BLOCKS = tb
                            try:
                                i2, _, n2 = launchers.fused_inputs(q, keys, values, c, scale,
                                                                   None, p)
                            finally:
                                planning.TARGET_BLOCKS = old_tb
                            add(f"kernels_only blocks={tb} {tag}",
                                lambda i2=i2, n2=n2: run(i2, n2))
                    # Appending one token: fused encode vs the MLX encode, side by side.
                    k1 = mx.random.normal((B, Hkv, 1, D)).astype(dt)
                    mx.eval(k1)
                    append_rows(c, k1, tag, add)
                c = keys = values = None   # (frees them before the next cache)
            base = res.get("sdpa")
            for name, t in res.items():
                if t is None:
                    rows.append(dict(dtype=str(dt).split(".")[-1], S=S, method=name,
                                     status="failed"))
                    continue
                row = dict(dtype=str(dt).split(".")[-1], S=S, method=name,
                           queued_us=round(t[0], 2), synced_us=round(t[1], 2))
                if base:
                    row["speedup_queued"] = round(base[0] / t[0], 3)
                    row["speedup_synced"] = round(base[1] / t[1], 3)
                rows.append(row)
                log(f"{row['dtype']:>8} S={S:>6} {name:<28} queued {t[0]:8.1f} us "
                    f"({row.get('speedup_queued', float('nan')):5.2f}x)  synced {t[1]:8.1f} us "
                    f"({row.get('speedup_synced', float('nan')):5.2f}x)")
            save()
            q = k = v = None
            gc.collect()
            mx.clear_cache()


# ----------------------------------------------------------------- end to end

def llama_3b_shaped(layers: int = 28):
    """A Llama-3.2-3B-shaped model with random bf16 weights (28 layers, 24/8 heads, d=128;
    fewer ``layers`` for a quick try)."""
    from mlx_lm.models import llama
    args = llama.ModelArgs(model_type="llama", hidden_size=3072, num_hidden_layers=layers,
                           intermediate_size=8192, num_attention_heads=24,
                           num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                           vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


class NoAttention:
    """The cache of the ceilings: no append, the offset of an S-token cache, the keys and
    values handed back as given. With ``no_attention`` the layer's attention output is its
    queries (so the key and value projections drop out of the step too: a loose bound);
    with ``no_attention_kv`` it depends on the keys and values (the tighter bound: the
    rest of the model's step, host and GPU, which no cache method can remove)."""

    def __init__(self, offset: int):
        self.offset = offset

    def update_and_fetch(self, keys, values):
        self.offset += keys.shape[2]
        return keys, values


def no_attention(queries, keys, values, cache, scale, mask, sinks=None):
    return queries


def no_attention_kv(queries, keys, values, cache, scale, mask, sinks=None):
    """``no_attention`` that still needs the layer's keys and values (one dependency
    node, no kernel): the key and value projections and the keys' RoPE stay in the step,
    as every cache needs them. The tighter ceiling of any cache."""
    return mx.depends([queries], [keys, values])[0]


@contextlib.contextmanager
def model_attention(kind: str):
    """The Llama model's attention for a block: ``no_attention`` or ``no_attention_kv``
    for those kinds (with NoAttention caches), mlx-lm's patched one otherwise."""
    from mlx_lm.models import llama
    orig = llama.scaled_dot_product_attention
    if kind == "no_attention":
        llama.scaled_dot_product_attention = no_attention
    elif kind == "no_attention_kv":
        llama.scaled_dot_product_attention = no_attention_kv
    try:
        yield
    finally:
        llama.scaled_dot_product_attention = orig


def filled_caches(kind: str, S: int, layers: int, batch: int = 1) -> list:
    """One cache per layer holding S random bf16 tokens: ``bf16`` (mlx-lm's KVCache),
    ``mse<b>[_w<W>]`` (ours, b bits, optional W-token fp16 window), ``no_attention`` or
    ``no_attention_kv`` (the ceilings: see NoAttention)."""
    from mlx_lm.models.cache import KVCache
    if kind.startswith("no_attention"):
        return [NoAttention(S) for _ in range(layers)]
    caches = []
    for layer in range(layers):
        k = mx.random.normal((batch, 8, S, 128)).astype(mx.bfloat16)
        v = mx.random.normal((batch, 8, S, 128)).astype(mx.bfloat16)
        if kind == "bf16":
            c = KVCache()
        else:
            b = int(kind[3])
            W = int(kind.split("_w")[1]) if "_w" in kind else 0
            c = TurboKVCache("turboquant_mse", b, "turboquant_mse", b, layer=layer,
                             fp16_window=W)
        c.update_and_fetch(k, v)
        mx.eval(c.state[0] if kind == "bf16" else c.keys, c.values)
        caches.append(c)
    return caches


def probe_launch():
    """A custom kernel that does nothing, called as the appending launch is (its inputs:
    the live buffers, the positions, the new key and value, stand-ins for its tables,
    counters and ordering inputs; the same shape and stride parameters, outputs, grid):
    what any one-launch-a-layer step pays MLX per call."""
    inputs, outputs = kernel_build.SIGNATURES["decode_mma_fold_append"]
    names = " ".join(kernel_build.shape_params(source.body("decode_mma_fold_append"), inputs))
    kernel = mx.fast.cuda_kernel(
        name="e2e_probe_launch", input_names=inputs, output_names=outputs,
        ensure_row_contiguous=False,
        source=f"  // {names}\n  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0)"
               f" part[0] = 0.f;\n")
    small = [mx.zeros((64,), mx.uint32) for _ in range(3)]
    mx.eval(small)

    def launch(q, k, v, knew, vnew):
        S, pos = k["live"].held, k["live"].positions
        rows = q.shape[0] * k["codes"].shape[1] * 2
        nsp = planning.n_splits(S, rows)
        return kernel(inputs=[q, small[0], k["codes"], k["norm"], v["codes"], v["norm"],
                              pos, small[1], small[2], small[1], knew, vnew],
                      grid=(nsp * kernel_build.NT, rows, 1), threadgroup=(kernel_build.NT, 1, 1),
                      output_shapes=[(rows * nsp * 8 * (q.shape[-1] + 2),), q.shape],
                      output_dtypes=[mx.float32, q.dtype])[1]
    return launch


def no_launch(q, k, v, knew, vnew):
    """The appending launch (``_steady``'s ``coded``) replaced by a dependency node on its
    inputs: its outputs are wrong, only its host time is used."""
    return mx.depends([q], [knew, vnew, k["live"].positions])[0]


def drop_launch(model, caches: list, batch: int = 1, probe: bool = False) -> None:
    """Diagnostic (kind ``mse<b>_no_launch``): ours with the decode step's appending launch
    replaced by a dependency node on its inputs, everything else of our step (the cache's
    and the attention's Python, the positions) kept. Its outputs are wrong; its host time
    against ours is what the launch costs, against ``no_attention_kv`` what our Python
    costs. ``probe`` (kind ``mse<b>_probe_launch``): replaced by ``probe_launch`` instead.
    Runs a few steps first, so the caches hold their checked steady step."""
    for _ in range(3):
        mx.eval(model(mx.ones((batch, 1), mx.int32), cache=caches))
    launch = probe_launch() if probe else no_launch
    for c in caches:
        steady = c._fused_steady
        assert steady is not None and steady.coded is not None, "no appending launch to drop"
        c._fused_steady = steady._replace(coded=launch)


def sync_steps(model, caches, steps: int, batch: int = 1,
               per_step: Optional[list] = None) -> tuple[float, float, float]:
    """Seconds per decode step, synchronous (build a step, evaluate it), the host time of
    building its graph alone, and of queueing it with the GPU idle (``mx.async_eval`` on
    a finished stream): build + dispatch is the host's whole share of a step, what a
    pipelined step cannot go below. ``per_step``: gets each step's (build, dispatch,
    wait for the GPU)."""
    tok = mx.ones((batch, 1), mx.int32)
    for _ in range(3):
        mx.eval(model(tok, cache=caches))
    build = dispatch = 0.0
    t = time.perf_counter()
    for _ in range(steps):
        b0 = time.perf_counter()
        logits = model(tok, cache=caches)
        b1 = time.perf_counter()
        mx.async_eval(logits)
        b2 = time.perf_counter()
        build, dispatch = build + b1 - b0, dispatch + b2 - b1
        mx.eval(logits)
        if per_step is not None:
            per_step.append((b1 - b0, b2 - b1, time.perf_counter() - b2))
    return (time.perf_counter() - t) / steps, build / steps, dispatch / steps


def pipelined_steps(model, caches, steps: int, batch: int = 1,
                    per_step: Optional[list] = None) -> dict:
    """mlx_lm.generate's loop (step n+1 built and queued with async_eval while step n
    runs, so host work overlaps GPU work), seconds per step: in all (``total``) and split
    into building the graph (``build``), queueing it (``dispatch``: MLX's eval walks the
    graph and adds the kernels) and waiting for the previous step's token (``wait``: ~0
    when the host is the bottleneck); plus the peak memory above the resident set in bytes
    (a cache append that copies its buffer shows here). ``per_step``: gets each step's
    (build, dispatch, wait)."""
    y = mx.argmax(model(mx.ones((batch, 1), mx.int32), cache=caches)[:, -1], axis=-1,
                  keepdims=True)
    mx.async_eval(y)
    for _ in range(3):   # warm-up: argmax's first compile stays out of the timing
        nxt = mx.argmax(model(y, cache=caches)[:, -1], axis=-1, keepdims=True)
        mx.async_eval(nxt)
        y.tolist()
        y = nxt
    y.tolist()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    build = dispatch = wait = 0.0
    t = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = mx.argmax(model(y, cache=caches)[:, -1], axis=-1, keepdims=True)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        y.tolist()
        t3 = time.perf_counter()
        build, dispatch, wait = build + t1 - t0, dispatch + t2 - t1, wait + t3 - t2
        if per_step is not None:
            per_step.append((t1 - t0, t2 - t1, t3 - t2))
        y = nxt
    y.tolist()
    total = time.perf_counter() - t
    return dict(total=total / steps, build=build / steps, dispatch=dispatch / steps,
                wait=wait / steps, peak_above_resident=mx.get_peak_memory() - base)


def e2e(contexts, steps: int = 20, kinds=("bf16", "mse3", "mse3_mlx_encode", "mse4"),
        batch: int = 1, rounds: int = 3) -> None:
    """Decode tok/s per cache kind. The host-bound batch-1 step moves by tens of percent
    between minutes on a GPU host, so every kind's caches are filled first and the
    kinds are then timed in turn, ``rounds`` times: a kind's figures are medians over the
    rounds, its speedups the median of the per-round ratios to bf16 (same round)."""
    from mlx_lm_turbo import patch
    patch.apply()
    model = llama_3b_shaped()
    layers = len(model.layers)
    rows = RESULTS.setdefault("e2e", [])
    for S in contexts:
        caches, times, errors = {}, {}, {}
        for kind in kinds:
            try:
                base_kind = kind
                for suffix in ("_mlx_encode", "_slice_writes", "_two_launch", "_own_append",
                               "_no_launch", "_probe_launch"):
                    base_kind = base_kind.replace(suffix, "")
                caches[kind] = filled_caches(base_kind, S, layers, batch)
                if kind.endswith(("_no_launch", "_probe_launch")):
                    drop_launch(model, caches[kind], batch, kind.endswith("_probe_launch"))
                times[kind] = []
            except Exception as e:
                errors[kind] = f"error: {type(e).__name__}: {e}"[:300]
                traceback.print_exc()
        for r in range(rounds):
            for kind in list(times):
                # "_mlx_encode": the cache append runs the codecs' MLX encode (fused
                # attention kept), to show what the fused encode kernel buys end to end;
                # "_slice_writes": the fused encode's codes reach the buffers through MLX
                # slice writes (no in-place append, attention reads sliced views);
                # "_two_launch": the decode step's combine in a launch of its own;
                # "_own_append": the token coded by the in-place append, a launch of its
                # own, instead of by the attention launch.
                orig_encode, orig_pair = fused_encode.encode, fused_encode.encode_pair
                saved = decode.FOLD, decode.APPEND
                if kind.endswith("_two_launch"):
                    decode.FOLD = False
                if kind.endswith(("_own_append", "_mlx_encode", "_slice_writes")):
                    decode.APPEND = False
                orig_inplace = fused_encode.write_pair_in_place
                if kind.endswith("_mlx_encode"):
                    fused_encode.encode = lambda codec, x: None
                    fused_encode.encode_pair = lambda kc, vc, k, v: None
                if kind.endswith(("_mlx_encode", "_slice_writes")):
                    fused_encode.write_pair_in_place = lambda *a: None
                try:
                    with model_attention(kind):
                        sync, build, dispatch = sync_steps(model, caches[kind], steps, batch)
                        pipe = pipelined_steps(model, caches[kind], steps, batch)["total"]
                    times[kind].append((sync, pipe, build + dispatch, build))
                    log("e2e", f"S={S} round {r} {kind}: sync {1e3 * sync:.2f} ms, "
                        f"pipelined {1e3 * pipe:.2f} ms, host {1e3 * (build + dispatch):.2f} ms")
                except Exception as e:
                    errors[kind] = f"error: {type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
                    del times[kind]
                finally:
                    fused_encode.encode, fused_encode.encode_pair = orig_encode, orig_pair
                    fused_encode.write_pair_in_place = orig_inplace
                    decode.FOLD, decode.APPEND = saved
        base = times.get("bf16")
        for kind in kinds:
            if kind in errors:
                row = dict(context=S, batch=batch, cache=kind, status=errors[kind])
            else:
                sync = statistics.median(t[0] for t in times[kind])
                pipe = statistics.median(t[1] for t in times[kind])
                row = dict(context=S, batch=batch, cache=kind, rounds=rounds,
                           ms_per_token=round(1e3 * sync, 3), tok_per_s=round(1 / sync, 2),
                           pipelined_tok_per_s=round(1 / pipe, 2),
                           batch_tok_per_s=round(batch / sync, 1),
                           sync_ms_rounds=[round(1e3 * t[0], 3) for t in times[kind]],
                           pipelined_ms_rounds=[round(1e3 * t[1], 3) for t in times[kind]],
                           # build + dispatch of a synchronous step: where a pipelined
                           # step sits near it, the host sets the pace
                           host_ms_rounds=[round(1e3 * t[2], 3) for t in times[kind]],
                           # of which building the graph (Python, MLX's op calls)
                           build_ms_rounds=[round(1e3 * t[3], 3) for t in times[kind]])
                if base:
                    row["speedup"] = round(statistics.median(
                        b[0] / t[0] for b, t in zip(base, times[kind])), 3)
                    row["pipelined_speedup"] = round(statistics.median(
                        b[1] / t[1] for b, t in zip(base, times[kind])), 3)
            rows.append(row)
            log("e2e", row)
        save()
        del caches
        gc.collect()
        mx.clear_cache()


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="correctness,encode,micro,e2e")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--kinds", default="bf16,mse3,mse3_mlx_encode,mse4",
                    help="e2e caches: bf16, mse<b>, mse<b>_mlx_encode, mse<b>_slice_writes, "
                         "mse<b>_two_launch, mse<b>_own_append, mse<b>_w<W> (with a W-token "
                         "fp16 window); diagnostics: mse<b>_no_launch (the appending launch "
                         "replaced by a dependency node), mse<b>_probe_launch (by a kernel "
                         "that does nothing), "
                         "no_attention (no append, no attention, no key/value projections: "
                         "a loose ceiling of any cache), no_attention_kv (the same with the "
                         "key/value projections and RoPE kept: the tighter ceiling)")
    ap.add_argument("--steps", type=int, default=20, help="e2e decode steps timed per row")
    ap.add_argument("--batch", type=int, default=1, help="e2e sequences decoded together")
    ap.add_argument("--rounds", type=int, default=3,
                    help="e2e: the kinds are timed in turn this many times (medians)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-mma", action="store_true",
                    help="the scalar decode kernel even where the matrix-unit one applies")
    ap.add_argument("--no-fold", action="store_true",
                    help="the steady decode step keeps a separate combine launch")
    ap.add_argument("--no-append", action="store_true",
                    help="the steady decode step's token is coded by a launch of its own")
    ap.add_argument("--blocks", type=int, default=planning.TARGET_BLOCKS,
                    help="the grid size the decode kernel's sequence splits aim for")
    a = ap.parse_args()
    OUT = a.out
    planning.USE_MMA = not a.no_mma
    decode.FOLD = not a.no_fold
    decode.APPEND = not a.no_append
    planning.TARGET_BLOCKS = a.blocks
    os.makedirs(OUT, exist_ok=True)
    RESULTS["env"] = dict(mlx=mx.__version__, device=str(mx.default_device()),
                          backend=check.backend(), python=platform.python_version(),
                          argv=sys.argv, target_blocks=planning.TARGET_BLOCKS,
                          nt=kernel_build.NT, use_mma=planning.USE_MMA, fold=decode.FOLD,
                          append=decode.APPEND)
    try:
        import subprocess
        RESULTS["env"]["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    log(RESULTS["env"])
    sections = a.sections.split(",")
    t0 = time.time()
    for name in sections:
        try:
            if name == "correctness":
                correctness(a.quick)
            elif name == "encode":
                encode_section(a.quick)
            elif name == "append":
                append_section([int(x) for x in a.lengths.split(",")])
            elif name == "micro":
                micro(a.quick, [int(x) for x in a.lengths.split(",")])
            elif name == "e2e":
                e2e([int(x) for x in a.contexts.split(",")], a.steps, kinds=a.kinds.split(","),
                    batch=a.batch, rounds=a.rounds)
        except Exception as e:
            RESULTS.setdefault("section_errors", {})[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        log(f"[{name} done at {time.time() - t0:.0f}s]")
        # Which (backend, method, bits, dim, dtype) the fused encode passed its first-use
        # check for (False: it warned and the codec's MLX encode ran instead).
        RESULTS["encode_checked"] = {str(k): v for k, v in fused_encode._checked.items()}
        save()


if __name__ == "__main__":
    main()
