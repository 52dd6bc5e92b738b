"""Where one decode step's attention time goes on the GPU: every kernel of a 3-bit cache
append and of the fused attention call, and of fp16 SDPA (and, with 4 in --bits, of
mlx-lm's 4-bit quantized attention), timed one by one.

Run under Nsight Compute to get each kernel's own duration (only the marked region is
profiled; the warm-up and the JIT compiles are not):

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        --csv python3 scripts/profile/profile_decode.py > ncu.csv

Without ncu it prints the wall time per call of the same operations, queued back to back
(what a decode loop sees), so the two can be compared: kernel time vs per-call cost.
"""

import argparse
import ctypes
import ctypes.util
import glob
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
from mlx_lm_turbo.attention import turbo_attention  # noqa: E402
from mlx_lm_turbo.cache import TurboKVCache  # noqa: E402
from mlx_lm_turbo.kernels import decode, plan  # noqa: E402


def cuda_profiler():
    """(start, stop) of the CUDA profiler API, or no-ops where there is no libcudart."""
    names = [ctypes.util.find_library("cudart")] + sorted(
        glob.glob("/opt/torch/.venv/lib/python3*/site-packages/nvidia/cu*/lib/libcudart.so*")
        + glob.glob("/usr/local/cuda/lib64/libcudart.so*"))
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            return lib.cudaProfilerStart, lib.cudaProfilerStop
        except OSError:
            continue
    return (lambda: None), (lambda: None)


def per_call_us(fn, n: int = 100) -> float:
    mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    outs = [fn() for _ in range(n)]
    mx.eval(outs)
    mx.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--bits", default="3", help="comma list of K/V bits (turboquant_mse)")
    p.add_argument("--blocks", default=str(plan.TARGET_BLOCKS),
                   help="comma list of the decode kernel's target grid sizes to try")
    p.add_argument("--kernels", default="mma,scalar",
                   help="decode kernels to time where both apply: mma (matrix units) and/or "
                        "scalar (plan.USE_MMA on / off)")
    p.add_argument("--steady", action="store_true",
                   help="also time the decode step as the model runs it (one token appended, "
                        "attention through the in-place buffers): the token coded by the "
                        "attention launch (appending), by a launch of its own "
                        "(decode.APPEND off: folded), and that with the combine in its "
                        "own launch too (decode.FOLD off: two_launch)")
    p.add_argument("--dtype", default="float16", help="float16 or bfloat16")
    p.add_argument("--heads", type=int, default=32, help="query heads (8 KV heads)")
    p.add_argument("--out", default=None, help="JSON of the per-call times")
    args = p.parse_args(argv)
    start, stop = cuda_profiler()
    B, Hq, Hkv, D = 1, args.heads, 8, 128
    dt = getattr(mx, args.dtype)
    scale = D ** -0.5
    res, calls = [], []
    bits_list = [int(b) for b in args.bits.split(",")]
    blocks_list = [int(b) for b in args.blocks.split(",")]
    cases = []
    for S in map(int, args.lengths.split(",")):
        mx.random.seed(S)
        k = mx.random.normal((B, Hkv, S, D)).astype(dt)
        v = mx.random.normal((B, Hkv, S, D)).astype(dt)
        q = mx.random.normal((B, Hq, 1, D)).astype(dt)
        k1 = mx.random.normal((B, Hkv, 1, D)).astype(dt)

        def sdpa(q=q, k=k, v=v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

        ops = [("sdpa_fp16", None, True, sdpa)]
        if 4 in bits_list:   # mlx-lm's own quantized cache at 4 bits (group 64)
            from mlx_lm.models.base import quantized_scaled_dot_product_attention as qsdpa
            qk = mx.quantize(k, group_size=64, bits=4)
            qv = mx.quantize(v, group_size=64, bits=4)
            mx.eval(qk, qv)

            def mlx_quant(q=q, qk=qk, qv=qv):
                return qsdpa(q, qk, qv, scale=scale, mask=None, group_size=64, bits=4)

            ops.append(("mlx_lm_quant4", None, True, mlx_quant))
        for bits in bits_list:
            for kernel in args.kernels.split(","):
                c = TurboKVCache("turboquant_mse", bits, "turboquant_mse", bits)
                c.update_and_fetch(k, v)
                mx.eval(c.keys, c.values)

                def attend(c=c, q=q):
                    kv, vv = c.keys_and_values()
                    return turbo_attention(q, kv, vv, c, scale=scale, mask=None)

                # The plan (kept on each cache) is made at the first call, under this setting.
                use_mma = kernel != "scalar"
                for blocks in blocks_list:
                    ops.append((f"fused_attention_{kernel}_mse{bits}_blocks{blocks}", blocks,
                                use_mma, attend))

            def append(c=c, k1=k1):
                c.update_and_fetch(k1, k1)
                c.trim(1)
                return list(c.keys.values()) + list(c.values.values())

            ops.append((f"append_1_token_mse{bits}", None, True, append))
            if args.steady:
                for name, fold, append in (("appending", True, True),
                                           ("folded", True, False),
                                           ("two_launch", False, False)):
                    c = TurboKVCache("turboquant_mse", bits, "turboquant_mse", bits)
                    c.update_and_fetch(k, v)
                    mx.eval(c.keys, c.values)

                    def step(c=c, q=q, k1=k1, fold=fold, append=append):
                        decode.FOLD, decode.APPEND = fold, append
                        kv, vv = c.update_and_fetch(k1, k1)
                        return turbo_attention(q, kv, vv, c, scale=scale, mask=None)

                    # (ncu_summary tells the kinds apart by the op's first word)
                    op = "appending_step" if name == "appending" else f"steady_step_{name}"
                    ops.append((f"{op}_mse{bits}", None, True, step))
        row = {"S": S}
        for name, blocks, use_mma, fn in ops:
            plan.USE_MMA = use_mma
            if blocks:
                plan.TARGET_BLOCKS = blocks
            row[name + "_us"] = round(per_call_us(fn), 2)
        res.append(row)
        print(row, flush=True)
        cases.append((S, ops))
    # The profiled region: each operation twice, synchronised between them so the
    # kernels' order in ncu's list is the call order (listed in the JSON).
    mx.synchronize()
    start()
    for S, ops in cases:
        for name, blocks, use_mma, fn in ops:
            plan.USE_MMA = use_mma
            if blocks:
                plan.TARGET_BLOCKS = blocks
            for _ in range(2):
                mx.eval(fn())
                mx.synchronize()
                calls.append(f"S={S} {name}")
    stop()
    if args.out:
        Path(args.out).write_text(json.dumps({"per_call_us": res, "profiled_calls": calls},
                                             indent=1))


if __name__ == "__main__":
    main()
