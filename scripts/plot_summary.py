"""The README's picture: quality vs bits, memory vs context, decode speed vs context, from
the results page's JSON files (``mlx_lm_turbo.eval`` and ``scripts/bench_generate.py``).

    python scripts/plot_summary.py --quality reports/quality_qwen.json,reports/quality_smollm2.json \
        --generate reports/generate_gpu.json --out reports/summary.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def quality_points(path: str) -> tuple:
    """(model name, fp16 ppl, {family: [(bits/element, ppl change %)]}) of an eval JSON."""
    results = json.load(open(path))
    rows = [r for r in results["configs"] if r.get("ppl") and r.get("kv")]
    fp16 = next(r["ppl"] for r in rows if r["kind"] == "fp16")
    series: dict = {}
    for r in rows:
        if r["kind"] == "fp16":
            continue
        family = "mlx-lm affine" if r["kind"] == "affine" else "ours (" + r["family"] + ")"
        series.setdefault(family, []).append(
            (r["kv"]["bits_per_element"], 100 * (r["ppl"] / fp16 - 1)))
    return results["settings"].get("model", path), fp16, series


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", required=True, help="eval JSON files, comma-separated")
    ap.add_argument("--generate", required=True, help="bench_generate JSON")
    ap.add_argument("--kinds", default="bf16,mse3,mse4", help="generate kinds to draw")
    ap.add_argument("--out", default="reports/summary.png")
    args = ap.parse_args(argv)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for path, marker in zip(args.quality.split(","), "os^v"):
        model, _, series = quality_points(path)
        for family, pts in sorted(series.items()):
            pts = sorted(pts)
            ax.plot([b for b, _ in pts], [p for _, p in pts], marker=marker, linestyle="-",
                    label=f"{model}: {family}")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("bits per element held (metadata counted)")
    ax.set_ylabel("perplexity vs fp16 (%)")
    ax.set_title("quality (WikiText-2)")
    ax.legend(fontsize=7)

    gen = json.load(open(args.generate))
    kinds = args.kinds.split(",")
    for kind in kinds:
        rs = sorted((r for r in gen["warm"] if r["kind"] == kind), key=lambda r: r["context"])
        x = [r["context"] / 1024 for r in rs]
        axes[1].plot(x, [r["prefill_peak_bytes"] / 1e9 for r in rs], "-o", label=f"{kind} peak")
        axes[1].plot(x, [r["kv_bytes"] / 1e9 for r in rs], "--", label=f"{kind} KV held")
        axes[2].plot(x, [r["decode_tok_s"] for r in rs], "-o", label=kind)
    axes[1].set_title("memory during a long prompt (GB)")
    axes[2].set_title("decode after the prompt (tok/s)")
    for ax in axes[1:]:
        ax.set_xlabel("prompt (k tokens)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"quality on CPU (float32 weights); memory and speed: {gen['model']} on "
                 f"{gen['device']} through mlx-lm's generate_step", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
