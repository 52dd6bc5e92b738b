"""Per-step host and step times of the end-to-end model (Llama-3.2-3B-shaped, random bf16
weights), the cache kinds run in blocks one after another in a given order: whether a
step is set by the host (pipelined step ≈ build + dispatch) or by the GPU, and how the
host's speed drifts during a run.

    python scripts/step_blocks.py --out DIR [--context 32768] [--steps 40]
        [--order mse3,mse3,no_attention,mse3,bf16,mse3,bf16,bf16,mse3,no_attention,mse3]

Per block, medians over its steps, ms: synchronous ``build`` (host time to build the
step's graph), ``dispatch`` (host time of ``mx.async_eval`` with the GPU idle), ``eval``
(the wait for the GPU after that), then ``pipelined`` (as mlx_lm.generate decodes: step
n+1 built and queued while step n runs). ``replans``: calls of the fused kernels' general
path (``decode.cached_plan``) in the block, 0 once a cache's steady step is memoised.
MLX's own switches apply (``MLX_USE_CUDA_GRAPHS=0``, ``MLX_CUDA_GRAPH_CACHE_SIZE``).
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.kernels import decode  # noqa: E402
# (scripts/ is on sys.path when this runs as a script)
from bench_attention import (filled_caches, llama_3b_shaped, model_attention,  # noqa: E402
                             pipelined_steps, sync_steps)

REPLANS = [0]


def _counting_plan():
    plan = decode.cached_plan

    def counted(*args, **kwargs):
        REPLANS[0] += 1
        return plan(*args, **kwargs)
    decode.cached_plan = counted


def block(model, caches, kind: str, steps: int) -> dict:
    """One block of ``steps`` synchronous then ``steps`` pipelined steps of a kind, each
    step's times in ms: sync (build, dispatch, eval), pipelined (build, dispatch, wait)."""
    sync, pipe = [], []
    REPLANS[0] = 0
    with model_attention(kind):
        sync_steps(model, caches, steps, per_step=sync)
        pipelined_steps(model, caches, steps, per_step=pipe)
    ms = lambda ts: [tuple(round(t * 1e3, 3) for t in step) for step in ts]
    return dict(kind=kind, sync=ms(sync), pipelined=ms(pipe), replans=REPLANS[0])


def summary(b: dict) -> dict:
    med = lambda xs: round(statistics.median(xs), 3)
    s, p = b["sync"], b["pipelined"]
    return dict(kind=b["kind"], build=med(x[0] for x in s), dispatch=med(x[1] for x in s),
                host=med(x[0] + x[1] for x in s), eval=med(x[2] for x in s),
                pipelined=med(sum(x) for x in p), replans=b["replans"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--order", default="mse3,mse3,no_attention,mse3,bf16,mse3,bf16,bf16,"
                                        "mse3,no_attention,mse3")
    a = ap.parse_args()
    patch.apply()
    _counting_plan()
    model = llama_3b_shaped()
    order = a.order.split(",")
    caches = {k: filled_caches(k, a.context, len(model.layers)) for k in dict.fromkeys(order)}
    res = dict(context=a.context, env={n: os.environ.get(n) for n in (
        "MLX_USE_CUDA_GRAPHS", "MLX_CUDA_GRAPH_CACHE_SIZE", "MLX_MAX_OPS_PER_BUFFER",
        "MLX_MAX_MB_PER_BUFFER")}, blocks=[])
    print(f"{'kind':14s} {'build':>7s} {'dispatch':>9s} {'host':>7s} {'eval':>7s} "
          f"{'pipelined':>10s} replans   (ms per step, S={a.context})", flush=True)
    for kind in order:
        b = block(model, caches[kind], kind, a.steps)
        b["summary"] = summary(b)
        res["blocks"].append(b)
        s = b["summary"]
        print(f"{kind:14s} {s['build']:7.2f} {s['dispatch']:9.2f} {s['host']:7.2f} "
              f"{s['eval']:7.2f} {s['pipelined']:10.2f} {s['replans']:7d}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"step_blocks_{a.context}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
