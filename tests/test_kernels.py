"""Fused decode kernels: source checks on CPU (Metal parses as C++ through a shim, the
CUDA variant compiles with nvcc when present), the dispatcher's fallbacks, and GPU
correctness against the reference (skipped without a GPU backend; proven on the H100 by
scripts/bench_attention.py, see reports/attention_h100.md)."""

import os
import shutil
import subprocess
import tempfile
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turbo import kernels
from mlx_lm_turbo.attention import reference_attention
from mlx_lm_turbo.cache import TurboKVCache
from mlx_lm_turbo.kernels import decode, source

# Representative template settings: (key method, key bits, value method, value bits, D, R)
CONFIGS = [
    ("turboquant_mse", 3, "turboquant_mse", 3, 128, 4),
    ("turboquant_mse", 4, "turboquant_mse", 2, 64, 1),
    ("turboquant_rvq", 1, "turboquant_rvq", 2, 128, 4),
    ("turboquant_prod", 3, "turboquant_mse", 3, 256, 8),
]

METAL_TYPES = {"float32": "float", "float16": "float16_t", "uint32": "uint32_t"}
CUDA_TYPES = {"float32": "float", "float16": "__half", "uint32": "uint32_t"}
DECODE_DTYPES = ["float16", "float32", "float32", "uint32", "uint32", "float16", "float16",
                 "uint32", "uint32", "float16", "float32", "float32", "float32", "float32",
                 "float32"]
REDUCE_DTYPES = ["float32"] * 4
METAL_ATTRS = [("simdgroup_index_in_threadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
               ("thread_position_in_threadgroup", "uint3"),
               ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3")]

# Just enough of the Metal language for g++ to type-check the body: address spaces vanish,
# vector types are structs, SIMD/barrier builtins are declared.
METAL_SHIM = r"""
#include <cmath>
#include <cstdint>
#define device
#define constant
#define threadgroup
#define kernel
typedef unsigned int uint;
struct uint3 { uint x, y, z; };
struct uint4 { uint x, y, z, w; };
struct float4 { float x, y, z, w; };
struct half {
  unsigned short bits;
  half() = default;
  explicit half(float) : bits(0) {}
  operator float() const { return 0.0f; }
};
typedef half float16_t;
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline float simd_max(float x) { return x; }
inline float simd_sum(float x) { return x; }
namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float max(float a, float b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
}
"""


def _template(kb1, kb2, kmode, vb, vmode, d, dv, r, nv=1):
    """Decode-kernel template constants as the dispatcher sets them (G=4, L=2, causal)."""
    wk1 = (d * kb1 + 31) // 32
    wk2 = (d * kb2 + 31) // 32 if kb2 else 0
    wv = (dv * vb + 31) // 32
    nc = (1 << kb1) + ((1 << kb2) if kb2 else 0)
    tabn = 4 * -(-(d * nc * r) // 4)
    sh = max(tabn + max(r * d, 128 * wv * nv), 4 * r * dv)
    return [("D", d), ("DV", dv), ("KB1", kb1), ("WK1", wk1), ("KB2", kb2), ("WK2", wk2),
            ("KMODE", kmode), ("VB", vb), ("WV", wv), ("VMODE", vmode), ("GQ", 4), ("QL", 2),
            ("RB", r), ("NRG", -(-8 // r)), ("MASK", 1), ("ROTQ", int(kmode != 2)), ("NT", 128),
            ("TABN", tabn), ("SH", 4 * -(-sh // 4)), ("QT", "float16")]


REDUCE_TEMPLATE = [("RB", 4), ("DV", 128), ("GQ", 4), ("QL", 1), ("ROTV", 1), ("OT", "float16")]


def _uses(src, name, what):
    return f"{name}_{what}" in src


def render_metal(template, name="decode") -> str:
    """A kernel as mx.fast.metal_kernel would assemble it (signature generated from the
    inputs, the thread attributes the body mentions), instantiated once."""
    body = source.DECODE_BODY if name == "decode" else source.REDUCE_BODY
    names = decode.DECODE_INPUTS if name == "decode" else decode.REDUCE_INPUTS
    dtypes = DECODE_DTYPES if name == "decode" else REDUCE_DTYPES
    outs = decode.DECODE_OUTPUTS if name == "decode" else decode.REDUCE_OUTPUTS
    header, src = decode.full_source(body, "metal")
    args = []
    for n, dt in zip(names, dtypes):
        args.append(f"const device {METAL_TYPES[dt]}* {n}")
        if _uses(src, n, "shape"):
            args.append(f"const constant int* {n}_shape")
        if _uses(src, n, "strides"):
            args.append(f"const constant int64_t* {n}_strides")
    args += [f"device float* {n}" for n in outs]
    args += [f"{t} {a}" for a, t in METAL_ATTRS if a in src]
    tparams = ", ".join(f"typename {k}" if isinstance(v, str) else f"int {k}"
                        for k, v in template)
    tvals = ", ".join(METAL_TYPES[v] if isinstance(v, str) else str(v) for _, v in template)
    sig = ",\n  ".join(args)
    return (METAL_SHIM + header + f"\ntemplate <{tparams}>\nkernel void turbo_{name}(\n  {sig}) {{\n"
            + src + "\n}\n" + f"template void turbo_{name}<{tvals}>(\n  {sig});\n")


CUDA_STUB = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
#include <cooperative_groups.h>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


def render_cuda(template, name="decode") -> str:
    """A kernel as mx.fast.cuda_kernel assembles it (MLX's own device header replaced by
    a stub declaring the Shape/Strides types it provides)."""
    body = source.DECODE_BODY if name == "decode" else source.REDUCE_BODY
    header, src = decode.full_source(body, "cuda")
    names = decode.DECODE_INPUTS if name == "decode" else decode.REDUCE_INPUTS
    dtypes = DECODE_DTYPES if name == "decode" else REDUCE_DTYPES
    outs = decode.DECODE_OUTPUTS if name == "decode" else decode.REDUCE_OUTPUTS
    args = []
    for n, dt in zip(names, dtypes):
        args.append(f"const {CUDA_TYPES[dt]}* {n}")
        if _uses(src, n, "shape"):
            args.append(f"const __grid_constant__ Shape {n}_shape")
        if _uses(src, n, "strides"):
            args.append(f"const __grid_constant__ Strides {n}_strides")
    out_t = "__half" if name == "reduce" else "float"
    args += [f"{out_t}* {n}" for n in outs]
    consts = "".join(f"  using {k} = {CUDA_TYPES[v]};\n" if isinstance(v, str)
                     else f"  constexpr int {k} = {v};\n" for k, v in template)
    return (CUDA_STUB + header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            f"__global__ void turbo_{name}(\n  " + ",\n  ".join(args) + ") {\n" + consts
            + src + "\n}\n}\n")


def _config_template(cfg):
    km, kb, vm, vb, d, r = cfg
    kmode = decode.KEY_MODES[km]
    if km == "turboquant_prod":
        kb1, kb2 = kb - 1, 1
    elif km == "turboquant_rvq":
        kb1, kb2 = kb, kb
    else:
        kb1, kb2 = kb, 0
    return _template(kb1, kb2, kmode, vb, decode.VALUE_MODES[vm], d, d, r,
                     nv=2 if vm == "turboquant_rvq" else 1)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_metal_source_parses(cfg, tmp_path):
    cxx = shutil.which("clang++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (clang++ or g++) to parse the Metal variant")
    for name in ("decode", "reduce"):
        tpl = _config_template(cfg) if name == "decode" else REDUCE_TEMPLATE
        path = tmp_path / f"{name}_metal.cpp"
        path.write_text(render_metal(tpl, name))
        res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wno-unknown-pragmas",
                              str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_cuda_source_compiles(cfg, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the CUDA variant is compiled on the GPU machine")
    for name in ("decode", "reduce"):
        tpl = _config_template(cfg) if name == "decode" else REDUCE_TEMPLATE
        path = tmp_path / f"{name}.cu"
        path.write_text(render_cuda(tpl, name))
        res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-c", "-o",
                              str(tmp_path / f"{name}.o"), str(path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]


def _filled_cache(km, kb, vm, vb, B=1, Hkv=2, S=300, D=64, seed=0):
    mx.random.seed(seed)
    c = TurboKVCache(km, kb, vm, vb, seed=seed)
    k = mx.random.normal((B, Hkv, S, D)).astype(mx.float16)
    v = mx.random.normal((B, Hkv, S, D)).astype(mx.float16)
    keys, values = c.update_and_fetch(k, v)
    return c, keys, values


def test_dispatcher_returns_none_on_cpu(monkeypatch):
    monkeypatch.delenv(decode.ENV, raising=False)
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    if decode.backend() is None:
        assert kernels.decode_attention(q, keys, values, c, 0.125) is None


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv(decode.ENV, "0")
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    assert kernels.decode_attention(q, keys, values, c, 0.125) is None


def test_env_forces_kernel_raises_without_gpu(monkeypatch):
    if decode.backend() is not None:
        pytest.skip("a GPU backend is active")
    monkeypatch.setenv(decode.ENV, "1")
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    with pytest.raises(RuntimeError):
        kernels.decode_attention(q, keys, values, c, 0.125)


def test_plan_rejects_unsupported():
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    assert decode.plan(q, keys, values, c, None, None, "cuda") is not None
    assert decode.plan(q, keys, values, c, None, mx.zeros((4,)), "cuda") is None  # sinks
    q9 = mx.random.normal((1, 4, 9, 64))
    assert decode.plan(q9, keys, values, c, "causal", None, "cuda") is None  # L too long
    cp, kp, vp = _filled_cache("polar", 3, "polar", 3)
    assert decode.plan(q, kp, vp, cp, None, None, "cuda") is None


def test_n_splits_cover_sequence():
    for S in (1, 127, 128, 129, 1000, 4096, 32768, 131072, 131073):
        for rows in (1, 8, 64):
            nsp = decode.n_splits(S, rows)
            chunk = -(-(-(-S // nsp)) // decode.NT) * decode.NT
            assert nsp * chunk >= S and nsp >= 1


gpu = pytest.mark.skipif(decode.backend() is None,
                         reason="no Metal or CUDA backend: GPU correctness is proven by "
                                "scripts/bench_attention.py on the H100 (reports/attention_h100.md)")


@gpu
@pytest.mark.parametrize("km,kb,vm,vb", [("mse", 2, "mse", 2), ("mse", 3, "mse", 3),
                                         ("mse", 4, "mse", 4), ("rvq", 1, "rvq", 1),
                                         ("prod", 3, "mse", 3)])
@pytest.mark.parametrize("D,Hq,Hkv,L,S", [(128, 8, 2, 1, 1000), (64, 4, 4, 4, 333),
                                          (256, 8, 2, 1, 257)])
def test_fused_matches_reference(km, kb, vm, vb, D, Hq, Hkv, L, S):
    c, keys, values = _filled_cache(km, kb, vm, vb, Hkv=Hkv, S=S, D=D)
    q = mx.random.normal((1, Hq, L, D)).astype(mx.float16)
    mask = "causal" if L > 1 else None
    p = decode.plan(q, keys, values, c, mask, None, decode.backend())
    assert p is not None
    out = decode.run_fused(q, keys, values, c, D ** -0.5, mask, p, decode.backend())
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 5e-3, err


# The very kernel text, executed on the CPU by the C++ thread emulation (emulate.py):
# layouts, rotations in-kernel, masks, GQA rows, splits and strides against the reference.
def _emulator_available():
    import shutil as sh
    return sh.which("g++") is not None


emu = pytest.mark.skipif(not _emulator_available(), reason="g++ (C++20) not available")


@emu
@pytest.mark.parametrize("km,kb,vm,vb,D,Hq,Hkv,L,S,mask,blocks", [
    ("mse", 3, "mse", 3, 128, 8, 2, 1, 517, None, 528),
    ("mse", 2, "mse", 4, 64, 4, 4, 4, 300, "causal", 528),
    ("rvq", 1, "rvq", 1, 64, 8, 2, 1, 1000, None, 2),        # several tiles per split
    ("prod", 3, "mse", 3, 64, 16, 2, 3, 700, "causal", 2),
    ("mse", 3, "mse", 3, 96, 8, 2, 2, 300, "causal", 528),   # dense rotation (not 2^k)
    ("mse", 4, "mse", 2, 256, 4, 1, 1, 129, None, 528),
    ("mse", 3, "mse", 3, 64, 8, 2, 4, 200, "bool", 528),
    ("rvq", 2, "mse", 3, 64, 8, 2, 4, 200, "additive", 3),
])
def test_emulated_kernel_matches_reference(km, kb, vm, vb, D, Hq, Hkv, L, S, mask, blocks,
                                           monkeypatch):
    from mlx_lm_turbo.kernels import emulate
    monkeypatch.setattr(decode, "TARGET_BLOCKS", blocks)
    c, keys, values = _filled_cache(km, kb, vm, vb, Hkv=Hkv, S=S, D=D, seed=S)
    q = mx.random.normal((1, Hq, L, D)).astype(mx.float16)
    if mask == "bool":
        mask = mx.random.uniform(shape=(1, 1, L, S)) > 0.3
    elif mask == "additive":
        mask = mx.random.normal((1, Hq, L, S))
    p = decode.plan(q, keys, values, c, mask, None, "cuda")
    assert p is not None
    out = emulate.run_fused_emulated(q, keys, values, c, D ** -0.5, mask, p,
                                     full=(c.keys, c.values))
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 2e-3, err


def test_first_use_check_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv(decode.ENV, raising=False)
    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "_checked", {})
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("nvrtc: compile failed")
    monkeypatch.setattr(decode, "run_fused", broken)
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert kernels.decode_attention(q, keys, values, c, 0.125) is None
        assert kernels.decode_attention(q, keys, values, c, 0.125) is None
    assert len(w) == 1 and "compile failed" in str(w[0].message)
    assert len(calls) == 1


def test_first_use_check_rejects_wrong_output(monkeypatch):
    monkeypatch.delenv(decode.ENV, raising=False)
    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "_checked", {})
    monkeypatch.setattr(decode, "run_fused", lambda q, *a, **k: mx.zeros(q.shape, q.dtype) + 1)
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert kernels.decode_attention(q, keys, values, c, 0.125) is None
    assert len(w) == 1 and "disabled" in str(w[0].message)
    monkeypatch.setenv(decode.ENV, "1")
    with pytest.raises(RuntimeError):
        kernels.decode_attention(q, keys, values, c, 0.125)
