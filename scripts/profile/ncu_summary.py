"""Per-call GPU kernel time from an Nsight Compute CSV of ``profile_decode.py``: table,
JSON and a PNG (µs per call vs sequence length, speedup over fp16 SDPA).

    ncu --clock-control none --profile-from-start off \
        --metrics gpu__time_duration.sum,launch__registers_per_thread,smsp__inst_executed.sum \
        --csv python3 scripts/profile/profile_decode.py --out calls.json > ncu.csv
    python scripts/profile/ncu_summary.py ncu.csv calls.json --json out.json --png out.png

ncu lists the kernels in launch order and profile_decode.py runs each operation twice,
synchronised, in the order of ``profiled_calls``: fp16 SDPA is two kernels (cuDNN flash +
reduction), a fused attention two (decode + combine), a one-token append and mlx-lm's
quantized attention however many their ops launch (the fused encode and its slice writes,
or the codec's ops when the encode kernel is off). A call's time is the sum of its
kernels; an operation's is the faster of its two calls (the first launch of a kernel in
the profiled region sometimes carries a one-off load).
"""

import argparse
import csv
import json
from collections import OrderedDict

# An append, a steady decode step (``--steady``: the in-place append, the decode and, unless
# folded, the combine) and mlx-lm's quantized attention are sequences of launches (None:
# the kernels up to the next call, found by its first kernel's name: this call's first one
# again, or another kind's); the appending step (``--steady``, the default step: the
# attention launch codes the token) is one launch.
KERNELS_PER_CALL = {"sdpa": 2, "fused": 2, "append": None, "steady": None, "mlx": None,
                    "appending": 1}
FIRST_KERNEL = {"sdpa": "sdpa", "fused": "turbo_decode", "append": "turbo_encode",
                "steady": "turbo_encode", "mlx": "", "appending": "turbo_decode_mma_fold_append"}


def read_kernels(path: str) -> list[dict]:
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    cols = rows[head]
    at = {k: cols.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
    kernels = OrderedDict()
    for r in rows[head + 1:]:
        k = kernels.setdefault(int(r[at["ID"]]), {"name": r[at["Kernel Name"]]})
        k[r[at["Metric Name"]]] = float(r[at["Metric Value"]].replace(",", ""))
    return list(kernels.values())


def per_call(kernels: list[dict], calls: list[str]) -> list[dict]:
    out, i = [], 0
    for c, call in enumerate(calls):
        S, op = call.split(" ", 1)
        kind = op.split("_", 1)[0]
        n = KERNELS_PER_CALL[kind]
        if n is None:   # up to the next call: a repeat of this one, or another kind's
            nxt = FIRST_KERNEL[calls[c + 1].split(" ", 1)[1].split("_", 1)[0]] \
                if c + 1 < len(calls) else None
            n = 1
            while i + n < len(kernels) and kernels[i + n]["name"] != kernels[i]["name"] \
                    and not (nxt and nxt in kernels[i + n]["name"]):
                n += 1
        ks = kernels[i:i + n]
        i += len(ks)
        if FIRST_KERNEL[kind] not in ks[0]["name"]:
            raise ValueError(f"{call}: expected a {FIRST_KERNEL[kind]} kernel, "
                             f"got {ks[0]['name'][:60]}")
        out.append({"S": int(S[2:]), "op": op,
                    "us": sum(k["gpu__time_duration.sum"] for k in ks) / 1e3,
                    "kernels_us": [round(k["gpu__time_duration.sum"] / 1e3, 2) for k in ks],
                    "registers": [int(k.get("launch__registers_per_thread", 0)) for k in ks],
                    "warp_instructions": [int(k.get("smsp__inst_executed.sum", 0))
                                          for k in ks]})
    if i != len(kernels):
        raise ValueError(f"{len(kernels) - i} kernels left over: calls and CSV disagree")
    return out


def summarise(calls: list[dict]) -> dict:
    best = OrderedDict()
    for c in calls:
        key = (c["op"], c["S"])
        if key not in best or c["us"] < best[key]["us"]:
            best[key] = c
    table = OrderedDict()
    for (op, S), c in best.items():
        base = best.get(("sdpa_fp16", S))
        table.setdefault(op, OrderedDict())[S] = {
            "us": round(c["us"], 2), "kernels_us": c["kernels_us"],
            "registers": c["registers"], "warp_instructions": c["warp_instructions"],
            "speedup_vs_sdpa_fp16": round(base["us"] / c["us"], 2) if base else None}
    return table


def plot(table: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op, row in table.items():
        if op.startswith("append"):
            continue
        Ss = sorted(row)
        ax.plot(Ss, [row[S]["us"] for S in Ss], marker="o",
                label=op.replace("fused_attention_", "").replace("_blocks528", ""),
                linewidth=2.5 if op == "sdpa_fp16" else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length S (B=1, 32 query / 8 KV heads, d=128)")
    ax.set_ylabel("GPU time per decode call, µs (Nsight Compute)")
    ax.set_title("Decode attention on the H100: fp16 SDPA vs packed 2/3/4-bit caches")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("calls", help="profile_decode.py --out JSON (its profiled_calls)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    a = ap.parse_args(argv)
    calls = per_call(read_kernels(a.csv), json.load(open(a.calls))["profiled_calls"])
    table = summarise(calls)
    lengths = sorted({S for row in table.values() for S in row})
    print("| µs per call (x fp16 SDPA) | " + " | ".join(f"S = {S}" for S in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for op, row in table.items():
        cells = [f"{row[S]['us']:.1f} ({row[S]['speedup_vs_sdpa_fp16']:.2f}x)" if S in row
                 else "-" for S in lengths]
        print(f"| {op} | " + " | ".join(cells) + " |")
    if a.json:
        json.dump({"table": table, "calls": calls}, open(a.json, "w"), indent=1)
    if a.png:
        plot(table, a.png)


if __name__ == "__main__":
    main()
