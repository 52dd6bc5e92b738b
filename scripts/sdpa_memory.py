"""Which MLX SDPA calls run fused on this device: the peak memory of one
``mx.fast.scaled_dot_product_attention`` call per dtype, mask and key length, next to the
size of its float32 scores (an unfused call materialises them).

    python scripts/sdpa_memory.py --out reports/sdpa_memory [--heads 24 --kv-heads 8 --dim 128]
"""

import argparse
import json

import mlx.core as mx


def peak_of_call(q, k, v, mask) -> int:
    mx.eval(q, k, v, mask if isinstance(mask, mx.array) else [])
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1, mask=mask))
    return mx.get_peak_memory() - base


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--keys", default="8192,32768")
    ap.add_argument("--out", default="sdpa_memory")
    args = ap.parse_args(argv)
    L, rows = args.queries, []
    print("| dtype | mask | keys | peak MB | float32 scores MB | fused |\n|---|---|---|---|---|---|")
    for S in (int(s) for s in args.keys.split(",")):
        for dtype in (mx.bfloat16, mx.float16, mx.float32):
            q = mx.random.normal((1, args.heads, L, args.dim)).astype(dtype)
            k = mx.random.normal((1, args.kv_heads, S, args.dim)).astype(dtype)
            v = mx.random.normal((1, args.kv_heads, S, args.dim)).astype(dtype)
            causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
            for name, mask in (("none", None), ("causal", "causal"), ("bool array", causal)):
                peak = peak_of_call(q, k, v, mask)
                scores = 4 * args.heads * L * S
                row = {"dtype": str(dtype).split(".")[-1], "mask": name, "keys": S,
                       "peak_bytes": peak, "scores_bytes": scores,
                       "fused": peak < scores / 2}
                rows.append(row)
                print(f"| {row['dtype']} | {name} | {S} | {peak / 1e6:.0f} | "
                      f"{scores / 1e6:.0f} | {'yes' if row['fused'] else 'no'} |", flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"device": str(mx.default_device()), "mlx": mx.__version__,
                   "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
