"""GPU time of whole decode steps of the Llama-3.2-3B-shaped model (random bf16 weights):
the steps run between cudaProfilerStart/Stop, so that Nsight Compute times each of their
kernels, and the sum is the GPU's share of a step, to set against the step's wall time
(``bench_attention.py --sections e2e``). One cache kind per process:

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        --csv python3 scripts/profile/profile_step_gpu.py --context 32768 --kind bf16 > bf16.csv
    python3 scripts/profile/profile_step_gpu.py --summarize bf16.csv --steps 2

Kinds as in ``bench_attention.py --sections e2e`` (bf16, mse3, no_attention, ...).
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # scripts/profile/ and scripts/
import mlx.core as mx  # noqa: E402
from bench_attention import filled_caches, llama_3b_shaped, model_attention  # noqa: E402
from ncu_summary import read_kernels  # noqa: E402
from profile_decode import cuda_profiler  # noqa: E402


def summarize(path: str, steps: int) -> dict:
    """Kernel count and summed kernel time (µs; ncu lists ns) per step from an ncu --csv
    listing."""
    kernels = read_kernels(path)
    total = sum(k["gpu__time_duration.sum"] for k in kernels) / 1e3
    return dict(kernels_per_step=len(kernels) / steps, gpu_us_per_step=round(total / steps, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--kind", default="bf16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--summarize", help="an ncu --csv file of a run of this script")
    a = ap.parse_args()
    if a.summarize:
        print(summarize(a.summarize, a.steps))
        return
    from mlx_lm_turbo import patch
    patch.apply()
    model = llama_3b_shaped()
    caches = filled_caches(a.kind, a.context, len(model.layers))
    tok = mx.ones((1, 1), mx.int32)
    start, stop = cuda_profiler()
    with model_attention(a.kind):
        for _ in range(3):  # JIT compiles and first-use checks stay out of the profile
            mx.eval(model(tok, cache=caches))
        mx.synchronize()
        start()
        for _ in range(a.steps):
            mx.eval(model(tok, cache=caches))
        mx.synchronize()
        stop()


if __name__ == "__main__":
    main()
