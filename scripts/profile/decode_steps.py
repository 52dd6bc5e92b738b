"""Per-token decode times right after a real prompt prefill through mlx-lm's
``generate_step`` (the Llama-3.2-3B-shaped model of ``bench_attention.py``): bf16 against
``turboquant_mse`` kinds with and without key statistics, each run's token times kept, first use
apart. Where ``bench_generate.py`` gives one tok/s per run, this shows how the step time
moves within and between runs.

    python scripts/profile/decode_steps.py --context 32768 --kinds bf16,kv3,kv3raw,kv4 --rounds 2
"""

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as mlx_cache  # noqa: E402

from bench_attention import llama_3b_shaped  # noqa: E402
from bench_generate import kind_config  # noqa: E402
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.prompt_cache import make_prompt_cache  # noqa: E402


def make_cache(model, kind: str):
    """``bf16``, or a ``bench_generate`` kind (``kv3``, ``mse3``, ``k5v3``, ...) with the
    default key statistics, or with none when it ends in ``raw``."""
    if kind == "bf16":
        return mlx_cache.make_prompt_cache(model)
    raw = kind.endswith("raw")
    cfg = kind_config(kind[:-3] if raw else kind)
    if cfg is None:
        raise ValueError(f"unknown kind {kind!r}")
    if raw:
        cfg = dataclasses.replace(cfg, center_keys=False, scale_keys=False)
    return make_prompt_cache(model, cfg)


def run(model, prompt, kind: str, tokens: int) -> dict:
    gc.collect()
    mx.clear_cache()
    caches = make_cache(model, kind)
    gen = generate_step(prompt, model, max_tokens=tokens + 1, prompt_cache=caches,
                        prefill_step_size=2048)
    t0 = time.perf_counter()
    next(gen)
    times = [time.perf_counter()]
    for _ in gen:
        times.append(time.perf_counter())
    steps = [1e3 * (b - a) for a, b in zip(times, times[1:])]
    steady = sorted(steps[10:]) or sorted(steps)
    return {"kind": kind, "prefill_s": times[0] - t0, "step_ms": steps,
            "median_ms": steady[len(steady) // 2],
            "tok_s_after_10": len(steps[10:]) / (sum(steps[10:]) / 1e3) if steps[10:] else 0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--kinds", default="bf16,kv3,kv3raw,kv4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--layers", type=int, default=28, help="fewer for a quick try")
    ap.add_argument("--out", default="decode_steps.json")
    args = ap.parse_args(argv)
    patch.apply()
    model = llama_3b_shaped(args.layers)
    prompt = mx.random.randint(0, model.args.vocab_size, (args.context,), key=mx.random.key(0))
    kinds = args.kinds.split(",")
    rows = []
    for r in range(args.rounds + 1):   # the first pass is first use (kernel JIT, checks)
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            row = run(model, prompt, kind, 20 if r == 0 else args.tokens)
            row["round"] = r
            rows.append(row)
            print(f"round {r} {kind:8s} prefill {row['prefill_s']:.2f} s, median step "
                  f"{row['median_ms']:.2f} ms, {row['tok_s_after_10']:.1f} tok/s after 10",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"context": args.context, "device": str(mx.default_device()),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
