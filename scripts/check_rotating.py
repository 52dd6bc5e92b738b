"""Sliding-window layers compressed end to end: SmolLM2 loaded with Gemma-3-style layer
types (5 sliding-window layers of 512 tokens, then 1 full-attention layer, five times; or
a model's own sliding-window layers with ``--own-layers``),
a 2048-token prompt from a book, then decoding past the window with mlx-lm's caches and
with every layer compressed (our flags, weights dequantized, float32).

    python scripts/check_rotating.py --model models/smollm2-135m --text book.txt \
        --kv-method turboquant_mse --kv-bits 4

Prints the cache classes, the KV bytes held, the mean negative log-likelihood of the
book's next ``--nll-tokens`` tokens read one at a time through each cache (teacher
forced: every one past the window), and both greedy continuations.
"""

import argparse
import math
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.config import add_arguments, config_from_args  # noqa: E402
from mlx_lm_turbo.eval_tasks import load_model  # noqa: E402
from mlx_lm_turbo.prompt_cache import make_prompt_cache as make_turbo_cache  # noqa: E402

LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 5
WINDOW = 512


def greedy(model, prompt: mx.array, caches: list, n: int) -> list:
    return [int(y) for y, _ in generate_step(prompt, model, prompt_cache=caches, max_tokens=n)]


def next_token_nll(model, prompt: mx.array, text: mx.array, caches: list) -> float:
    """Mean NLL of ``text`` after ``prompt``, the prompt in one block, then a token at a
    time (the decode path)."""
    logits = model(prompt[None], cache=caches)[0, -1]
    total = 0.0
    for i in range(text.size):
        total += (mx.logsumexp(logits) - logits[text[i]]).item()
        logits = model(text[i:i + 1][None], cache=caches)[0, -1]
    return total / text.size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="a long text (a book)")
    p.add_argument("--start", type=int, default=20000, help="first prompt token in the text")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--nll-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=40, help="greedy continuation length")
    p.add_argument("--own-layers", action="store_true",
                   help="keep the model's own layer types (a model with sliding-window "
                        "layers, e.g. Gemma 3) instead of the Gemma-3-style override")
    p.add_argument("--kv-bits", type=int, default=None, help="as mlx_lm.generate's")
    add_arguments(p)
    args = p.parse_args(argv)
    config = config_from_args(args)
    if config is None:
        p.error("give --kv-method (and its bits)")

    model, tokenizer = load_model(args.model, None if args.own_layers else
                                  {"sliding_window": WINDOW, "layer_types": LAYER_TYPES})
    ids = tokenizer.encode(Path(args.text).read_text())
    end = args.start + args.prompt_tokens
    prompt, text = mx.array(ids[args.start:end]), mx.array(ids[end:end + args.nll_tokens])
    runs = {"mlx-lm": lambda: mlx_cache.make_prompt_cache(model),
            "compressed": lambda: make_turbo_cache(model, config)}
    fp16 = runs["mlx-lm"]()
    model(prompt[:1][None], cache=fp16)   # (allocates the caches: their dtype is read below)
    n_rot = sum(type(c) is mlx_cache.RotatingKVCache for c in fp16)
    windows = sorted({c.max_size for c in fp16 if type(c) is mlx_cache.RotatingKVCache})
    print(f"mlx-lm's caches: {n_rot} RotatingKVCache (window {windows}) of {len(fp16)} layers")
    print(f"{config.describe()}: {sum(isinstance(c, TurboKVCache) for c in runs['compressed']())}"
          f"/{len(fp16)} layers compressed")
    out = {}
    for name, make in runs.items():
        caches = make()
        nll = next_token_nll(model, prompt, text, caches)
        out[name] = {"nll": nll, "bytes": sum(c.nbytes for c in caches),
                     "greedy": greedy(model, prompt, make(), args.tokens)}
        print(f"{name:10s}: NLL of the next {text.size} tokens {nll:.4f} "
              f"(perplexity {math.exp(nll):.2f}); KV held after {prompt.size + text.size} "
              f"tokens {out[name]['bytes'] / 2**20:.2f} MiB")
    ref, got = out["mlx-lm"], out["compressed"]
    fp16_bytes = ref["bytes"] * 2 / fp16[0].keys.dtype.size   # (the model runs in float32)
    print(f"compressed KV: {100 * got['bytes'] / fp16_bytes:.1f}% of mlx-lm's caches in fp16; "
          f"perplexity {100 * (math.exp(got['nll'] - ref['nll']) - 1):+.1f}%")
    same = next((i for i, (a, b) in enumerate(zip(ref["greedy"], got["greedy"])) if a != b),
                len(ref["greedy"]))
    print(f"greedy tokens equal for the first {same} of {len(ref['greedy'])}")
    for name in runs:
        print(f"{name:10s}:", repr(tokenizer.decode(out[name]["greedy"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
