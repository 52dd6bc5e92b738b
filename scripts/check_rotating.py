"""Sliding-window layers compressed end to end: SmolLM2 loaded with Gemma-3-style layer
types (5 sliding-window layers of 512 tokens, then 1 full-attention layer, five times),
a 2048-token book prompt, the greedy continuation with mlx-lm's fp16 caches and with
``--kv-method`` compression of every layer.

    python scripts/check_rotating.py [--model models/smollm2-135m] [--bits 4]

Prints the cache classes, the KV bytes held by each run's caches, and both continuations.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache
from mlx_lm.utils import load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_lm_turbo.cache import TurboConfig, TurboKVCache  # noqa: E402
from mlx_lm_turbo.prompt_cache import make_prompt_cache as make_turbo_cache  # noqa: E402

LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 5
WINDOW = 512


def continuation(model, prompt: mx.array, caches: list, n: int) -> tuple:
    t0 = time.perf_counter()
    steps = generate_step(prompt, model, prompt_cache=caches, max_tokens=n)
    tokens = [int(y) for y, _ in steps]
    return tokens, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "data"
                                         / "book_pride_and_prejudice.txt"))
    p.add_argument("--method", default="turboquant_mse")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=40)
    args = p.parse_args(argv)

    model, tokenizer = load(args.model, model_config={"sliding_window": WINDOW,
                                                      "layer_types": LAYER_TYPES})
    text = Path(args.text).read_text()
    prompt = mx.array(tokenizer.encode(text)[:args.prompt_tokens])

    fp16 = mlx_cache.make_prompt_cache(model)
    kinds = {type(c).__name__ for c in fp16}
    n_rot = sum(type(c) is mlx_cache.RotatingKVCache for c in fp16)
    print(f"mlx-lm's caches: {n_rot} RotatingKVCache (window {WINDOW}) of {len(fp16)} "
          f"layers ({', '.join(sorted(kinds))})")
    ref, t_ref = continuation(model, prompt, fp16, args.tokens)

    config = TurboConfig(args.method, args.bits)
    turbo = make_turbo_cache(model, config)
    got, t_got = continuation(model, prompt, turbo, args.tokens)
    compressed = sum(isinstance(c, TurboKVCache) for c in turbo)

    fp16_bytes = sum(c.nbytes for c in fp16)
    turbo_bytes = sum(c.nbytes for c in turbo)
    print(f"{config.describe()}: {compressed}/{len(turbo)} layers compressed")
    print(f"KV bytes after {prompt.size} + {args.tokens} tokens: fp16 {fp16_bytes / 2**20:.2f}"
          f" MiB, compressed {turbo_bytes / 2**20:.2f} MiB "
          f"({100 * turbo_bytes / fp16_bytes:.1f}% of fp16)")
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    print(f"greedy tokens equal to fp16's for the first {same} of {len(ref)} "
          f"(fp16 {t_ref:.1f} s, compressed {t_got:.1f} s)")
    print("fp16      :", repr(tokenizer.decode(ref)))
    print("compressed:", repr(tokenizer.decode(got)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
