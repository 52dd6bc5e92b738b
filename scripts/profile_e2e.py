"""Where end-to-end decode time goes: per-op wall cost of the operations one decode step
queues, and decode tok/s of a Llama-3.2-3B-shaped model (random bf16 weights) with the
cache append or the attention taken out, bf16 cache vs ours, in one run.

    python scripts/profile_e2e.py --out DIR [--context 32768] [--kinds bf16,mse3,no_attention]

``no_attention`` is the ceiling of any cache: no append and no attention at all.

Rows (ms per token): ``full`` (synchronous: build a step, evaluate it), ``build`` (host
time to build one step's graph, no evaluation), ``idle_dispatch`` (host time to queue
it with the GPU idle: build + idle_dispatch is the host's share of a step),
``no_append`` (the cache write skipped: attention over the same S tokens every step),
``pipelined`` (as mlx_lm.generate decodes, split into build / dispatch / wait:
``bench_attention.pipelined_steps``); per-op wall costs queued back to back (``op_us``)
and the host time to build one layer's pieces (``host_us``).
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.kernels import encode as fused_encode  # noqa: E402
# (scripts/ is on sys.path when this runs as a script)
from bench_attention import (filled_caches, llama_3b_shaped, model_attention,  # noqa: E402
                             pipelined_steps, sync_steps)
from profile_decode import per_call_us  # noqa: E402


def op_costs(S: int) -> dict:
    x = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    buf = mx.zeros((1, 8, S + 256, 13), mx.uint32)
    one = mx.zeros((1, 8, 1, 13), mx.uint32)
    mx.eval(x, buf, one)
    rows = {"add (1x8x1x128 bf16)": per_call_us(lambda: x + 1, 200)}

    def slice_update():
        nonlocal buf
        buf[:, :, S:S + 1] = one
        return buf

    rows["slice_update (1 token into 32k buffer)"] = per_call_us(slice_update, 200)
    c = TurboKVCache("turboquant_mse", 3, "turboquant_mse", 3)
    c.update_and_fetch(x, x)
    mx.eval(c.keys, c.values)
    if fused_encode.encode(c.key_codec, x) is not None:  # GPU only
        rows["fused encode (1 token, mse3)"] = per_call_us(
            lambda: list(fused_encode.encode(c.key_codec, x).values()), 200)
    return rows


def host_us(fn, n: int = 200) -> float:
    """Host time per call of building ``fn``'s graph (evaluated afterwards, untimed),
    after three evaluated calls (first-use checks and compiles happen there)."""
    for _ in range(3):
        mx.eval(fn())
    t0 = time.perf_counter()
    outs = [fn() for _ in range(n)]
    dt = (time.perf_counter() - t0) / n * 1e6
    mx.eval(outs)
    return dt


def host_costs() -> dict:
    """Host time to build one layer's decode-step graph pieces (3-bit cache, 4096 tokens,
    24 query / 8 KV heads, bf16), next to fp16 SDPA and a plain add."""
    from mlx_lm_turbo.kernels import decode
    k = mx.random.normal((1, 8, 4096, 128)).astype(mx.bfloat16)
    q = mx.random.normal((1, 24, 1, 128)).astype(mx.bfloat16)
    x = k[:, :, :1]
    c = TurboKVCache("turboquant_mse", 3, "turboquant_mse", 3)
    c.update_and_fetch(k, k)
    mx.eval(c.keys, c.values, q, x)
    keys, values = c.keys_and_values()
    rows = {
        "mx add": host_us(lambda: q + 1),
        "fp16 SDPA (mx.fast)": host_us(
            lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.088)),
        "turbo decode_attention": host_us(
            lambda: decode.decode_attention(q, keys, values, c, 0.088)),
        "turbo plan": host_us(
            lambda: (decode.cached_plan(q, keys, values, c, None, None, "cuda"), q)[1]),
    }
    if fused_encode.encode(c.key_codec, x) is not None:  # GPU only
        rows["turbo fused encode (1 token)"] = host_us(
            lambda: list(fused_encode.encode(c.key_codec, x).values()))
        rows["turbo fused encode, K and V in one launch"] = host_us(
            lambda: list(fused_encode.encode_pair(c.key_codec, c.value_codec, x, x)[0].values()))

    def append():
        c.trim(1)
        return c.update_and_fetch(x, x)[0]["codes"]
    rows["turbo update_and_fetch (1 token: encode + 4 slice updates)"] = host_us(append)

    # One layer's whole decode step, as the model runs it (ours: once the steady kernel
    # and the in-place append are in use, from the third step on), next to mlx-lm's; and
    # ours with the token coded in a launch of its own (MLX_LM_TURBO_APPEND=0), then also
    # the combine (MLX_LM_TURBO_FOLD=0).
    def step():
        keys, values = c.update_and_fetch(x, x)
        return decode.decode_attention(q, keys, values, c, 0.088)
    rows["turbo layer step: update_and_fetch + decode_attention"] = host_us(step)
    steady = getattr(c, "_fused_steady", None)
    if steady is not None and steady[4] is not None:
        # Its parts: the appending launch alone (the kernel call and its inputs), and
        # the step with the positions' per-step add already made (a model's other
        # layers share it).
        ks, vs = c.update_and_fetch(x, x)
        rows["turbo appending launch alone"] = host_us(lambda: steady[4](q, ks, vs, x, x))
        decode.decode_attention(q, ks, vs, c, 0.088)

        def step_same_positions():
            c.offset -= 1
            keys, values = c.update_and_fetch(x, x)
            return decode.decode_attention(q, keys, values, c, 0.088)
        rows["turbo layer step, positions made"] = host_us(step_same_positions)
    os.environ[decode.APPEND_ENV] = "0"
    try:
        rows["turbo layer step, token coded in a launch of its own"] = host_us(step)
        os.environ[decode.FOLD_ENV] = "0"
        rows["turbo layer step, that and the combine in its own launch"] = host_us(step)
    finally:
        del os.environ[decode.FOLD_ENV], os.environ[decode.APPEND_ENV]
    kv = KVCache()
    kv.update_and_fetch(k, k)
    mx.eval(kv.keys, kv.values)

    def kv_step():
        ks, vs = kv.update_and_fetch(x, x)
        return mx.fast.scaled_dot_product_attention(q, ks, vs, scale=0.088)
    rows["bf16 layer step: KVCache.update_and_fetch + SDPA"] = host_us(kv_step)
    return {name: round(v, 2) for name, v in rows.items()}


def call_costs(n_layers: int = 28) -> dict:
    """What one ``mx.fast.cuda_kernel`` call costs the host, by what it is given: host
    time to build the call (``build``) and to dispatch it inside a chain of n_layers
    calls (``dispatch``: ``mx.async_eval`` of the chain, per call), next to ``mx.add``.
    Tells which of source size, inputs or outputs a batch-1 step pays for."""
    if not hasattr(mx.fast, "cuda_kernel") or mx.default_device() != mx.gpu:
        return {}
    x = mx.zeros((1, 8, 1, 128), mx.float32)
    extra = [mx.zeros((4,), mx.float32) + i for i in range(16)]
    mx.eval(x, *extra)
    body = "  o[kv_tid()] = a[kv_tid()] + 1.0f;\n"
    head = "__device__ inline int kv_tid() { return blockIdx.x * blockDim.x + threadIdx.x; }\n"
    pad = "// " + "x" * 76 + "\n"

    def kernel(n_in: int, n_out: int, src_kb: int, strides: bool):
        names = ["a"] + [f"i{j}" for j in range(n_in - 1)]
        outs = ["o"] + [f"p{j}" for j in range(n_out - 1)]
        src = body + ("  // " + " ".join(f"{m}_strides" for m in names) + "\n"
                      if strides else "") + pad * (src_kb * 1024 // len(pad))
        k = mx.fast.cuda_kernel(name=f"probe_{n_in}_{n_out}_{src_kb}_{int(strides)}",
                                input_names=names, output_names=outs, source=src,
                                header=head)

        def call(y):
            return k(inputs=[y] + extra[:n_in - 1], grid=(1024, 1, 1),
                     threadgroup=(128, 1, 1), output_shapes=[y.shape] * n_out,
                     output_dtypes=[mx.float32] * n_out)[0]
        return call

    def dispatch_us(f) -> float:
        ts = []
        for _ in range(30):
            y = x
            for _ in range(n_layers):
                y = f(y)
            mx.synchronize()
            t0 = time.perf_counter()
            mx.async_eval(y)
            ts.append(time.perf_counter() - t0)
            mx.eval(y)
        ts.sort()
        return ts[len(ts) // 2] / n_layers * 1e6

    probes = {"mx add": lambda y: y + 1}
    for n_in, n_out, kb, st in ((1, 1, 0, False), (10, 1, 0, False), (10, 3, 0, False),
                                (10, 3, 0, True), (17, 2, 0, False), (1, 1, 8, False),
                                (1, 1, 18, False), (10, 3, 18, True)):
        probes[f"cuda_kernel {n_in} in, {n_out} out, {kb} KB source"
               + (", strides" if st else "")] = kernel(n_in, n_out, kb, st)
    # The body read by NVRTC from a file (an absolute #include): the source MLX rebuilds
    # and hashes per call shrinks to one line.
    inc = Path("/tmp/mlx_lm_turbo_probe.inc")
    inc.write_text(body + pad * (18 * 1024 // len(pad)))
    k_inc = mx.fast.cuda_kernel(name="probe_include", input_names=["a"], output_names=["o"],
                                source=f'#include "{inc}"\n', header=head)
    probes["cuda_kernel 1 in, 1 out, 18 KB #included"] = lambda y: k_inc(
        inputs=[y], grid=(1024, 1, 1), threadgroup=(128, 1, 1), output_shapes=[y.shape],
        output_dtypes=[mx.float32])[0]
    rows = {}
    for name, f in probes.items():
        try:
            ok = mx.array_equal(f(x), x + 1).item()
        except Exception as e:  # e.g. NVRTC cannot open the include
            rows[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
            continue
        rows[name] = dict(correct=ok, build=round(host_us(lambda: f(x), 500), 2),
                          dispatch=round(dispatch_us(f), 2))
    return rows


def no_append(caches: list) -> None:
    """Make every cache's update return its current S tokens without writing (the same
    attention work each step, no append ops)."""
    for c in caches:
        if isinstance(c, TurboKVCache):
            views = c.keys_and_values()
            c.update_and_fetch = lambda k, v, views=views: views
        else:
            ks, vs = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
            c.update_and_fetch = lambda k, v, ks=ks, vs=vs: (ks, vs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--kinds", default="bf16,mse3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op tables")
    a = ap.parse_args()
    patch.apply()
    res = {"env": dict(mlx=mx.__version__, device=str(mx.default_device()), argv=sys.argv)}
    if not a.no_ops:
        res["op_us"] = op_costs(a.context)
        res["host_us"] = host_costs()
        res["call_us"] = call_costs()
        print(json.dumps({k: res[k] for k in ("op_us", "host_us", "call_us")}, indent=1),
              flush=True)
    model = llama_3b_shaped()
    rows = res["e2e"] = []
    for kind in a.kinds.split(","):
        caches = filled_caches(kind, a.context, len(model.layers))
        with model_attention(kind):
            full, build, dispatch = sync_steps(model, caches, a.steps)
            pipe = pipelined_steps(model, caches, a.steps)
            if not kind.startswith("no_attention"):   # (no append to take out)
                no_append(caches)
            attn_only, build_na, _ = sync_steps(model, caches, a.steps)
        ms = lambda x: round(x * 1e3, 3)
        row = dict(cache=kind, context=a.context, full_ms=ms(full), build_ms=ms(build),
                   idle_dispatch_ms=ms(dispatch),
                   no_append_ms=ms(attn_only), no_append_build_ms=ms(build_na),
                   pipelined_ms=ms(pipe["total"]), pipe_build_ms=ms(pipe["build"]),
                   pipe_dispatch_ms=ms(pipe["dispatch"]), pipe_wait_ms=ms(pipe["wait"]),
                   peak_above_resident_mb=round(pipe["peak_above_resident"] / 2**20, 1))
        rows.append(row)
        print(row, flush=True)
        del caches
        gc.collect()
        mx.clear_cache()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "profile_e2e.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
