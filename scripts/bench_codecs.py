"""Codec table: bits/element (metadata counted), cosine, relative MSE, attention-output
error for a random query, encode time per token; mlx-lm's affine ``mx.quantize``
(group 64) on the same data for comparison.

    python scripts/bench_codecs.py [--tokens 2048] [--json reports/codecs.json]
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from mlx_lm_turbo import codecs

CONFIGS = [("turboquant_mse", b) for b in (1, 2, 3, 4)] + [
    ("turboquant_prod", b) for b in (2, 3, 4)] + [("turboquant_rvq", b) for b in (1, 2)] + [
    ("polar", b) for b in (3, 4)] + [("qjl", b) for b in (1, 3, 4)]


def make_data(tokens: int, heads: int, dim: int, seed: int = 0) -> tuple[mx.array, mx.array]:
    """Gaussian keys with a few 10x outlier channels (like keys after RoPE), plain values."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, heads, tokens, dim)).astype(np.float32)
    k[..., rng.choice(dim, 4, replace=False)] *= 10
    v = rng.standard_normal((1, heads, tokens, dim)).astype(np.float32)
    return mx.array(k).astype(mx.float16), mx.array(v).astype(mx.float16)


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    s = (q @ k.swapaxes(-1, -2)) / np.sqrt(q.shape[-1])
    return mx.softmax(s, -1) @ v


def metrics(x: mx.array, xh: mx.array) -> tuple[float, float]:
    x, xh = x.astype(mx.float32), xh.astype(mx.float32)
    cos = (x * xh).sum(-1) / (mx.linalg.norm(x, axis=-1) * mx.linalg.norm(xh, axis=-1) + 1e-30)
    rel = ((x - xh) ** 2).sum() / (x * x).sum()
    return float(cos.mean()), float(rel)


def timed(fn, *args, repeat: int = 3):
    out = fn(*args)
    mx.eval(out)
    t = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn(*args))
    return out, (time.perf_counter() - t) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    k, v = make_data(args.tokens, args.heads, args.dim)
    q = mx.random.normal((1, args.heads, 1, args.dim), key=mx.random.key(1))
    ref_out = attention(q, k.astype(mx.float32), v.astype(mx.float32))
    n_tok = args.tokens * args.heads
    rows = []
    for method, bits in CONFIGS:
        c = codecs.make(method, bits=bits, dim=args.dim, seed=0, keys=True)
        pk, t = timed(c.encode, k)
        kh = c.decode(pk)
        vh = kh if method in codecs.VALUE_METHODS else None
        cos, rel = metrics(k, kh)
        # Attention output error with K through this codec (V through it too when the
        # method can carry values, else V exact): relative L2 error of the output.
        if vh is not None:
            vc = codecs.make(method, bits=bits, dim=args.dim, seed=0)
            vh = vc.decode(vc.encode(v))
        out = attention(q, kh, vh if vh is not None else v.astype(mx.float32))
        att = float(mx.linalg.norm(out - ref_out) / mx.linalg.norm(ref_out))
        rows.append(dict(method=method, bits=bits, bits_per_element=c.bits_per_element,
                         cosine=cos, rel_mse=rel, attn_rel_err=att,
                         encode_us_per_token=1e6 * t / n_tok))
    for bits in (2, 3, 4, 8):
        qk, t = timed(lambda x: mx.quantize(x, group_size=64, bits=bits), k)
        kh = mx.dequantize(*qk, group_size=64, bits=bits)
        vh = mx.dequantize(*mx.quantize(v, group_size=64, bits=bits), group_size=64, bits=bits)
        cos, rel = metrics(k, kh)
        out = attention(q, kh.astype(mx.float32), vh.astype(mx.float32))
        att = float(mx.linalg.norm(out - ref_out) / mx.linalg.norm(ref_out))
        rows.append(dict(method="mlx affine g64", bits=bits, bits_per_element=bits + 32 / 64,
                         cosine=cos, rel_mse=rel, attn_rel_err=att,
                         encode_us_per_token=1e6 * t / n_tok))
    print(f"data: (1, {args.heads}, {args.tokens}, {args.dim}) fp16 keys with 4 outlier "
          "channels x10, Gaussian values; attention error = relative L2 of a random query's "
          "output with K and V both coded (prod/qjl: V exact)")
    print("| method | bits | bits/elt | cosine | rel. MSE | attn. err | encode µs/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['bits_per_element']:.3f} | {r['cosine']:.4f} | "
              f"{r['rel_mse']:.4f} | {r['attn_rel_err']:.4f} | {r['encode_us_per_token']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
