"""Decode attention: fused kernels over packed codes vs fp16 SDPA, mlx-lm's quantized
attention and dequantize+SDPA (our reference), plus a correctness sweep and an end-to-end
decode of a Llama-3.2-3B-shaped model with random weights.

    python scripts/bench_attention.py --out DIR [--sections correctness,micro,e2e]

Timings are reported under two protocols: ``queued`` (20 calls built then one eval, as
inside a decode step) and ``synced`` (one eval per call, including the fixed launch and
sync cost). Ratios are vs fp16/bf16 SDPA measured in the same run.
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402

from mlx_lm_turbo import kernels  # noqa: E402
from mlx_lm_turbo.attention import reference_attention, turbo_attention  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.kernels import decode  # noqa: E402

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


# ----------------------------------------------------------------- correctness

CORRECTNESS_METHODS = [("mse", 2, "mse", 2), ("mse", 3, "mse", 3), ("mse", 4, "mse", 4),
                       ("rvq", 1, "rvq", 1), ("rvq", 2, "mse", 3), ("prod", 3, "mse", 3)]


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
                try:
                    p = decode.plan(q, keys, values, c, mask, None, decode.backend())
                    if p is None:
                        row["status"] = "reference (no fused path)"
                    else:
                        out = decode.run_fused(q, keys, values, c, D ** -0.5, mask, p,
                                               decode.backend())
                        ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
                        err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)))
                        row["max_abs_err"] = err.item()
                        row["ref_max"] = mx.max(mx.abs(ref.astype(mx.float32))).item()
                        row["status"] = "ok"
                except Exception as e:  # report and go on
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                log("correctness", row)
    # Array masks (bool and additive) at L=4, GQA 4.
    D, Hkv, G, L, S = 128, 2, 4, 4, 777
    k = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
    v = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
    c, keys, values = filled_cache("mse", 3, "mse", 3, k, v)
    q = mx.random.normal((1, Hkv * G, L, D)).astype(mx.float16)
    for name, mask in (("bool", mx.random.uniform(shape=(1, 1, L, S)) > 0.2),
                       ("additive", mx.random.normal((1, Hkv * G, L, S)))):
        p = decode.plan(q, keys, values, c, mask, None, decode.backend())
        out = decode.run_fused(q, keys, values, c, D ** -0.5, mask, p, decode.backend())
        ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
        err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
        row = dict(key="mse3", value="mse3", D=D, G=G, L=L, S=S, dtype="float16",
                   mask=name, max_abs_err=err, status="ok")
        rows.append(row)
        log("correctness", row)
    # Queries as attention layers hand them over: a transposed (B, L, H, D) view.
    qt = mx.random.normal((1, L, Hkv * G, D)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    p = decode.plan(qt, keys, values, c, "causal", None, decode.backend())
    out = decode.run_fused(qt, keys, values, c, D ** -0.5, "causal", p, decode.backend())
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
                p = decode.plan(q, keys, values, c, None, None, decode.backend())
                if p is None:
                    log(f"  {tag}: no fused path")
                    continue
                add(f"fused {tag}",
                    lambda: decode.run_fused(q, keys, values, c, scale, None, p,
                                             decode.backend()))
                if (km, kb) == ("mse", 3):
                    # The two kernels alone (inputs prepared once): the rest is MLX glue.
                    ins, tpl, nsp = decode.fused_inputs(q, keys, values, c, scale, None, p)
                    mx.eval(ins)
                    cst = decode._consts(c, scale, p)
                    add(f"kernels_only {tag}",
                        lambda: decode.launch(ins, tpl, nsp, p, decode.backend(), cst["vmul"],
                                              cst["rotv"], q.dtype if cst["rotv"] else mx.float32))
                    if dt == mx.float16:
                        # Grid-size sweep (splits per KV head): a runtime choice, no recompile.
                        for tb in (132, 264, 1056, 2112):
                            old_tb = decode.TARGET_BLOCKS
                            decode.TARGET_BLOCKS = tb
                            try:
                                i2, t2, n2 = decode.fused_inputs(q, keys, values, c, scale, None, p)
                            finally:
                                decode.TARGET_BLOCKS = old_tb
                            add(f"kernels_only blocks={tb} {tag}",
                                lambda i2=i2, t2=t2, n2=n2: decode.launch(
                                    i2, t2, n2, p, decode.backend(), cst["vmul"], cst["rotv"],
                                    q.dtype if cst["rotv"] else mx.float32))
                    # Appending one token (encode + cache write): not fused yet.
                    k1 = mx.random.normal((B, Hkv, 1, D)).astype(dt)
                    mx.eval(k1)

                    def append():
                        kk, vv = c.update_and_fetch(k1, k1)
                        c.trim(1)
                        return [kk, vv]
                    add(f"append_1_token {tag}", append)
                del c, keys, values
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
            del q, k, v
            gc.collect()
            mx.clear_cache()


# ----------------------------------------------------------------- end to end

def e2e(contexts, steps: int = 20) -> None:
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache

    from mlx_lm_turbo import patch
    patch.apply()
    args = llama.ModelArgs(model_type="llama", hidden_size=3072, num_hidden_layers=28,
                           intermediate_size=8192, num_attention_heads=24,
                           num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                           vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    rows = RESULTS.setdefault("e2e", [])
    for S in contexts:
        for kind in ("bf16", "mse3", "mse4"):
            caches = []
            try:
                for layer in range(args.num_hidden_layers):
                    k = mx.random.normal((1, 8, S, 128)).astype(mx.bfloat16)
                    v = mx.random.normal((1, 8, S, 128)).astype(mx.bfloat16)
                    if kind == "bf16":
                        c = KVCache()
                    else:
                        b = int(kind[-1])
                        c = TurboKVCache("turboquant_mse", b, "turboquant_mse", b, layer=layer)
                    c.update_and_fetch(k, v)
                    mx.eval(c.state[0] if kind == "bf16" else c.keys, c.values)
                    caches.append(c)
                tok = mx.array([[1]])
                for _ in range(3):
                    mx.eval(model(tok, cache=caches))
                t = time.perf_counter()
                for _ in range(steps):
                    logits = model(tok, cache=caches)
                    mx.eval(logits)
                dt = (time.perf_counter() - t) / steps
                row = dict(context=S, cache=kind, ms_per_token=round(1e3 * dt, 3),
                           tok_per_s=round(1 / dt, 2))
            except Exception as e:
                row = dict(context=S, cache=kind, status=f"error: {type(e).__name__}: {e}"[:300])
                traceback.print_exc()
            rows.append(row)
            log("e2e", row)
            save()
            del caches
            gc.collect()
            mx.clear_cache()
    base = {r["context"]: r["tok_per_s"] for r in rows if r.get("cache") == "bf16" and "tok_per_s" in r}
    for r in rows:
        if "tok_per_s" in r and r["context"] in base:
            r["speedup"] = round(r["tok_per_s"] / base[r["context"]], 3)
    save()


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="correctness,micro,e2e")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    OUT = a.out
    os.makedirs(OUT, exist_ok=True)
    RESULTS["env"] = dict(mlx=mx.__version__, device=str(mx.default_device()),
                          backend=decode.backend(), python=platform.python_version(),
                          argv=sys.argv, target_blocks=decode.TARGET_BLOCKS, nt=decode.NT)
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
            elif name == "micro":
                micro(a.quick, [int(x) for x in a.lengths.split(",")])
            elif name == "e2e":
                e2e([int(x) for x in a.contexts.split(",")])
        except Exception as e:
            RESULTS.setdefault("section_errors", {})[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        log(f"[{name} done at {time.time() - t0:.0f}s]")
        save()


if __name__ == "__main__":
    main()
