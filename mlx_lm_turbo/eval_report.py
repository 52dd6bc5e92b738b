"""The evaluator's report: the markdown table, the perplexity-vs-bits plot, the page
(``quality.md``) and its summary paragraph, all from a results dict (``eval``)."""

import math
from pathlib import Path
from typing import Optional

from .eval_tasks import ANSWER_PREFIX


def _fmt(x, spec="{:.2f}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return spec.format(x)


def markdown_table(results: dict) -> str:
    rows = results["configs"]
    base = next((r for r in rows if r["name"] == "fp16"), None)
    ppl0 = base and base.get("ppl")
    speed0 = base and base.get("kv", {}).get("decode_tok_s")
    lines = ["| config | cache | bits/elt | KV MiB @{} | ppl | vs fp16 | greedy identical | "
             "mean match | needle | decode tok/s (x fp16) |".format(results["settings"]["kv_tokens"]),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    # Speeds of rows kept from an earlier run (--resume) were measured beside another
    # run's fp16: no ratio against this run's.
    earlier = set(results["settings"].get("resumed_rows", [])) - {"fp16"}
    for r in rows:
        kv = r.get("kv", {})
        ppl = r.get("ppl")
        rel = f"{100 * (ppl / ppl0 - 1):+.2f}%" if ppl and ppl0 and r["name"] != "fp16" else "–"
        g = r.get("greedy")
        agree = f"{100 * g['agreement']:.0f}%" if g else "–"
        match = f"{g['mean_match']:.1f}/{g['mean_len']:.1f}" if g else "–"
        nd = r.get("needle")
        needle = f"{100 * nd['rate']:.0f}%" if nd else "–"
        if nd and len(nd.get("rate_by_length", {})) > 1:   # per haystack length
            needle += " (" + " / ".join(f"{100 * v:.0f}" for v in nd["rate_by_length"].values()) + ")"
        sp = kv.get("decode_tok_s")
        if kv.get("fp16_decode_tok_s"):   # merged from a parallel run: its own fp16
            speed = f"{sp:.1f} ({sp / kv['fp16_decode_tok_s']:.2f}x)"
        elif r["name"] in earlier:
            speed = f"{_fmt(sp, '{:.1f}')} (earlier run)"
        else:
            speed = f"{sp:.1f} ({sp / speed0:.2f}x)" if sp and speed0 else _fmt(sp, "{:.1f}")
        lines.append(
            f"| {r['name']} | {r['describe']} | {_fmt(kv.get('bits_per_element'), '{:.3f}')} | "
            f"{_fmt(kv.get('kv_bytes') and kv['kv_bytes'] / 2**20, '{:.2f}')} | "
            f"{_fmt(ppl, '{:.3f}')} | {rel} | {agree} | {match} | {needle} | {speed} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG (pip install matplotlib)"
    rows = [r for r in results["configs"] if r.get("ppl") and r.get("kv")]
    fams = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab20").colors   # one colour per family (the default cycle has 10)
    for i, (fam, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r["kv"]["bits_per_element"])
        x = [r["kv"]["bits_per_element"] for r in rs]
        y = [r["ppl"] for r in rs]
        style = "--s" if fam.startswith("mlx-lm") else ("*" if fam == "fp16" else
                                                          ("D" if "split" in fam else "-o"))
        ax.plot(x, y, style, label=fam, markersize=10 if fam == "fp16" else 5,
                color=colors[i % len(colors)])
        if "split" in fam:
            for r in rs:
                ax.annotate(r["name"].split("-")[0], (r["kv"]["bits_per_element"], r["ppl"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    base = next((r for r in rows if r["name"] == "fp16"), None)
    if base:
        ax.axhline(base["ppl"], color="gray", lw=0.8)
        ax.axhline(base["ppl"] * 1.01, color="gray", lw=0.6, ls=":")
        ax.axhline(base["ppl"] * 1.05, color="gray", lw=0.6, ls=":")
    ax.set_yscale("log")
    if base:  # keep the interesting range readable; label what falls off the top
        top = min(max(r["ppl"] for r in rows) * 1.05, base["ppl"] * 3)
        ax.set_ylim(base["ppl"] * 0.97, top)
        for r in rows:
            if r["ppl"] > top:
                ax.annotate(f"{r['name']}: {r['ppl']:.0f} ↑", (r["kv"]["bits_per_element"], top),
                            fontsize=7, xytext=(0, -12), textcoords="offset points",
                            ha="center", rotation=90, va="top")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.set_xlabel("bits per K/V element (metadata counted, from cache.nbytes)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    s = results["settings"]
    ax.set_title(f"{Path(s['model']).name}: {s['ppl_windows']}×{s['window']} tokens; "
                 "dotted: fp16 +1%, +5%", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_markdown(results: dict, path: Path, command: str) -> str:
    s = results["settings"]
    eq = results.get("prefill_vs_decode", [])
    parts = [
        f"# KV cache quality: {Path(s['model']).name}",
        "",
        "Generated by `mlx_lm_turbo.eval` (do not edit by hand; re-run the command).",
        "",
        "```",
        *results.get("commands", [command]),
        "```",
        "",
        (f"Platform: {s['platform']}; " if s.get("platform") else "")
        + f"mlx {s.get('mlx', '?')}, mlx-lm {s.get('mlx_lm', '?')}, device "
        f"{s.get('device', '?')}. Run from the repository root. "
        "Defaults (no flags) run the full protocol: 2 windows, 80 prompts x 128 tokens, "
        "needle at 2k/4k/8k for every config, all configurations. `--quick` is a tiny slice; "
        "`--resume FILE` keeps rows of an earlier run; `--from-json FILE` re-writes this report."
        + (f" Rows kept from an earlier run with the same settings: "
           f"{', '.join(s['resumed_rows'])} (its decode speed re-measured in this run)."
           if s.get("resumed_rows") else ""),
        "",
        f"Protocol: the model runs in float32 (weights dequantized) on {s.get('device', '?')}; "
        "fp16 and mlx-lm affine "
        "caches store float16 (scales/biases included), ours store packed codes plus float16 "
        "scalars. Prefill runs in blocks of "
        f"{s['block']} tokens through the real cache, so every attended key/value went through "
        f"the codec, the current block's included. Attention routing: {s['routing']}.",
        "",
        f"- perplexity: WikiText-2 raw test, first {s['ppl_windows']} window(s) of "
        f"{s['window']} tokens ({s['ppl_tokens']} scored tokens), each window from an empty cache;",
        f"- greedy: first {s['prompts']} MT-Bench first-turn prompts (chat template), run for "
        f"{'all configs' if s['greedy_configs'] == s['configs'] else ', '.join(s['greedy_configs'])}, "
        f"up to {s['max_tokens']} greedy tokens (stop at EOS); agreement = continuation identical "
        "to fp16's; mean match = mean common-prefix length / mean fp16 length;",
        f"- needle: passphrase sentence at {s['needle_depths']} depths in War and Peace at "
        f"{s['needle_lengths']} tokens, greedy answer (≤{s['needle_max_tokens']} tokens) must "
        f"contain it (the assistant turn is primed with '{ANSWER_PREFIX}'); run for: {', '.join(s['needle_configs']) or 'none'};",
        f"- bits/elt and KV MiB: `cache.nbytes` of all layers (K+V) after the keys/values of a "
        f"{s['kv_tokens']}-token WikiText-2 prefill (captured once, uncompressed) were fed "
        f"to the cache in {s['block']}-token updates; decode tok/s: "
        f"{s['decode_steps']} greedy steps of the model on that {s['kv_tokens']}-token cache, "
        "same run, relative to fp16 " + (
            "(GPU: our caches decode through the fused kernels; at this model size a decode "
            "step costs about one kernel launch per op, so speed tracks the op count)."
            if "gpu" in str(s.get("device", "")) else
            "(on a CPU the reference attention path dequantizes the whole cache per step)."),
        "",
        markdown_table(results),
        "",
    ]
    if len(s["needle_lengths"]) > 1:
        parts[-1:-1] = [f"Needle: overall rate (rate at {' / '.join(map(str, s['needle_lengths']))} "
                        "tokens)."]
    if any(r.get("kv", {}).get("fp16_decode_tok_s") for r in results["configs"]):
        parts[-1:-1] = ["Rows merged from runs made side by side: each speed ratio is against "
                        "the fp16 speed measured in that row's own run (the fp16 row shows "
                        "the first file's)."]
    if eq:
        exact = all(e["layer0_attention_max_abs_diff"] <= 1e-3 * e["layer0_attention_max_abs_output"]
                    for e in eq)
        parts += [
            "Block prefill vs token-by-token decode through the cache (first tokens of window 1). "
            "Single layer on identical inputs (the model's layer-0 keys/values, keys as queries): "
            + ("the two paths agree to float noise. " if exact else
               "**the two paths DIFFER beyond float noise: the stored codes depend on how the "
               "prompt is split into blocks.** ")
            + "Whole model: float32 rounding differs between a block matmul and a one-row "
            "matmul; one ulp can move a coordinate across a quantizer boundary and the flip "
            "grows through the layers, so whole-model logits differ more than fp16's would; "
            "compare the two perplexities.", "",
            "| config | tokens | block | 1 layer: max abs Δout (max abs out) | model: max abs "
            "Δlogit (max abs logit) | argmax agreement | ppl block / token |",
            "|---|---:|---:|---:|---:|---:|---:|"]
        for e in eq:
            parts.append(
                f"| {e['config']} | {e['tokens']} | {e['block']} | "
                f"{e['layer0_attention_max_abs_diff']:.1e} ({e['layer0_attention_max_abs_output']:.2f}) | "
                f"{e['max_abs_logit_diff']:.2e} ({e['max_logit_magnitude']:.1f}) | "
                f"{100 * e['argmax_agreement']:.1f}% | {e['ppl_block']:.3f} / {e['ppl_token']:.3f} |")
        parts.append("")
    if results.get("png"):
        parts += [f"![perplexity vs bits/element]({results['png']})", ""]
    if results.get("conclusion"):
        parts += ["## Conclusion", "", results["conclusion"], ""]
    parts += [f"Run time, summed over the configurations (parallel runs overlap): "
              f"{results['wall_s'] / 60:.1f} min.", ""]
    text = "\n".join(parts)
    path.write_text(text)
    return text


def conclusion(results: dict) -> str:
    """A plain paragraph derived from the numbers (re-generated on every run)."""
    rows = [r for r in results["configs"] if r.get("ppl") and r.get("kv")]
    base = next((r for r in rows if r["name"] == "fp16"), None)
    if base is None:
        return ""
    p0 = base["ppl"]
    ours = [r for r in rows if r["kind"] == "turbo"]
    aff = [r for r in rows if r["kind"] == "affine"]

    def pct(r):
        return f"{100 * (r['ppl'] / p0 - 1):+.1f}%"

    out = []
    for limit in (6.5, 4.5, 3.5, 2.6):
        c = [r for r in ours if r["kv"]["bits_per_element"] <= limit]
        a = [r for r in aff if r["kv"]["bits_per_element"] <= limit]
        if not c:
            continue
        b = min(c, key=lambda r: r["ppl"])
        s = (f"with at most {limit} bits/element use {b['name']} "
             f"({b['kv']['bits_per_element']:.2f} b, perplexity {pct(b)}")
        if b.get("greedy"):
            s += (f", {100 * b['greedy']['agreement']:.0f}% of greedy continuations identical, "
                  f"{b['greedy']['mean_match']:.0f}/{b['greedy']['mean_len']:.0f} tokens matching")
        s += ")"
        if a:
            ba = min(a, key=lambda r: r["ppl"])
            s += (f"; mlx-lm's best there is {ba['name']} "
                  f"({ba['kv']['bits_per_element']:.2f} b, {pct(ba)})")
        else:
            s += "; mlx-lm's affine cache has no setting that small"
        out.append(s)
    if not out:
        return ""
    return ("Measured on this model (automatic summary, re-written on every run): "
            + "; ".join(out) + ". ")
