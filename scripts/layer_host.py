"""Host time per layer of a decode step's attention, measured in a chain of 28 layers (a
3072x3072 bf16 matmul each, then the piece measured, its output added back), as a model
builds and queues them: µs per layer to build the chain's graph and to queue it with the
GPU idle (``mx.async_eval``). The pieces: nothing, ours (TurboKVCache.update_and_fetch +
the patched attention: one appending launch a layer at 3 bits), mlx-lm's KVCache + SDPA
(bf16), and a trivial custom kernel given 17 or 12 small inputs and 2 outputs (what an
input costs).

    python scripts/layer_host.py --out DIR [--context 32768]
    PKG_ROOT=/path/to/other/checkout python scripts/layer_host.py ...   # another version

``PKG_ROOT``: import mlx_lm_turbo from there instead (A/B of two versions on one machine).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
if os.environ.get("PKG_ROOT"):
    sys.path.insert(0, os.environ["PKG_ROOT"])
from mlx_lm.models.cache import KVCache  # noqa: E402
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402

LAYERS = 28


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chains", type=int, default=30)
    a = ap.parse_args()
    patch.apply()
    S = a.context
    w = (mx.random.normal((3072, 3072)) * 0.01).astype(mx.bfloat16)
    x0 = mx.random.normal((1, 3072)).astype(mx.bfloat16)
    ours, kvs = [], []
    for layer in range(LAYERS):
        k = mx.random.normal((1, 8, S, 128)).astype(mx.bfloat16)
        c = TurboKVCache("turboquant_mse", 3, "turboquant_mse", 3, layer=layer)
        c.update_and_fetch(k, k)
        kv = KVCache()
        kv.update_and_fetch(k, k)
        mx.eval(c.keys, c.values, kv.keys, kv.values)
        ours.append(c)
        kvs.append(kv)
    mx.eval(w, x0)

    def split(y):   # queries (24 heads), and a new key and value (8 heads), from y
        kn = y[:, :1024].reshape(1, 8, 1, 128)
        return y.reshape(1, 24, 1, 128), kn, kn * 2

    def turbo(layer, y):
        q, kn, vn = split(y)
        keys, values = ours[layer].update_and_fetch(kn, vn)
        return patch.scaled_dot_product_attention(q, keys, values, ours[layer], 0.088, None)

    def bf16(layer, y):
        q, kn, vn = split(y)
        keys, values = kvs[layer].update_and_fetch(kn, vn)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.088)

    small = [mx.zeros((4,), mx.float32) + j for j in range(17)]
    mx.eval(small)

    def probe(n_in: int):
        kernel = mx.fast.cuda_kernel(
            name=f"layer_host_probe_{n_in}", input_names=[f"i{j}" for j in range(n_in)],
            output_names=["o", "p"], ensure_row_contiguous=False,
            source="  if (threadIdx.x == 0 && blockIdx.x == 0) p[0] = 0.f;\n")

        def f(layer, y):
            q, kn, vn = split(y)
            return kernel(inputs=[q] + small[1:n_in - 2] + [kn, vn], grid=(256, 8, 1),
                          threadgroup=(256, 1, 1),
                          output_shapes=[(8 * 65 * 8 * 130,), (1, 24, 1, 128)],
                          output_dtypes=[mx.float32, mx.bfloat16])[1]
        return f

    def chain(piece):
        y = x0
        for layer in range(LAYERS):
            y = y @ w
            if piece is not None:
                y = y + piece(layer, y).reshape(1, 3072)
        return y

    def measure(piece) -> tuple[float, float]:
        for _ in range(3):
            mx.eval(chain(piece))
        build, dispatch = [], []
        for _ in range(a.chains):
            mx.synchronize()
            t0 = time.perf_counter()
            y = chain(piece)
            t1 = time.perf_counter()
            mx.async_eval(y)
            t2 = time.perf_counter()
            mx.eval(y)
            build.append(t1 - t0)
            dispatch.append(t2 - t1)
        us = lambda xs: round(statistics.median(xs) * 1e6 / LAYERS, 2)
        return us(build), us(dispatch)

    for _ in range(3):   # first uses and the steady step's memo
        mx.eval([turbo(layer, x0 @ w) for layer in range(LAYERS)])
    pieces = [("matmul only", None), ("ours (layer step)", turbo),
              ("bf16 KVCache + SDPA", bf16)]
    if hasattr(mx.fast, "cuda_kernel") and mx.default_device() == mx.gpu:
        pieces += [("kernel, 17 small inputs", probe(17)), ("kernel, 12 small inputs", probe(12))]
    pieces += [("ours again", turbo), ("matmul only again", None)]
    res = dict(context=S, pkg_root=os.environ.get("PKG_ROOT"), us_per_layer={})
    print(f"{'piece':28s} {'build':>7s} {'dispatch':>9s}   (µs per layer)", flush=True)
    for name, piece in pieces:
        b, d = measure(piece)
        res["us_per_layer"][name] = dict(build=b, dispatch=d)
        print(f"{name:28s} {b:7.2f} {d:9.2f}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    tag = "_" + Path(os.environ["PKG_ROOT"]).name if os.environ.get("PKG_ROOT") else ""
    (Path(a.out) / f"layer_host{tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
