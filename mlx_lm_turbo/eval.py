"""Quality evidence for compressed KV caches: perplexity, greedy agreement, needle
retrieval, bytes held and decode speed, for fp16, mlx-lm's affine cache and ours.

    python -m mlx_lm_turbo.eval --configs fp16,affine4g64,mse4,rvq2,k4v2-mse

Every number goes through a real layer cache: prefill runs in blocks through the cache,
so every key and value the model attends to (the current block's included) went through
the codec. Configuration names:

    fp16                 mlx-lm KVCache holding float16 keys/values
    affine{b}g{g}        mlx-lm QuantizedKVCache(group_size=g, bits=b) from the first token
    {method}{b}          ours, keys and values at b bits (mse, rvq, polar; prod/qjl keys
                         pair with mse values at the same bits)
    kv{b}                ours as ``--kv-method turboquant_mse --kv-bits b`` gives it (keys
                         b+1 and values b-1 bits for b in 2..7: config.split_bits)
    k{kb}v{vb}-{method}  ours with separate key/value bits (k4v2-mse, k8v4-mse, ...);
    k{kb}v{vb}-{km}-{vm} separate key and value methods (k3v3-prod-mse)
    rq{t}                turboquant_mse with RateQuant bits at target t (rq2.9; calibrated
                         on the model when the run starts, --ratequant-target)
    ...-c                any of ours with centred keys only, no channel scales
                         (--no-kv-scale-keys; mse3-c)
    ...-raw              any of ours with neither (--no-kv-center-keys --no-kv-scale-keys)
    ...-w{n}             any of ours plus an fp16 window of the n newest tokens (mse3-w16)

The model runs in float32 on CPU (dequantized weights: much faster than fp16 there);
fp16 and affine caches store float16 (scales and biases included) exactly as they would
for a float16 model, so their bytes and rounding are the real ones.

This module runs the evaluation (``evaluate``, ``main``); ``eval_tasks`` holds the
configurations and measurements, ``eval_report`` writes the page.
"""

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import patch, ratequant
from .eval_report import _fmt, conclusion, markdown_table, plot, write_markdown
from .eval_tasks import (DEFAULT_CONFIGS, DEFAULT_MODEL,
                         PASSPHRASES, REPO, capture_kv, chat_prompts, common_prefix,
                         greedy, haystack_text, kv_bytes_and_speed, load_model,
                         needle_prompt, needle_test, parse_spec,
                         prefill_vs_decode, tqdm, wikitext_windows, window_nll)


# ----------------------------------------------------------------------------- driver

def route_attention() -> str:
    """Send attention over TurboKVCache layers to our code (the runtime patch)."""
    patch.apply()
    return "mlx_lm_turbo.patch.apply()"


def platform_name() -> str:
    """The machine the numbers were measured on, as the report names it."""
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores"


def _mlx_lm_version() -> str:
    try:
        import mlx_lm

        return mlx_lm.__version__
    except Exception:
        return "?"


def load_results(paths: str) -> dict:
    """Results JSON, or a comma list of them merged (runs made in parallel with the same
    settings): the first file holding a config wins; checks and commands are pooled."""
    merged = None
    files = [f for f in paths.split(",") if f]
    for f in files:
        prev = json.loads(Path(f).read_text())
        prev.setdefault("prefill_vs_decode", [])
        prev["commands"] = prev.get("commands", [prev.get("command", "")])
        base = next((r for r in prev["configs"] if r["name"] == "fp16"), None)
        if len(files) > 1 and base and base.get("kv", {}).get("decode_tok_s"):
            # Speeds only compare within one run: keep each row's own run's fp16 speed.
            for r in prev["configs"]:
                if r["name"] != "fp16" and r.get("kv"):
                    r["kv"].setdefault("fp16_decode_tok_s", base["kv"]["decode_tok_s"])
        if merged is None:
            merged = prev
            continue
        names = {r["name"] for r in merged["configs"]}
        merged["configs"] += [r for r in prev["configs"] if r["name"] not in names]
        seen = {e["config"] for e in merged["prefill_vs_decode"]}
        merged["prefill_vs_decode"] += [e for e in prev["prefill_vs_decode"]
                                        if e["config"] not in seen]
        merged["commands"] += [c for c in prev["commands"] if c not in merged["commands"]]
    if merged is None:
        raise ValueError(f"no results file in {paths!r}")
    s = merged["settings"]
    rows = merged["configs"]
    for r in rows:   # labels follow the current code (families group the plot's lines)
        try:
            spec = parse_spec(r["name"])
        except ValueError:
            continue
        r["family"], r["describe"] = spec.family, spec.describe()
    s["configs"] = [r["name"] for r in rows]
    s["greedy_configs"] = [r["name"] for r in rows if r.get("greedy")]
    s["needle_configs"] = [r["name"] for r in rows if r.get("needle")]
    merged["wall_s"] = sum(r.get("seconds", 0) for r in rows)
    return merged


def evaluate(args: argparse.Namespace, command: str = "") -> dict:
    t_start = time.perf_counter()
    specs = [parse_spec(n, args.seed) for n in args.configs.split(",") if n.strip()]
    names = [s.name for s in specs]
    if "fp16" not in names:
        specs.insert(0, parse_spec("fp16"))
    needle_names = [n.strip().lower() for n in args.needle_configs.split(",") if n.strip()]
    if args.needle_configs == "all":
        needle_names = [s.name for s in specs]
    greedy_names = ([s.name for s in specs] if args.greedy_configs == "all" else
                    [n.strip().lower() for n in args.greedy_configs.split(",") if n.strip()])
    routing = route_attention()
    model, tokenizer = load_model(args.model)
    for spec in specs:   # RateQuant configs: calibrate and allocate once, on this model
        if spec.kind == "turbo" and spec.turbo.ratequant_target is not None:
            spec.turbo = ratequant.resolve(model, tokenizer, spec.turbo, verbose=False)
    eos = set(tokenizer.eos_token_ids) if hasattr(tokenizer, "eos_token_ids") else {
        tokenizer.eos_token_id}
    windows = wikitext_windows(tokenizer, args.data_dir, args.windows, args.window)
    captured = None
    if args.kv_tokens > 0:
        kv_tokens = wikitext_windows(tokenizer, args.data_dir, 1, args.kv_tokens)[0]
        captured = capture_kv(model, kv_tokens, args.block)
    prompts = chat_prompts(tokenizer, args.data_dir, args.prompts) if args.prompts > 0 else []
    lengths = [int(x) for x in str(args.needle_lengths).split(",") if x.strip()]
    depths = [i / (args.needle_depths - 1) if args.needle_depths > 1 else 0.5
              for i in range(args.needle_depths)]
    hay = tokenizer.encode(haystack_text(args.data_dir)[:8 * max(lengths + [1])]) \
        if lengths else []
    needles = [(L, d, PASSPHRASES[i % len(PASSPHRASES)],
                needle_prompt(tokenizer, hay, L, d, PASSPHRASES[i % len(PASSPHRASES)]))
               for L in lengths for i, d in enumerate(depths)]
    settings = {
        "model": args.model, "configs": [s.name for s in specs], "window": args.window,
        "ppl_windows": len(windows), "ppl_tokens": sum(w.shape[0] - 1 for w in windows),
        "block": args.block, "prompts": len(prompts), "max_tokens": args.max_tokens,
        "needle_lengths": lengths, "needle_depths": len(depths),
        "needle_max_tokens": args.needle_max_tokens,
        "greedy_configs": [s.name for s in specs if s.name in greedy_names or s.name == "fp16"]
        if prompts else [],
        "needle_configs": [n for n in needle_names if n in [s.name for s in specs]] if needles
        else [], "kv_tokens": args.kv_tokens, "decode_steps": args.decode_steps,
        "seed": args.seed, "routing": routing, "mlx": mx.__version__,
        "mlx_lm": _mlx_lm_version(), "device": str(mx.default_device()),
        "platform": platform_name(),
    }
    results = {"settings": settings, "configs": [], "prefill_vs_decode": [],
               "command": command}
    fp16_greedy, done = None, {}
    results["commands"] = []
    if args.resume:  # keep the rows of earlier (partial, or parallel) runs, same settings
        prev = load_results(args.resume)
        done = {r["name"]: r for r in prev["configs"]}
        results["prefill_vs_decode"] = prev["prefill_vs_decode"]
        results["commands"] = prev["commands"]
    results["commands"].append(command)
    bar = tqdm(total=len(specs), desc="configs", position=0)
    for spec in specs:
        if spec.name in done:
            row = done[spec.name]
            if spec.name == "fp16" and prompts:
                if len(row.get("greedy_tokens", [])) != len(prompts):
                    row["greedy_tokens"] = [greedy(model, p, spec, args.max_tokens, eos,
                                                   args.block)[0]
                                            for p in tqdm(prompts, desc="fp16 reference",
                                                          leave=False, position=1)]
                fp16_greedy = row["greedy_tokens"]
            if spec.name == "fp16" and captured is not None:  # speed reference: this run
                row["kv"] = kv_bytes_and_speed(model, captured, spec, args.block,
                                               args.decode_steps)
            results["configs"].append(row)
            bar.update(1)
            continue
        row = {"name": spec.name, "kind": spec.kind, "family": spec.family,
               "describe": spec.describe()}
        t0 = time.perf_counter()
        timing = row["stage_seconds"] = {}
        if windows:
            nll, n = 0.0, 0
            for w in tqdm(windows, desc=f"{spec.name} ppl", leave=False, position=1):
                a, b = window_nll(model, w, spec, args.block)
                nll, n = nll + a, n + b
            row["ppl"] = math.exp(nll / n)
            timing["ppl"] = time.perf_counter() - t0
        if captured is not None:
            t1 = time.perf_counter()
            row["kv"] = kv_bytes_and_speed(model, captured, spec, args.block, args.decode_steps)
            timing["kv"] = time.perf_counter() - t1
        if prompts and (spec.name in greedy_names or spec.name == "fp16"):
            outs, dec_s, dec_n, t1 = [], 0.0, 0, time.perf_counter()
            for p in tqdm(prompts, desc=f"{spec.name} greedy", leave=False, position=1):
                toks, s, n = greedy(model, p, spec, args.max_tokens, eos, args.block)
                outs.append(toks)
                dec_s, dec_n = dec_s + s, dec_n + n
            row["greedy_tokens"] = outs
            if spec.name == "fp16":
                fp16_greedy = outs
            ref = fp16_greedy or outs
            match = [common_prefix(a, b) for a, b in zip(outs, ref)]
            row["greedy"] = {
                "agreement": sum(a == b for a, b in zip(outs, ref)) / len(outs),
                "mean_match": sum(match) / len(match),
                "mean_len": sum(len(b) for b in ref) / len(ref),
                "decode_tok_s": dec_n / dec_s if dec_s else None,
            }
            timing["greedy"] = time.perf_counter() - t1
        if needles and spec.name in needle_names:
            t1 = time.perf_counter()
            row["needle"] = needle_test(model, tokenizer, spec, [
                (L, d, w, ids) for (L, d, w, ids) in needles], args.needle_max_tokens,
                args.block, eos)
            timing["needle"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        if args.check_tokens > 0 and windows and spec.name in [c.strip() for c in args.check.split(",")]:
            results["prefill_vs_decode"].append(prefill_vs_decode(
                model, windows[0][:args.check_tokens],
                spec, args.block))
            timing["check"] = time.perf_counter() - t1
        row["seconds"] = time.perf_counter() - t0
        results["configs"].append(row)
        bar.update(1)
        tqdm.write(f"{spec.name}: ppl {_fmt(row.get('ppl'), '{:.3f}')}, bits "
                   f"{_fmt(row.get('kv', {}).get('bits_per_element'), '{:.3f}')}, greedy "
                   f"{_fmt(row.get('greedy', {}).get('agreement'), '{:.2f}')}, needle "
                   f"{_fmt(row.get('needle', {}).get('rate'), '{:.2f}')} "
                   f"({row['seconds']:.0f} s)")
        if args.out_dir:  # partial results survive an interrupted sweep
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.out_dir) / "quality.partial.json").write_text(json.dumps(results, indent=1))
    bar.close()
    settings["resumed_rows"] = sorted(done)
    settings["greedy_configs"] = [r["name"] for r in results["configs"] if r.get("greedy")]
    settings["needle_configs"] = [r["name"] for r in results["configs"] if r.get("needle")]
    results["conclusion"] = conclusion(results)
    results["wall_s"] = time.perf_counter() - t_start + sum(
        r.get("seconds", 0) for r in done.values())
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="KV cache quality: perplexity, greedy agreement, needle, bytes, speed.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data-dir", required=True,
                   help="a folder holding wikitext2_test.raw, book_war_and_peace.txt and "
                        "prompts_mt_bench.jsonl")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma list: fp16, affine{b}g{g}, mse{b}, rvq{b}, polar{b}, prod{b}, "
                        "k{kb}v{vb}-{method}")
    p.add_argument("--windows", type=int, default=2,
                   help="WikiText-2 windows for perplexity (0 = the whole test set)")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--block", type=int, default=256, help="prefill block size")
    p.add_argument("--prompts", type=int, default=80, help="MT-Bench prompts (0 = skip)")
    p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--greedy-configs", default="all",
                   help="configs that run greedy agreement ('all' or a comma list; fp16 always)")
    p.add_argument("--needle-lengths", default="2048,4096,8192",
                   help="comma list of haystack lengths in tokens ('' = skip)")
    p.add_argument("--needle-depths", type=int, default=10)
    p.add_argument("--needle-max-tokens", type=int, default=8)
    p.add_argument("--needle-configs", default="all",
                   help="configs that run the needle test ('all' or a comma list)")
    p.add_argument("--kv-tokens", type=int, default=4096,
                   help="prefill length for bytes held and decode speed (0 = skip)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--check", default="fp16,mse3",
                   help="configs for the block-prefill vs token-decode check")
    p.add_argument("--check-tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "reports"))
    p.add_argument("--resume", default=None,
                   help="results JSON (e.g. reports/quality.partial.json) whose configs are "
                        "kept instead of re-run, or a comma list of them (rows of runs made "
                        "in parallel); use the same settings")
    p.add_argument("--from-json", default=None,
                   help="re-write the report from a saved (or partial) results JSON, or from "
                        "a comma list of them (runs made in parallel, merged)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--quick", action="store_true",
                   help="tiny slice for tests: 1 window of 256 tokens, 1 prompt x 6 tokens, "
                        "needle at 192 tokens x 2 depths, bytes at 256 tokens")
    return p


QUICK = {"windows": 1, "window": 256, "block": 64, "prompts": 1, "max_tokens": 6,
         "needle_lengths": "192", "needle_depths": 2, "needle_max_tokens": 4,
         "kv_tokens": 256, "decode_steps": 2, "check_tokens": 72}


def main(argv: Optional[list] = None) -> dict:
    import shlex
    import sys

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        results = load_results(args.from_json)
        results["conclusion"] = conclusion(results)
        command = results.get("command", "python -m mlx_lm_turbo.eval")
        out = Path(args.out_dir)
        print(markdown_table(results))
        msg = plot(results, out / "quality.png")
        if not msg:
            results["png"] = "quality.png"
        (out / "quality.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, out / "quality.md", command)
        return results
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m mlx_lm_turbo.eval " + " ".join(shlex.quote(a) for a in argv)
    results = evaluate(args, command)
    results["command"] = command
    print(markdown_table(results))
    for e in results["prefill_vs_decode"]:
        print(f"prefill vs decode ({e['config']}, {e['tokens']} tokens): max |Δlogit| "
              f"{e['max_abs_logit_diff']:.2e}, argmax agreement {100 * e['argmax_agreement']:.1f}%")
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        msg = plot(results, out / "quality.png")
        if msg:
            print(msg)
        else:
            results["png"] = "quality.png"
        (out / "quality.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, out / "quality.md", command)
        partial = out / "quality.partial.json"
        if partial.exists():
            partial.unlink()
        print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}"
              + ("" if msg else f", {out / 'quality.png'}"))
    return results


if __name__ == "__main__":
    main()
