"""RateQuant vs uniform bits, and key centring before/after, on the quality protocol of
``mlx_lm_turbo.eval`` (WikiText-2 windows of 2048, prefill in blocks of 256 through the
real cache).

    python scripts/eval_ratequant.py --data-dir DATA --windows 2 --out reports/ratequant

Prints a Markdown table and writes JSON. Uniform rows (mse1..mse4) are re-measured here
so every row of the table comes from one run.
"""

import argparse
import json
import time

from mlx_lm_turbo import eval_tasks as ev
from mlx_lm_turbo import patch, ratequant
from mlx_lm_turbo.prompt_cache import make_prompt_cache
from mlx_lm_turbo.config import TurboConfig


def bits_per_element(model, spec) -> float:
    caches = make_prompt_cache(model, spec.turbo)
    import mlx.core as mx

    model(mx.zeros((1, 8), dtype=mx.int32), cache=caches)
    return ev.nominal_bits(caches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ev.DEFAULT_MODEL)
    p.add_argument("--data-dir", required=True, help="a folder holding wikitext2_test.raw")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--targets", default="1.5,2.5,3.5")
    p.add_argument("--uniform", default="1,2,3,4")
    p.add_argument("--out", default="reports/ratequant")
    args = p.parse_args()
    patch.apply()
    model, tok = ev.load_model(args.model)
    windows = ev.wikitext_windows(tok, args.data_dir, args.windows, 2048)
    specs = []
    for b in map(int, args.uniform.split(",")):
        specs.append(("uniform", ev.Spec(f"mse{b}", "turbo", turbo=TurboConfig("turboquant_mse", b))))
    for t in map(float, args.targets.split(",")):
        for solver in ("greedy", "waterfill") if t == 2.5 else ("greedy",):
            cfg = TurboConfig("turboquant_mse", 4, ratequant_target=t, ratequant_solver=solver)
            t0 = time.perf_counter()
            cfg = ratequant.resolve(model, tok, cfg)
            print(f"calibration + allocation {time.perf_counter() - t0:.1f} s")
            specs.append((f"ratequant {solver}", ev.Spec(f"rq{t}-{solver}", "turbo", turbo=cfg)))
    for b in (3, 4):
        cfg = TurboConfig("turboquant_mse", b, center_keys=True)
        specs.append(("centred keys", ev.Spec(f"mse{b}-centred", "turbo", turbo=cfg)))
    fp16 = ev.perplexity(model, windows, ev.Spec("fp16", "fp16"), 256)
    rows = [dict(name="fp16", family="fp16", bits_per_element=16.0, ppl=fp16)]
    for family, spec in specs:
        ppl = ev.perplexity(model, windows, spec, 256)
        row = dict(name=spec.name, family=family, bits_per_element=bits_per_element(model, spec),
                   ppl=ppl, vs_fp16=ppl / fp16 - 1)
        if spec.turbo.layer_bits is not None:
            row["bits"] = [list(b) for b in spec.turbo.layer_bits if b is not None]
        rows.append(row)
        print(f"{spec.name:24s} {row['bits_per_element']:.3f} bits/elt  ppl {ppl:.3f}", flush=True)
    # Margin of each RateQuant row under the uniform line (linear in bits/element between
    # the neighbouring uniform points).
    uni = sorted((r["bits_per_element"], r["ppl"]) for r in rows if r["family"] == "uniform")
    for r in rows:
        if r["family"].startswith("ratequant"):
            for (b0, p0), (b1, p1) in zip(uni, uni[1:]):
                if b0 <= r["bits_per_element"] <= b1:
                    line = p0 + (p1 - p0) * (r["bits_per_element"] - b0) / (b1 - b0)
                    r["uniform_line_ppl"] = line
                    r["margin_vs_uniform"] = r["ppl"] / line - 1
    lines = ["| config | family | bits/elt | ppl | vs fp16 | uniform line at same bits | margin |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['family']} | {r['bits_per_element']:.3f} | {r['ppl']:.3f} | "
                     f"{100 * r.get('vs_fp16', 0):+.1f}% | "
                     f"{r['uniform_line_ppl']:.3f} | {100 * r['margin_vs_uniform']:+.1f}% |"
                     if "margin_vs_uniform" in r else
                     f"| {r['name']} | {r['family']} | {r['bits_per_element']:.3f} | {r['ppl']:.3f} | "
                     f"{100 * r.get('vs_fp16', 0):+.1f}% | – | – |")
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "windows": len(windows), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
