"""Where the appending decode step's GPU time goes inside its one launch (CUDA only).

The kernel (kernels/source.py: MMA_SETUP + MMA_APPEND + MMA_MAIN + MMA_FOLD_TAIL) is
rebuilt with clock stamps: thread 0 of every block writes clock64() at each phase
boundary (after a block barrier where there is one, so the stamp means "the whole block
is past it"), plus %globaltimer at its start and end and its SM. Nsight Compute gives
the launch's total; this gives the phases of each block, so a fixed cost can be pinned
on a phase. The stamps cost a few registers and stores; the totals are compared with
the unstamped kernel's wall time per call in the same run.

    python3 scripts/phase_times.py --lengths 4096,32768,131072 --out phases.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from mlx_lm_turbo.attention import turbo_attention  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.kernels import decode, source  # noqa: E402

# (name of the phase that ends at the stamp, text the stamp goes right before, in part)
MAIN_ANCHORS = [
    ("query+tables", "  KV_BARRIER();\n"),                 # first barrier of MMA_MAIN
    ("hadamard", "  // ---- B staging"),
    ("b_staging", "  const int G = KV_MG(kv_lane);"),
    ("loop+merge", "  KV_TG float* osh = (KV_TG float*)tabs;"),
]
PHASES = (["setup", "append"] + [n for n, _ in MAIN_ANCHORS]
          + ["partials", "count", "tail"])
NSTAMP = len(PHASES) + 1 + 3           # clocks at the phase edges + gtime start/end + smid


def stamp(i: int) -> str:
    return (f"  if (kv_tid == 0) stamps[(long(kv_by) * kv_nbx + kv_bx) * {NSTAMP} + {i}]"
            " = clock64();\n")


# Thread 0 of a block stamps its start (globaltimer, SM) and its end (globaltimer).
START = ("  if (kv_tid == 0) {\n    unsigned long long t_; unsigned int s_;\n"
         '    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));\n'
         '    asm volatile("mov.u32 %0, %%smid;" : "=r"(s_));\n'
         f"    stamps[(long(kv_by) * kv_nbx + kv_bx) * {NSTAMP} + {NSTAMP - 3}] = t_;\n"
         f"    stamps[(long(kv_by) * kv_nbx + kv_bx) * {NSTAMP} + {NSTAMP - 1}] = s_;\n"
         "  }\n")
END = ("  if (kv_tid == 0) {\n    unsigned long long t_;\n"
       '    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));\n'
       f"    stamps[(long(kv_by) * kv_nbx + kv_bx) * {NSTAMP} + {NSTAMP - 2}] = t_;\n"
       "  }\n")


def stamped_body() -> str:
    """The appending kernel's body (decode.KERNELS) with the stamps in."""
    main = source.MMA_MAIN
    for i, (_, anchor) in enumerate(MAIN_ANCHORS):
        at = main.index(anchor)
        if anchor.startswith("  KV_BARRIER"):      # the stamp goes after the barrier
            at += len(anchor)
        main = main[:at] + stamp(3 + i) + main[at:]
    tail = source.MMA_FOLD_TAIL
    anchors = ("  for (int level = 0;", "  if (last_block[0]) {")   # (the latter: before
    at = min(tail.index(a) for a in anchors if a in tail)         # the two-level merge)
    tail = tail[:at] + stamp(3 + len(MAIN_ANCHORS) + 1) + tail[at:]
    return (source.APPEND_TABLES + source.MMA_FOLD_PARTS + START + stamp(0)
            + source.MMA_SETUP + stamp(1) + source.MMA_APPEND + stamp(2) + main
            + stamp(3 + len(MAIN_ANCHORS)) + tail + stamp(NSTAMP - 4) + END)


CAPTURED = []
PLAIN_LAUNCHER = decode.fold_launcher


def stamped_fold_launcher(template, p, backend_name, vmul, out_dtype,
                          name="decode_mma_fold"):
    """decode.fold_launcher with the stamps as a third output (kept in CAPTURED), for
    the appending kernel; the others as they are."""
    if name != "decode_mma_fold_append":
        return PLAIN_LAUNCHER(template, p, backend_name, vmul, out_dtype, name)
    B, Hkv, NRG, RB, DV, Hq, L = (p[k] for k in ("B", "Hkv", "NRG", "RB", "DV", "Hq", "L"))
    rows = B * Hkv * NRG
    kernel = decode._kernel(backend_name, name, tuple(template) + (("OT", out_dtype),))
    cnt = decode.fold_counters(rows, 1024)
    prev = [mx.zeros((1,), out_dtype)]
    mx.eval(cnt, prev[0])

    def run(inputs, nsp, extra=()):
        fixed = [] if vmul is None else [vmul]
        outs = kernel(inputs=inputs + fixed + [cnt, prev[0], *extra],
                      grid=(nsp * decode.NT, rows, 1), threadgroup=(decode.NT, 1, 1),
                      output_shapes=[(rows * nsp * RB * (DV + 2),), (B, Hq, L, DV),
                                     (rows * nsp * NSTAMP,)],
                      output_dtypes=[mx.float32, out_dtype, mx.uint64])
        prev[0] = outs[1]
        CAPTURED.append((outs[2], nsp, rows))
        return outs[1]
    return run


def summarize(stamps: list, nsp: int, rows: int) -> dict:
    """Per-phase cycles (median and max over blocks), the launch's span in µs, and the
    SM clock the stamps imply."""
    blocks = [stamps[i * NSTAMP:(i + 1) * NSTAMP] for i in range(nsp * rows)]
    ran = [b for b in blocks if b[NSTAMP - 3]]
    out = {"blocks": len(ran), "splits": nsp}
    g0 = min(b[NSTAMP - 3] for b in ran)
    g1 = max(b[NSTAMP - 2] for b in ran)
    out["span_us"] = (g1 - g0) / 1e3
    out["start_spread_us"] = (max(b[NSTAMP - 3] for b in ran) - g0) / 1e3
    cyc = [b[NSTAMP - 4] - b[0] for b in ran]
    ns = [b[NSTAMP - 2] - b[NSTAMP - 3] for b in ran]
    ghz = statistics.median(c / n for c, n in zip(cyc, ns) if n > 0)
    out["sm_ghz"] = round(ghz, 3)
    for i, name in enumerate(PHASES):
        d = [(b[i + 1] - b[i]) / ghz / 1e3 for b in ran]
        last = [(b[i + 1] - b[i]) / ghz / 1e3 for b in ran if b[i + 1] - b[i] > 0]
        out[name] = {"median_us": round(statistics.median(d), 2),
                     "max_us": round(max(d), 2), "min_us": round(min(last or [0]), 2)}
    out["block_us"] = {"median": round(statistics.median(ns) / 1e3, 2),
                       "max": round(max(ns) / 1e3, 2)}
    # The block that ran the tail (the last of its row): its tail and end time.
    tails = sorted(((b[NSTAMP - 4] - b[NSTAMP - 5]) / ghz / 1e3, (b[NSTAMP - 2] - g0) / 1e3)
                   for b in ran)
    out["tail_blocks_us"] = [round(t, 2) for t, _ in tails[-rows:]]
    out["ends_of_tail_blocks_us"] = [round(e, 2) for _, e in tails[-rows:]]
    ends = sorted((b[NSTAMP - 2] - g0) / 1e3 for b in ran)
    out["end_quantiles_us"] = [round(ends[int(q * (len(ends) - 1))], 2)
                               for q in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)]
    # Is a slow loop a slow SM (all its blocks) or a slow part of the sequence?
    loop = PHASES.index("loop+merge")
    by_sm = {}
    for b in ran:
        by_sm.setdefault(b[NSTAMP - 1], []).append((b[loop + 1] - b[loop]) / ghz / 1e3)
    sm_means = sorted(statistics.mean(v) for v in by_sm.values())
    out["sms"] = len(by_sm)
    out["blocks_per_sm"] = sorted({len(v) for v in by_sm.values()})
    out["loop_us_sm_mean_quantiles"] = [round(sm_means[int(q * (len(sm_means) - 1))], 2)
                                        for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    # The blocks an SM holds at once, in the order their loops end: equal work, but the
    # warp schedulers favour the older blocks.
    ranks = {}
    for b_ in (sorted(v) for v in by_sm.values() if len(v) == 4):
        for r, t in enumerate(b_):
            ranks.setdefault(r, []).append(t)
    out["loop_us_by_rank_of_4"] = [round(statistics.mean(ranks[r]), 2) for r in sorted(ranks)]
    within = [max(v) - min(v) for v in by_sm.values() if len(v) > 1]
    out["loop_us_spread_within_sm_median"] = round(statistics.median(within), 2) if within \
        else None
    starts = sorted((b[NSTAMP - 3] - g0) / 1e3 for b in ran)
    out["start_quantiles_us"] = [round(starts[int(q * (len(starts) - 1))], 2)
                                 for q in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--heads", type=int, default=24, help="query heads (8 KV heads)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--calls", type=int, default=5, help="stamped calls per length")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if decode.backend() != "cuda":
        sys.exit("phase_times.py needs MLX's CUDA backend")
    B, Hq, Hkv, D = 1, args.heads, 8, 128
    dt = getattr(mx, args.dtype)
    scale = D ** -0.5
    os.environ[decode.FOLD_ENV] = "1"
    os.environ[decode.APPEND_ENV] = "1"
    plain_body = decode.KERNELS["decode_mma_fold_append"]
    stamped = (stamped_body(), decode.APPEND_INPUTS, decode.FOLD_OUTPUTS + ["stamps"])
    plain_launcher = decode.fold_launcher
    rows_out = []
    for S in map(int, args.lengths.split(",")):
        mx.random.seed(S)
        k = mx.random.normal((B, Hkv, S, D)).astype(dt)
        q = mx.random.normal((B, Hq, 1, D)).astype(dt)
        k1 = mx.random.normal((B, Hkv, 1, D)).astype(dt)
        row = {"S": S}
        for kind in ("plain", "stamped"):
            decode.KERNELS["decode_mma_fold_append"] = stamped if kind == "stamped" \
                else plain_body
            decode.fold_launcher = stamped_fold_launcher if kind == "stamped" \
                else plain_launcher
            decode._kernels.clear()     # kernels are memoised by name and template
            c = TurboKVCache("turboquant_mse", args.bits, "turboquant_mse", args.bits)
            c.update_and_fetch(k, k)
            mx.eval(c.keys, c.values)

            def step(c=c):
                kv, vv = c.update_and_fetch(k1, k1)
                return turbo_attention(q, kv, vv, c, scale=scale, mask=None)

            for _ in range(3):
                mx.eval(step())
            mx.synchronize()
            n = 50
            t0 = time.perf_counter()
            outs = [step() for _ in range(n)]
            mx.eval(outs)
            mx.synchronize()
            row[f"{kind}_wall_us_per_call"] = round((time.perf_counter() - t0) / n * 1e6, 2)
            if kind == "stamped":
                # Queued back to back and read once at the end: reading a stamps array
                # on the host between calls moves its pages to the CPU, and the next
                # call that reuses the buffer waits on GPU page faults.
                CAPTURED.clear()
                outs = [step() for _ in range(args.calls)]
                mx.eval(outs)
                mx.synchronize()
                calls = [summarize(st.tolist(), nsp, rows)
                         for st, nsp, rows in CAPTURED[-args.calls:]]
                row["raw_last_call"] = CAPTURED[-1][0].tolist()
                row["calls"] = calls
        decode.KERNELS["decode_mma_fold_append"] = plain_body
        decode.fold_launcher = plain_launcher
        rows_out.append(row)
        print(json.dumps({"S": S, "plain_wall_us_per_call": row["plain_wall_us_per_call"],
                          "stamped_wall_us_per_call": row["stamped_wall_us_per_call"]}))
        for cl in row["calls"][-1:]:
            print(json.dumps(cl))
    if args.out:
        Path(args.out).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
