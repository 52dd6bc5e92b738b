"""Python host time per layer of our steady decode step, without its launch: the cache's
append (``TurboKVCache.update_and_fetch``, in-place path) and the patched attention's
dispatch (``decode_attention``'s memoised branch), with the appending launch replaced by
a dependency node, as ``bench_attention.py --kinds mse3_no_launch`` does. Runs on the CPU
backend too (the memo is set up by hand), so the Python can be timed without a GPU.

    python scripts/step_python.py [--layers 28] [--steps 150]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import no_launch  # noqa: E402
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.kernels import decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=150)
    a = ap.parse_args()
    patch.apply()
    q = mx.random.normal((1, 24, 1, 128)).astype(mx.bfloat16)
    new = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    mx.eval(q, new)
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return no_launch(*args)

    # A memo as decode_attention leaves it after its checked first steady call, the
    # launches replaced (their first-use verdicts: passed).
    live_key, append_key = ("step_python", "live"), ("step_python", "append")
    decode._checked[live_key] = decode._checked[append_key] = True
    caches = []
    for layer in range(a.layers):
        c = TurboKVCache("turboquant_mse", 3, "turboquant_mse", 3, layer=layer)
        c.update_and_fetch(*(mx.random.normal((1, 8, 100, 128)).astype(mx.bfloat16),) * 2)
        mx.eval(c.keys, c.values)
        c._fused_steady = (decode._steady_sig(q, 0.088, c), None, live_key, append_key,
                           counted)
        caches.append(c)
    sdpa = patch.scaled_dot_product_attention

    def step():
        outs = []
        for c in caches:
            keys, values = c.update_and_fetch(new, new)
            outs.append(sdpa(q, keys, values, c, 0.088, None))
        return outs

    for _ in range(5):
        mx.eval(step())
    times = []
    for _ in range(a.steps):
        if caches[0].offset >= caches[0].capacity:   # (the in-place path ends there)
            break
        t = time.perf_counter()
        outs = step()
        times.append(time.perf_counter() - t)
        mx.eval(outs)
    assert calls[0] == (5 + len(times)) * a.layers, "a step left the memoised path"
    us = [t / a.layers * 1e6 for t in times]
    print(f"our Python per layer: median {statistics.median(us):.2f} us, min {min(us):.2f} "
          f"({len(times)} steps of {a.layers} layers, {mx.default_device()})")


if __name__ == "__main__":
    main()
