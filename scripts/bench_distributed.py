"""Decode speed and per-GPU memory at long context: mlx-lm's fp16 cache vs ours, one run.

A random-weight Llama-3.1-8B-shaped model (mlx_lm.models.llama: 32 layers, hidden 4096,
32 query / 8 KV heads, head_dim 128, MLP 14336, vocab 128256, bf16). The caches are filled
to ``--context`` tokens with random K/V (no prefill: mlx-lm's cache gets its buffers set
directly, ours encodes them chunk by chunk through ``update_and_fetch``), then ``--decode``
tokens are decoded greedily and timed. Memory per rank: ``mx.get_peak_memory``
of decode (warm-up included; the fill's peak is reported apart),
``mx.get_active_memory`` after it, and the cache's own bytes.

One process:   python scripts/bench_distributed.py --out reports/distributed_gpu.json
N ranks:       mlx.launch --backend nccl -n 2 -- python scripts/bench_distributed.py --backend nccl --out ...
(tensor sharding via ``model.shard(group)``, as mlx-lm's ``sharded_load`` does for llama).
``--tiny`` runs tiny shapes (CPU smoke test).

Memory on one 80 GB H100: weights 16 GB; fp16 cache at 64k = 8.6 GB (+8.6 GB transient
when its buffer grows at the first decode step); ours at 3 bits ~1.8 GB.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache  # noqa: E402

LLAMA_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=False)
TINY = dict(LLAMA_8B, hidden_size=256, num_hidden_layers=2, intermediate_size=512,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=None, help="tokens in the cache (65536)")
    p.add_argument("--decode", type=int, default=None, help="timed decode steps (64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--bits", type=int, default=3, help="our cache: K and V bits")
    p.add_argument("--method", default="turboquant_mse", help="our cache: method")
    p.add_argument("--chunk", type=int, default=8192, help="tokens encoded per call (ours)")
    p.add_argument("--backend", default="any",
                   help="mx.distributed backend (any, ring, nccl, mpi)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.context is None:
        args.context = 1024 if args.tiny else 65536
    if args.decode is None:
        args.decode = 8 if args.tiny else 64
    return args


def build_model(shape: dict, group) -> llama.Model:
    """Random bf16 weights, sharded over ``group`` when there are several ranks."""
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(shape))
    model.set_dtype(mx.bfloat16)
    if group.size() > 1:
        model.shard(group)
    # Evaluate one layer at a time: the fp32 initial values are transient per layer.
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def kv_shape(model, n: int) -> tuple:
    attn = model.layers[0].self_attn
    return (1, attn.n_kv_heads, n, attn.head_dim)


def fp16_caches(model, context: int) -> list:
    """mlx-lm's KVCache per layer holding ``context`` random tokens (buffers set directly)."""
    caches = []
    for _ in model.layers:
        c = KVCache()
        shape = kv_shape(model, context)
        c.state = (mx.random.normal(shape, dtype=mx.bfloat16),
                   mx.random.normal(shape, dtype=mx.bfloat16), context)
        mx.eval(c.keys, c.values)
        caches.append(c)
    return caches


def turbo_caches(model, context: int, config: TurboConfig, chunk: int) -> list:
    """Our cache per layer, ``context`` random tokens encoded ``chunk`` at a time."""
    caches = []
    for i, _ in enumerate(model.layers):
        c = TurboKVCache.from_config(config, i)
        for start in range(0, context, chunk):
            shape = kv_shape(model, min(chunk, context - start))
            c.update_and_fetch(mx.random.normal(shape, dtype=mx.bfloat16),
                               mx.random.normal(shape, dtype=mx.bfloat16))
            mx.eval(c.keys, c.values)
        caches.append(c)
    return caches


def decode(model, caches: list, steps: int, token: int = 1) -> tuple:
    """Greedy decode ``steps`` tokens; (seconds, last token)."""
    y = mx.array([[token]])
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        y = model(y, cache=caches)[:, -1:].argmax(-1)
        mx.eval(y)
    return time.perf_counter() - t0, int(y.item())


def run_one(name: str, model, make_caches, args, group) -> dict:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    caches = make_caches()
    fill_s = time.perf_counter() - t0
    fill_peak = mx.get_peak_memory() / MIB  # includes the random K/V being encoded
    mx.reset_peak_memory()
    decode(model, caches, args.warmup)  # the first step grows the buffers once
    seconds, _ = decode(model, caches, args.decode)
    mine = [sum(c.nbytes for c in caches) / MIB, mx.get_peak_memory() / MIB,
            mx.get_active_memory() / MIB, fill_peak]
    # Every rank's numbers on every rank (float32 MiB: plenty of precision here).
    ranks = mx.distributed.all_gather(mx.array([mine], mx.float32), group=group) \
        if group.size() > 1 else mx.array([mine], mx.float32)
    ranks = ranks.tolist()
    del caches
    return {"cache": name, "context": args.context, "decode_steps": args.decode,
            "decode_tok_s": args.decode / seconds, "fill_s": fill_s,
            "kv_bytes_per_rank": int(mine[0] * MIB),
            "per_rank": [{"rank": r, "kv_mib": k, "peak_mib": p, "active_mib": a,
                          "fill_peak_mib": f} for r, (k, p, a, f) in enumerate(ranks)]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    patch.apply()  # our attention for TurboKVCache layers
    group = mx.distributed.init(backend=args.backend)
    shape = TINY if args.tiny else LLAMA_8B
    model = build_model(shape, group)
    weights_mib = mx.get_active_memory() / MIB
    config = TurboConfig(args.method, args.bits)
    results = [
        run_one("fp16", model, lambda: fp16_caches(model, args.context), args, group),
        run_one(f"{config.describe()}", model,
                lambda: turbo_caches(model, args.context, config, args.chunk), args, group),
    ]
    out = {"model": "random Llama-3.1-8B-shaped" if not args.tiny else "tiny random llama",
           "shape": shape, "dtype": "bfloat16", "world_size": group.size(),
           "device": str(mx.default_device()), "backend": args.backend,
           "context": args.context,
           "weights_mib_per_rank": weights_mib, "results": results}
    if group.rank() == 0:
        print(f"{out['model']}, {group.size()} rank(s), context {args.context}, "
              f"{args.decode} decode steps, weights {weights_mib:.0f} MiB/rank")
        print(f"{'cache':<24} {'decode tok/s':>12} {'KV MiB/rank':>12} "
              f"{'peak MiB (per rank)':>24} {'active MiB (per rank)':>24}")
        for r in results:
            peak = "/".join(f"{x['peak_mib']:.0f}" for x in r["per_rank"])
            active = "/".join(f"{x['active_mib']:.0f}" for x in r["per_rank"])
            print(f"{r['cache']:<24} {r['decode_tok_s']:>12.2f} "
                  f"{r['kv_bytes_per_rank'] / MIB:>12.1f} {peak:>24} {active:>24}")
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
