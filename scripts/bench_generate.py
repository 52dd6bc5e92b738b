"""End to end through mlx-lm's own ``generate_step``: a real prompt prefill, then decoding.

For each context length and cache kind: prefill time (the prompt in 2048-token steps up to
the first generated token), prefill peak memory (``mx.get_peak_memory`` over it), KV bytes
held after it, and decode tokens/s right after the prompt (pipelined, as
``mlx_lm.generate`` decodes). The first round of each kind is first use (kernel JIT and
first-use checks) and is reported apart; the warm rounds alternate the kinds and report
medians. From the warm peaks a straight line per kind projects the longest prompt that
fits in ``--memory-gb``.

    # GPU: a Llama-3.2-3B-shaped model with random bf16 weights
    python scripts/bench_generate.py --shape llama-3b --contexts 4096,32768,131072 \
        --kinds bf16,kv2,kv3,kv4,kv3w64 --out reports/generate
    # CPU: a real model (weights run in float32), a book as the prompt
    python scripts/bench_generate.py --model models/smollm2-135m --contexts 4096,16384 \
        --kinds fp32,kv3,kv4 --text book.txt --out reports/generate_cpu

Kinds: ``bf16``/``fp16``/``fp32`` (mlx-lm's KVCache, in the model's dtype), ``kv<b>``
(what ``--kv-bits b`` gives: ``turboquant_mse`` with b+1-bit keys and b-1-bit values),
``mse<b>`` (b-bit keys and values), ``kv<b>w<W>``/``mse<b>w<W>`` (with a W-token fp16
window), ``k<b>v<c>``
(``turboquant_mse``, b-bit keys and c-bit values), ``affine<b>``
(mlx-lm's ``--kv-bits b`` cache, compressed from the first token).
"""

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as mlx_cache  # noqa: E402

from bench_attention import llama_3b_shaped  # noqa: E402  (scripts/, beside this one)
from mlx_lm_turbo import patch  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.config import TurboConfig, split_bits  # noqa: E402
from mlx_lm_turbo.prompt_cache import make_prompt_cache  # noqa: E402


def load(args):
    """(model, prompt tokens of the longest context)."""
    n = max(args.contexts)
    if args.shape:
        model = llama_3b_shaped()
        vocab = model.args.vocab_size
        return model, mx.random.randint(0, vocab, (n,), key=mx.random.key(0))
    from mlx_lm_turbo.eval import load_model
    model, tokenizer = load_model(args.model)
    text = open(args.text, encoding="utf-8").read()
    ids = tokenizer.encode(text)
    while len(ids) < n:   # a short text repeats
        ids = ids + ids
    return model, mx.array(ids[:n])


def kind_config(kind: str):
    """The TurboConfig of an ``mse``/``kv``/``k<b>v<c>`` kind, or None for other kinds."""
    m = re.fullmatch(r"(mse|kv)(\d)(?:w(\d+))?", kind)
    if m:
        kb, vb = split_bits("turboquant_mse", int(m[2])) if m[1] == "kv" else (int(m[2]),) * 2
        return TurboConfig("turboquant_mse", kb, "turboquant_mse", vb,
                           fp16_window=int(m[3] or 0))
    m = re.fullmatch(r"k(\d)v(\d)", kind)
    if m:
        return TurboConfig("turboquant_mse", int(m[1]), "turboquant_mse", int(m[2]))
    return None


def make_cache(model, kind: str):
    """(cache list, generate_step keyword arguments) for a kind name."""
    cfg = kind_config(kind)
    if cfg is not None:
        return make_prompt_cache(model, cfg), {}
    m = re.fullmatch(r"affine(\d)", kind)
    if m:
        return (mlx_cache.make_prompt_cache(model),
                dict(kv_bits=int(m[1]), kv_group_size=64, quantized_kv_start=0))
    if kind in ("bf16", "fp16", "fp32"):
        return mlx_cache.make_prompt_cache(model), {}
    raise ValueError(f"unknown kind {kind!r}")


def kv_bytes(caches) -> int:
    return sum(c.nbytes for c in caches)


def run_one(model, prompt, kind: str, decode_tokens: int) -> dict:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    caches, kw = make_cache(model, kind)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    gen = generate_step(prompt, model, max_tokens=decode_tokens + 1, prompt_cache=caches,
                        prefill_step_size=2048, **kw)
    next(gen)            # prefill + the first token
    t1 = time.perf_counter()
    peak = mx.get_peak_memory()
    held = kv_bytes(caches)
    n = sum(1 for _ in gen)
    t2 = time.perf_counter()
    row = {"kind": kind, "context": int(prompt.size), "prefill_s": t1 - t0,
           "prefill_peak_bytes": peak, "peak_over_start_bytes": peak - base,
           "start_bytes": base, "kv_bytes": held, "decode_tok_s": n / (t2 - t1),
           "decode_tokens": n}
    if any(isinstance(c, TurboKVCache) for c in caches):
        row["bits_per_element"] = caches[0].bits_per_element
    del caches, gen
    return row


def median_row(rows: list) -> dict:
    out = dict(rows[0])
    for k in ("prefill_s", "prefill_peak_bytes", "peak_over_start_bytes", "decode_tok_s"):
        out[k] = statistics.median(r[k] for r in rows)
        out[k + "_rounds"] = [r[k] for r in rows]
    return out


def fits(warm: list, kinds: list, memory: float) -> dict:
    """Longest prompt whose prefill peak stays under ``memory`` bytes, from a line through
    each kind's warm peaks (at least two context lengths)."""
    out = {}
    for kind in kinds:
        pts = sorted((r["context"], r["prefill_peak_bytes"]) for r in warm if r["kind"] == kind)
        if len(pts) < 2:
            continue
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        slope = (y1 - y0) / (x1 - x0)
        out[kind] = {"tokens": int(x1 + (memory - y1) / slope), "bytes_per_token": slope}
    return out


def table(warm: list, base: str) -> str:
    ref = {r["context"]: r for r in warm if r["kind"] == base}
    lines = ["| context | cache | prefill s | prefill peak GB | KV MiB | decode tok/s | "
             f"prefill time vs {base} | decode vs {base} |", "|" + "---|" * 8]
    for r in warm:
        b = ref.get(r["context"])
        lines.append(
            f"| {r['context']} | {r['kind']} | {r['prefill_s']:.2f} | "
            f"{r['prefill_peak_bytes'] / 1e9:.2f} | {r['kv_bytes'] / 2**20:.0f} | "
            f"{r['decode_tok_s']:.1f} | "
            f"{r['prefill_s'] / b['prefill_s']:.2f}x | "
            f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}x |" if b else "| – | – |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    warm = results["warm"]
    kinds = list(dict.fromkeys(r["kind"] for r in warm))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for kind in kinds:
        rs = sorted((r for r in warm if r["kind"] == kind), key=lambda r: r["context"])
        x = [r["context"] / 1024 for r in rs]
        axes[0].plot(x, [r["prefill_peak_bytes"] / 1e9 for r in rs], "-o", label=kind)
        axes[1].plot(x, [r["prefill_s"] for r in rs], "-o", label=kind)
        axes[2].plot(x, [r["decode_tok_s"] for r in rs], "-o", label=kind)
    for ax, title in zip(axes, ("prefill peak memory (GB)", "prefill time (s)",
                                "decode after the prompt (tok/s)")):
        ax.set_title(title)
        ax.set_xlabel("prompt (k tokens)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{results['model']} on {results['device']} (mlx-lm generate_step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=["llama-3b"], help="random weights of this shape")
    src.add_argument("--model", help="an mlx-lm model folder (runs in float32)")
    ap.add_argument("--text", help="prompt text for --model (repeated to length)")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--kinds", default="bf16,kv2,kv3,kv4,kv3w64")
    ap.add_argument("--rounds", type=int, default=2,
                    help="warm rounds after first use (0: report first use, e.g. for memory)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--memory-gb", type=float, default=80.0,
                    help="memory for the longest-prompt projection")
    ap.add_argument("--out", default="generate", help="OUT.json, OUT.md, OUT.png")
    args = ap.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    kinds = args.kinds.split(",")
    patch.apply()
    model, tokens = load(args)
    device = (mx.device_info().get("device_name") if mx.default_device() == mx.gpu
              else platform.processor() or platform.machine()) or "?"
    results = {"model": args.shape or os.path.basename(args.model.rstrip("/")),
               "device": f"{device} ({mx.default_device()})", "mlx": mx.__version__,
               "command": " ".join(sys.argv), "first_use": [], "warm": [], "errors": []}
    for n in args.contexts:
        prompt = tokens[:n]
        rows = {k: [] for k in kinds}
        for r in range(args.rounds + 1):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                try:
                    row = run_one(model, prompt, kind, args.decode_tokens)
                except Exception as e:   # out of memory is a result too
                    results["errors"].append({"kind": kind, "context": n, "error": str(e)})
                    print(f"{n} {kind}: {e}", flush=True)
                    continue
                print(f"{n} {kind} round {r}: prefill {row['prefill_s']:.2f} s, peak "
                      f"{row['prefill_peak_bytes'] / 1e9:.2f} GB, KV "
                      f"{row['kv_bytes'] / 2**20:.0f} MiB, {row['decode_tok_s']:.1f} tok/s",
                      flush=True)
                if r == 0:
                    results["first_use"].append(row)
                if r > 0 or args.rounds == 0:   # (--rounds 0: first use is all there is)
                    rows[kind].append(row)
        results["warm"] += [median_row(v) for v in rows.values() if v]
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
    results["fits"] = fits(results["warm"], kinds, args.memory_gb * 1e9)
    text = table(results["warm"], kinds[0])
    text += "\n\nLongest prompt whose prefill peak fits in " \
            f"{args.memory_gb:g} GB (a line through the two longest contexts' peaks):\n"
    text += "\n".join(f"- {k}: {v['tokens']:,} tokens" for k, v in results["fits"].items())
    print(text)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"`{results['command']}` on {results['device']}, MLX {results['mlx']}\n\n"
                + text + "\n")
    plot(results, args.out + ".png")
    return results


if __name__ == "__main__":
    main()
