"""Fused decode and encode kernels: source checks on CPU (Metal parses as C++ through a
shim, the CUDA variant compiles with nvcc when present), the very kernel text run by a C++
thread emulation against the MLX reference / codecs, the dispatchers' fallbacks, and GPU
correctness (skipped without a GPU backend; proven on the H100 by
scripts/bench_attention.py, see reports/README.md)."""

import shutil
import subprocess
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turbo import codecs, kernels
from mlx_lm_turbo.attention import reference_attention
from mlx_lm_turbo.cache import TurboKVCache
from mlx_lm_turbo.kernels import build, check, decode, encode, launchers, source
from mlx_lm_turbo.kernels import plan as planning

# Representative template settings: (key method, key bits, value method, value bits, D, R)
CONFIGS = [
    ("turboquant_mse", 3, "turboquant_mse", 3, 128, 4),
    ("turboquant_mse", 4, "turboquant_mse", 2, 64, 1),
    ("turboquant_rvq", 1, "turboquant_rvq", 2, 128, 4),
    ("turboquant_prod", 3, "turboquant_mse", 3, 256, 8),
]

METAL_TYPES = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t",
               "uint32": "uint32_t", "int32": "int32_t"}
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
              "uint32": "uint32_t", "int32": "int32_t"}
DECODE_DTYPES = ["float16", "float32", "float32", "uint32", "uint32", "float16", "float16",
                 "uint32", "uint32", "float16", "float32", "float32", "float32", "float32",
                 "float32"]


def _decode_dtypes(window_dtype=None):
    """Input dtypes of the decode kernel; with a window, qw/rk/rv/kmu are real arrays."""
    if window_dtype is None:
        return DECODE_DTYPES + ["float32"] * 5
    return DECODE_DTYPES + ["float16", window_dtype, window_dtype, "float16", "float32"]
REDUCE_DTYPES = ["float32"] * 4
MMA_DTYPES = ["float16", "float32", "uint32", "float16", "uint32", "float16", "uint32",
              "uint32", "int32", "uint32"]
# The fused encode's in-place inputs (pos, after, K and V buffers: codes1, codes2, norm).
ENCODE_BUFFER_DTYPES = ["int32", "uint32"] + ["uint32", "uint32", "float16"] * 2


def _mma_template(kb, vb, d, mask=1, live=0):
    """Template of the matrix-unit decode kernel as the dispatcher sets it (G=4, L=2)."""
    rep = planning.mma_rep(codecs.make("turboquant_mse", kb, d),
                         codecs.make("turboquant_mse", vb, d), 8, d, d, kb, vb,
                         planning.SHARED_BUDGET["metal"])
    aligned = planning.mma_aligned(rep, d, d, kb, vb, planning.SHARED_BUDGET["metal"])
    return [("D", d), ("DV", d), ("KB", kb), ("WK", d * kb // 32), ("VB", vb),
            ("WV", (d * vb + 31) // 32), ("GQ", 4), ("QL", 2), ("MASK", mask), ("NT", 128),
            ("KREPL", rep), ("VREPL", rep), ("TALIGN", int(aligned)), ("QT", "float16"),
            ("LIVE", live)]
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
struct uint4 {
  uint x, y, z, w;
  uint4() = default;
  uint4(uint a, uint b, uint c, uint d) : x(a), y(b), z(c), w(d) {}
};
struct float4 { float x, y, z, w; };
struct half {
  unsigned short bits;
  half() = default;
  explicit half(float) : bits(0) {}
  operator float() const { return 0.0f; }
};
typedef half float16_t;
struct bfloat16_t {
  unsigned short bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float) : bits(0) {}
  operator float() const { return 0.0f; }
};
enum class mem_flags { mem_threadgroup, mem_device };
struct atomic_uint { uint v; };
enum memory_order { memory_order_relaxed };
inline uint atomic_fetch_add_explicit(atomic_uint* a, uint x, memory_order) {
  const uint old = a->v;
  a->v += x;
  return old;
}
inline void threadgroup_barrier(mem_flags) {}
inline void simdgroup_barrier(mem_flags) {}
typedef unsigned short ushort;
inline float simd_shuffle_xor(float x, ushort) { return x; }
struct half2 { half x, y; half2() = default; half2(half a, half b) : x(a), y(b) {} };
template <typename T, typename U> T as_type(U u) { T t; static_assert(sizeof(T) == sizeof(U)); (void)u; return t; }
template <typename T, int R, int C> struct simdgroup_matrix {
  T e[2];
  T* thread_elements() { return e; }
};
template <typename C, typename A, typename B>
inline void simdgroup_multiply_accumulate(C&, const A&, const B&, const C&) {}
#define thread
inline float simd_max(float x) { return x; }
inline bool simd_any(bool x) { return x; }
inline float simd_sum(float x) { return x; }
namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float max(float a, float b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float sqrt(float x) { return std::sqrt(x); }
}
"""


def _template(kb1, kb2, kmode, vb, vmode, d, dv, r, nv=1, win=0, wdtype="float32"):
    """Decode-kernel template constants as the dispatcher sets them (G=4, L=2, causal;
    ``win`` > 0: an fp16 window of that many tokens, copies of dtype ``wdtype``)."""
    wk1 = (d * kb1 + 31) // 32
    wk2 = (d * kb2 + 31) // 32 if kb2 else 0
    wv = (dv * vb + 31) // 32
    nc = (1 << kb1) + ((1 << kb2) if kb2 else 0)
    tabn = 4 * -(-(d * nc * r) // 4)
    sh = max(tabn + max(r * d, 128 * wv * nv), 4 * r * dv)
    return [("D", d), ("DV", dv), ("KB1", kb1), ("WK1", wk1), ("KB2", kb2), ("WK2", wk2),
            ("KMODE", kmode), ("VB", vb), ("WV", wv), ("VMODE", vmode), ("GQ", 4), ("QL", 2),
            ("RB", r), ("NRG", -(-8 // r)), ("MASK", 1), ("ROTQ", int(kmode != 2)), ("NT", 128),
            ("TABN", tabn), ("SH", 4 * -(-sh // 4)), ("QT", "float16"), ("WIN", win),
            ("WCTR", int(win > 0)), ("WROTV", 1), ("QWT", "float16" if win else "float32"),
            ("RKT", wdtype), ("RVT", wdtype), ("MUT", "float16" if win else "float32")]


def fused_attention(q, keys, values, cache, scale, *rest):
    """The fused dispatcher as attention.turbo_attention calls it."""
    return kernels.decode_attention(q, keys, values, cache, scale, *rest,
                                    reference=reference_attention)


REDUCE_TEMPLATE = [("RB", 4), ("DV", 128), ("GQ", 4), ("QL", 1), ("ROTV", 1), ("OT", "float16"),
                   ("SG", 4)]


def _uses(src, name, what):
    return f"{name}_{what}" in src


def _kernel_parts(name, x_dtype=None):
    """(body, input names, input dtypes, output names, output dtypes) of a kernel."""
    if name == "decode":  # x_dtype: the window copies' dtype (None: no window)
        return (source.body("decode"), build.DECODE_INPUTS, _decode_dtypes(x_dtype),
                build.DECODE_OUTPUTS, ["float32"] * 3)
    if name == "decode_mma":
        return (source.body("decode_mma"), build.MMA_INPUTS, MMA_DTYPES, build.DECODE_OUTPUTS,
                ["float32"] * 3)
    if name == "decode_mma_fold":
        return (source.body(name), build.FOLD_INPUTS,
                MMA_DTYPES + ["float32", "uint32", "float16"], build.FOLD_OUTPUTS,
                ["float32", "float16"])
    if name == "decode_mma_fold_append":   # x_dtype: the new key's and value's dtype
        return (source.body(name), build.APPEND_INPUTS,
                ["float16", "uint32"] + MMA_DTYPES[2:6] + MMA_DTYPES[8:]
                + ["uint32", "float16"] + [x_dtype or "float16"] * 2,
                build.FOLD_OUTPUTS, ["float32", "float16"])
    if name == "reduce":
        return (source.body("reduce"), build.REDUCE_INPUTS, REDUCE_DTYPES, build.REDUCE_OUTPUTS,
                ["float16"])
    in_dtypes = [x_dtype, "float32", x_dtype, "float32"] + ENCODE_BUFFER_DTYPES
    if name == "encode_inplace":
        return (source.body("encode_inplace"), encode.INPUTS, in_dtypes, encode.IN_PLACE_OUTPUTS,
                ["uint32"])
    return (source.body("encode"), encode.INPUTS, in_dtypes, encode.OUTPUTS,
            ["uint32", "uint32", "float16"] * 2)


def _input_args(src: str, names, dtypes, array: str, shape: str, strides: str,
                types: dict) -> list:
    """The kernel's input parameters as the backend generates them: each array, then its
    shape and strides where the body reads them (formats take {t} type and {n} name)."""
    args = []
    for n, dt in zip(names, dtypes):
        args.append(array.format(t=types[dt], n=n))
        if _uses(src, n, "shape"):
            args.append(shape.format(n=f"{n}_shape"))
        if _uses(src, n, "strides"):
            args.append(strides.format(n=f"{n}_strides"))
    return args


def render_metal(template, name="decode", x_dtype=None) -> str:
    """A kernel as mx.fast.metal_kernel would assemble it (signature generated from the
    inputs, the thread attributes the body mentions), the template values baked into the
    body as the kernels are built (build.build_kernel)."""
    body, names, dtypes, outs, out_dtypes = _kernel_parts(name, x_dtype)
    header, src = build.full_source(body, "metal", template, mma=name.startswith("decode_mma"))
    args = _input_args(src, names, dtypes, "const device {t}* {n}", "const constant int* {n}",
                       "const constant int64_t* {n}", METAL_TYPES)
    args += [f"device {METAL_TYPES[dt]}* {n}" for n, dt in zip(outs, out_dtypes)]
    args += [f"{t} {a}" for a, t in METAL_ATTRS if a in src]
    sig = ",\n  ".join(args)
    return (METAL_SHIM + header + f"\nkernel void turbo_{name}(\n  {sig}) {{\n" + src + "\n}\n")


CUDA_STUB = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cooperative_groups.h>
#define inf cuda::std::numeric_limits<float>::infinity()
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


def render_cuda(template, name="decode", x_dtype=None, included=False) -> str:
    """A kernel as mx.fast.cuda_kernel assembles it (MLX's own device header replaced by
    a stub declaring the Shape/Strides types it provides), template values baked in;
    ``included``: its text read from files, as build_kernel hands it over on CUDA."""
    body, names, dtypes, outs, out_dtypes = _kernel_parts(name, x_dtype)
    header, src = build.full_source(body, "cuda", template, mma=name.startswith("decode_mma"))
    if included:
        header, src = build.included(header, src, names, f"test_{name}")
        assert len(src) < 400
    args = _input_args(src, names, dtypes, "const {t}* {n}", "const __grid_constant__ Shape {n}",
                       "const __grid_constant__ Strides {n}", CUDA_TYPES)
    args += [f"{CUDA_TYPES[dt]}* {n}" for n, dt in zip(outs, out_dtypes)]
    return (CUDA_STUB + header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            f"__global__ void turbo_{name}(\n  " + ",\n  ".join(args) + ") {\n"
            + src + "\n}\n}\n")


def _table_offsets():
    """Offsets of the appending kernel's tables in cdata (any will do to compile)."""
    return [(n, 4 * i) for i, n in enumerate(build.TABLE_OFFSETS)]


def _config_template(cfg):
    km, kb, vm, vb, d, r = cfg
    kmode = planning.KEY_MODES[km]
    if km == "turboquant_prod":
        kb1, kb2 = kb - 1, 1
    elif km == "turboquant_rvq":
        kb1, kb2 = kb, kb
    else:
        kb1, kb2 = kb, 0
    return _template(kb1, kb2, kmode, vb, planning.VALUE_MODES[vm], d, d, r,
                     nv=2 if vm == "turboquant_rvq" else 1)


def assert_metal_parses(text: str, path) -> None:
    """Syntax-check a rendered Metal kernel as C++ (skip without a compiler)."""
    cxx = shutil.which("clang++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (clang++ or g++) to parse the Metal variant")
    path.write_text(text)
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wno-unknown-pragmas",
                          str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


def assert_cuda_compiles(text: str, path, ptx: bool = False) -> None:
    """Compile a rendered CUDA kernel with nvcc for sm_90 (skip without nvcc); ``ptx``:
    device code only, as NVRTC compiles it (3x faster than a full -c)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the CUDA variant is compiled on the GPU machine")
    path.write_text(text)
    out = path.with_suffix(".ptx" if ptx else ".o")
    res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-ptx" if ptx else "-c", "-o",
                          str(out), str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_metal_source_parses(cfg, tmp_path):
    for name in ("decode", "reduce"):
        tpl = _config_template(cfg) if name == "decode" else REDUCE_TEMPLATE
        assert_metal_parses(render_metal(tpl, name), tmp_path / f"{name}_metal.cpp")


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_cuda_source_compiles(cfg, tmp_path):
    for name in ("decode", "reduce"):
        tpl = _config_template(cfg) if name == "decode" else REDUCE_TEMPLATE
        assert_cuda_compiles(render_cuda(tpl, name), tmp_path / f"{name}.cu")


def test_merged_tables_keep_every_word():
    """The appending launch's tables in one uint32 input: each at its offset (a multiple
    of 4 words), bit for bit, in order; other dtypes are refused."""
    tables = [mx.array([0.5, -1.25, 3.0], mx.float32), mx.array([1, 2 ** 32 - 1], mx.uint32),
              mx.arange(8, dtype=mx.uint32), mx.array([-0.0, 7.5, 1e-30, 2.0, 9.0]),
              mx.ones((2, 2)), mx.array([6], mx.uint32)]
    offsets, merged = launchers.merged_tables(tables)
    assert [n for n, _ in offsets] == list(build.TABLE_OFFSETS)
    assert merged.dtype == mx.uint32
    for (_, at), t in zip(offsets, tables):
        assert at % 4 == 0
        got = merged[at:at + t.size]
        want = t.reshape(-1)
        assert mx.array_equal(got.view(mx.float32) if t.dtype == mx.float32 else got, want)
    assert offsets[-1][1] + 1 <= merged.size
    with pytest.raises(TypeError):
        launchers.merged_tables([mx.ones((3,), mx.float16)])


def test_included_kernel_text(tmp_path, monkeypatch):
    """On CUDA build_kernel hands MLX a one-line source that #includes the text (MLX
    hashes the source it is given at every evaluation): the files hold the exact text,
    the stub names exactly the shape/strides parameters the text uses (MLX passes only
    those it finds), a second build reuses the files, an unwritable folder keeps it inline."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tpl = _mma_template(3, 3, 128, live=1) + [("OT", "bfloat16")]
    header, src = build.full_source(source.body("decode_mma_fold"), "cuda", tpl,
                                     mma=True)
    h, s = build.included(header, src, build.FOLD_INPUTS, "k")
    assert len(h) + len(s) < 400 < len(src)
    hpath, spath = h.split('"')[1], s.split('"')[1]
    assert open(hpath).read() == header and open(spath).read() == src
    for n in build.FOLD_INPUTS:
        for w in ("shape", "strides", "ndim"):
            assert (f"{n}_{w}" in s) == (f"{n}_{w}" in src), (n, w)
    assert "kn_shape" in s and "q_strides" in s and "cnt_strides" not in s
    open(spath, "w").write("tampered")
    assert build.included(header, src, build.FOLD_INPUTS, "k") == (h, s)
    assert open(spath).read() == src
    assert sorted(p.name for p in (tmp_path / "mlx_lm_turbo" / "kernels").iterdir()) == [
        "k.body.cuh", "k.h.cuh"]   # no temporary file left behind
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))   # a file: no folder under it
    assert build.included(header, src, build.FOLD_INPUTS, "k") == (header, src)


@pytest.mark.parametrize("kb,vb,d,live,name", [
    (3, 3, 128, 0, "decode_mma"), (4, 2, 64, 0, "decode_mma"), (3, 3, 128, 1, "decode_mma"),
    (3, 3, 128, 1, "decode_mma_fold"), (4, 2, 128, 1, "decode_mma_fold_append")])
def test_mma_metal_source_parses(kb, vb, d, live, name, tmp_path):
    tpl = _mma_template(kb, vb, d, live=live)
    if name.endswith("append"):
        tpl += [("NORMT", "float16")] + _table_offsets()
    if "fold" in name:
        tpl += [("OT", "float16")]
    assert_metal_parses(render_metal(tpl, name), tmp_path / f"{name}_metal.cpp")


@pytest.mark.parametrize("name,included", [("decode_mma", False), ("decode_mma_fold", True),
                                           ("decode_mma_fold_append", True)])
def test_mma_cuda_source_compiles(name, included, tmp_path, monkeypatch):
    """...with launch bounds (4 blocks of NT threads per SM: at most 128 registers);
    the folded ones as build_kernel hands them to MLX on CUDA (text in included files)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tpl = _mma_template(3, 3, 128, live=int(name.endswith("append")))
    if name.endswith("append"):
        tpl += [("NORMT", "float16")] + _table_offsets()
    if "fold" in name:
        tpl += [("OT", "float16")]
    assert_cuda_compiles(render_cuda(tpl, name, x_dtype="bfloat16", included=included),
                         tmp_path / f"{name}.cu", ptx=True)
    ptx = (tmp_path / f"{name}.ptx").read_text()
    assert f".maxntid {build.NT}, 1, 1" in ptx and ".minnctapersm 4" in ptx


def _filled_cache(km, kb, vm, vb, B=1, Hkv=2, S=300, D=64, seed=0, stats=False):
    mx.random.seed(seed)
    c = TurboKVCache(km, kb, vm, vb, seed=seed, center_keys=stats, scale_keys=stats)
    k = mx.random.normal((B, Hkv, S, D)).astype(mx.float16) + (4.0 if stats else 0.0)
    v = mx.random.normal((B, Hkv, S, D)).astype(mx.float16)
    keys, values = c.update_and_fetch(k, v)
    return c, keys, values


def test_dispatcher_returns_none_on_cpu(monkeypatch):
    monkeypatch.setattr(check, "MODE", None)
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    if check.backend() is None:
        assert fused_attention(q, keys, values, c, 0.125) is None


def test_switches_follow_the_settings(monkeypatch):
    """The kept decode step and append are keyed by decode.switches(): changing any
    setting must change it."""
    seen = {decode.switches()}
    for module, name, value in ((check, "MODE", not check.MODE),
                                (planning, "USE_MMA", not planning.USE_MMA),
                                (decode, "FOLD", not decode.FOLD),
                                (decode, "APPEND", not decode.APPEND)):
        monkeypatch.setattr(module, name, value)
        seen.add(decode.switches())
    assert len(seen) == 5


def test_env_forces_reference(monkeypatch):
    monkeypatch.setattr(check, "MODE", False)
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    assert fused_attention(q, keys, values, c, 0.125) is None


def test_env_forces_kernel_raises_without_gpu(monkeypatch):
    if check.backend() is not None:
        pytest.skip("a GPU backend is active")
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    monkeypatch.setattr(check, "MODE", True)  # after the fill: the cache append raises too
    q = mx.random.normal((1, 4, 1, 64))
    with pytest.raises(RuntimeError):
        fused_attention(q, keys, values, c, 0.125)


def test_plan_rejects_unsupported():
    c, keys, values = _filled_cache("mse", 3, "mse", 3)
    q = mx.random.normal((1, 4, 1, 64))
    assert planning.plan(q, keys, values, c, None, None, "cuda") is not None
    assert planning.plan(q, keys, values, c, None, mx.zeros((4,)), "cuda") is None  # sinks
    q9 = mx.random.normal((1, 4, 9, 64))
    assert planning.plan(q9, keys, values, c, "causal", None, "cuda") is None  # L too long
    cp, kp, vp = _filled_cache("polar", 3, "polar", 3)
    assert planning.plan(q, kp, vp, cp, None, None, "cuda") is None


def test_n_splits_cover_sequence():
    for S in (1, 127, 128, 129, 1000, 4096, 32768, 131072, 131073):
        for rows in (1, 8, 64):
            nsp = planning.n_splits(S, rows)
            chunk = -(-(-(-S // nsp)) // build.NT) * build.NT
            assert nsp * chunk >= S and nsp >= 1


gpu = pytest.mark.skipif(check.backend() is None,
                         reason="no Metal or CUDA backend: GPU correctness is proven by "
                                "scripts/bench_attention.py on the H100 (reports/README.md)")


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
    p = planning.plan(q, keys, values, c, mask, None, check.backend())
    assert p is not None
    out = decode.run_fused(q, keys, values, c, D ** -0.5, mask, p, check.backend())
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 5e-3, err


@gpu
def test_steady_decode_path_matches_reference(monkeypatch):
    """After its first (checked) call, decode_attention serves the following steps from
    the memo on the cache (``_steady``): each step, appended token and grown S included,
    must still equal the reference; with an env var changed the memo no longer applies."""
    from mlx_lm_turbo.attention import reference_attention
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(planning, "USE_MMA", True)
    c, _, _ = _filled_cache("mse", 3, "mse", 3, Hkv=2, S=700, D=128)
    for step in range(3):
        k1 = mx.random.normal((1, 2, 1, 128)).astype(mx.bfloat16)
        keys, values = c.update_and_fetch(k1, k1)
        q = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
        out = fused_attention(q, keys, values, c, 128 ** -0.5)
        # (the first call of a shape may be its first-use check, which sets no memo)
        assert out is not None and (step == 0 or c._fused_steady is not None)
        ref = reference_attention(q, keys, values, c, 128 ** -0.5)
        err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
        assert err < 1e-2, (step, err)
    # A deep copy shares the memo but not the buffers: each must read its own.
    import copy
    twin = copy.deepcopy(c)
    for cache in (twin, c):   # (c last: the check below reuses its views)
        k1 = mx.random.normal((1, 2, 1, 128)).astype(mx.bfloat16)
        keys, values = cache.update_and_fetch(k1, k1)
        out = fused_attention(q, keys, values, cache, 128 ** -0.5)
        ref = reference_attention(q, keys, values, cache, 128 ** -0.5)
        err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
        assert err < 1e-2, err
    monkeypatch.setattr(planning, "USE_MMA", False)    # the scalar kernel now: a new signature
    out = fused_attention(q, keys, values, c, 128 ** -0.5)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 1e-2, err


@gpu
@pytest.mark.parametrize("Hq,Hkv,S", [(24, 8, 5000), (8, 1, 131)])
def test_folded_step_equals_two_launches(Hq, Hkv, S, monkeypatch):
    """The steady step's one launch (combine folded in) against the two-launch step and
    the reference: five launches queued before one evaluation (each orders itself after
    the one before on the shared counters), then one more after it (counters reset)."""
    from mlx_lm_turbo.attention import reference_attention
    monkeypatch.setattr(planning, "USE_MMA", True)
    c, keys, values = _filled_cache("mse", 3, "mse", 3, Hkv=Hkv, S=S, D=128)
    scale = 128 ** -0.5
    qs = [mx.random.normal((1, Hq, 1, 128)).astype(mx.bfloat16) for _ in range(6)]
    p = planning.plan(qs[0], keys, values, c, None, None, check.backend())
    folded = decode._steady(qs[0], keys, values, c, scale, p, check.backend(), fold=True)[0]
    two = decode._steady(qs[0], keys, values, c, scale, p, check.backend(), fold=False)[0]
    outs = [folded(q, keys, values) for q in qs[:5]]
    mx.eval(outs)
    outs.append(folded(qs[5], keys, values))
    for q, out in zip(qs, outs):
        ref = reference_attention(q, keys, values, c, scale).astype(mx.float32)
        want = two(q, keys, values).astype(mx.float32)
        assert mx.max(mx.abs(out.astype(mx.float32) - want)).item() < 8e-3
        assert mx.max(mx.abs(out.astype(mx.float32) - ref)).item() < 1e-2


@gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_in_place_append_matches_mlx_writes(dtype, monkeypatch):
    """Steady decode steps code the token straight into the buffers (encode INPLACE) and
    attention reads them live (decode LIVE). Across a buffer growth, a trim and a deep
    copy, every step's attention must equal the reference on the settled views, and the
    buffers must hold exactly the codes of a twin cache written through MLX only."""
    import copy
    from mlx_lm_turbo.attention import reference_attention
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(planning, "USE_MMA", True)
    c, _, _ = _filled_cache("mse", 3, "mse", 3, Hkv=2, S=250, D=128)
    twin = copy.deepcopy(c)
    twin._write_in_place = lambda *a: None     # MLX writes only
    live_steps = 0
    for step in range(12):                     # 250 + 12 tokens: grows at 256
        if step == 9:
            c.trim(2), twin.trim(2)
        k1 = (mx.random.normal((1, 2, 1, 128)) * 3).astype(dtype)
        v1 = mx.random.normal((1, 2, 1, 128)).astype(dtype)
        q = mx.random.normal((1, 8, 1, 128)).astype(dtype)
        for cache in (c, twin):
            keys, values = cache.update_and_fetch(k1, v1)
            live_steps += cache is c and "live" in keys
            out = fused_attention(q, keys, values, cache, 128 ** -0.5)
            assert out is not None
            ref = reference_attention(q, keys, values, cache, 128 ** -0.5)
            err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
            assert err < 1e-2, (step, err)
    assert live_steps >= 6
    (ka, va), (kb_, vb_) = c.keys_and_values(), twin.keys_and_values()
    for got, want in ((ka, kb_), (va, vb_)):
        for name in want:
            assert mx.array_equal(got[name], want[name]).item(), name
    # A deep copy: each side's next steps land in its own buffers only.
    other = copy.deepcopy(c)
    for cache, scale in ((c, 1.0), (other, -1.0), (c, 2.0), (other, -2.0)):
        k1 = (mx.random.normal((1, 2, 1, 128)) * scale).astype(dtype)
        keys, values = cache.update_and_fetch(k1, k1)
        fused_attention(q, keys, values, cache, 128 ** -0.5)
        want = cache.key_codec.encode(k1)
        got = {n: a[:, :, -1:] for n, a in cache.keys_and_values()[0].items()}
        assert encode.compare(cache.key_codec, got, want)[0]
    assert c.offset == other.offset


@gpu
def test_in_place_generation_equals_slice_writes(monkeypatch):
    """mlx-lm's own decode loop on a small random llama (head dim 128, GQA 2:1, bf16),
    3-bit caches, a 240-token prompt and 40 greedy tokens (the buffers grow at 256):
    with the token coded by the attention launch (the default), and with the in-place
    append in a launch of its own, every token and log-probability equals those of the
    same caches written through MLX slice writes."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models import cache as mlx_cache
    from mlx_lm.models import llama
    from mlx_lm_turbo import patch
    from mlx_lm_turbo.cache import TurboConfig
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(decode, "APPEND", True)
    args = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2,
                           intermediate_size=512, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=512, num_key_value_heads=2, head_dim=128)
    mx.random.seed(3)
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, 512, (240,))
    patch.apply()
    # the default key statistics: the pending key is handed to the launch centred and scaled
    patch.set_config(TurboConfig("turboquant_mse", 3))
    calls = []
    positions = encode.positions      # every in-place append asks for its positions

    def counted(prev, n):
        calls[-1] += 1
        return positions(prev, n)
    monkeypatch.setattr(encode, "positions", counted)
    writer = encode.write_pair_in_place
    try:
        runs = []
        for append, write in (("1", writer), ("0", writer), ("0", lambda *a: None)):
            monkeypatch.setattr(decode, "APPEND", append == "1")
            monkeypatch.setattr(encode, "write_pair_in_place", write)
            calls.append(0)
            cache = mlx_cache.make_prompt_cache(model)
            steps = generate_step(prompt, model, prompt_cache=cache)
            runs.append([(int(y), lp) for (y, lp), _ in zip(steps, range(40))])
            if append == "1":
                appended = [k for k, ok in decode._checked.items() if k[-1] == "append"]
                assert appended and all(decode._checked[k] for k in appended)
    finally:
        patch.set_config(None)
    # both layers, from the third step on (not at 256); none with slice writes
    assert calls[0] >= 2 * 30 and calls[1] >= 2 * 30 and calls[2] == 0
    for run in runs[:2]:
        assert [y for y, _ in run] == [y for y, _ in runs[2]]
        for (_, a), (_, b) in zip(run, runs[2]):
            assert mx.array_equal(a, b).item()

@gpu
@pytest.mark.parametrize("kb,vb,D,Hq,Hkv,L,S", [(3, 3, 128, 32, 8, 1, 4133),
                                                (2, 4, 128, 24, 8, 2, 999),
                                                (4, 4, 64, 8, 1, 1, 20000),
                                                (5, 3, 128, 24, 8, 1, 33000)])
def test_mma_and_scalar_kernels_agree(kb, vb, D, Hq, Hkv, L, S, monkeypatch):
    c, keys, values = _filled_cache("mse", kb, "mse", vb, Hkv=Hkv, S=S, D=D)
    q = mx.random.normal((1, Hq, L, D)).astype(mx.bfloat16)
    mask = "causal" if L > 1 else None
    outs = []
    for use_mma in (True, False):
        monkeypatch.setattr(planning, "USE_MMA", use_mma)
        p = planning.plan(q, keys, values, c, mask, None, check.backend())
        assert (p["MMA"] is None) == (not use_mma)
        outs.append(decode.run_fused(q, keys, values, c, D ** -0.5, mask, p,
                                     check.backend()).astype(mx.float32))
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask).astype(mx.float32)
    for out in outs:
        assert mx.max(mx.abs(out - ref)).item() < 5e-3


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
    import emulate
    monkeypatch.setattr(planning, "TARGET_BLOCKS", blocks)
    monkeypatch.setattr(planning, "USE_MMA", False)   # the scalar kernel (the mma one: below)
    c, keys, values = _filled_cache(km, kb, vm, vb, Hkv=Hkv, S=S, D=D, seed=S)
    q = mx.random.normal((1, Hq, L, D)).astype(mx.float16)
    if mask == "bool":
        mask = mx.random.uniform(shape=(1, 1, L, S)) > 0.3
    elif mask == "additive":
        mask = mx.random.normal((1, Hq, L, S))
    p = planning.plan(q, keys, values, c, mask, None, "cuda")
    assert p is not None
    out = emulate.run_fused_emulated(q, keys, values, c, D ** -0.5, mask, p,
                                     full=(c.keys, c.values))
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 2e-3, err


def _mma_emulated_error(q, keys, values, c, mask) -> float:
    """Max abs difference between the emulated mma kernel (which the plan must choose) and
    the reference attention on the same packed cache."""
    import emulate
    scale = q.shape[-1] ** -0.5
    p = planning.plan(q, keys, values, c, mask, None, "cuda")
    assert p["MMA"] is not None
    out = emulate.run_fused_emulated(q, keys, values, c, scale, mask, p,
                                     full=(c.keys, c.values))
    ref = reference_attention(q, keys, values, c, scale, mask)
    return mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()


@emu
@pytest.mark.parametrize("kb,vb,D,Hq,Hkv,L,S,mask,blocks,dtype", [
    (3, 3, 128, 8, 2, 1, 517, None, 528, mx.float16),
    (2, 4, 64, 4, 4, 4, 300, "causal", 528, mx.float16),     # GQA 1, L = 4
    (4, 2, 128, 8, 1, 1, 1000, None, 2, mx.bfloat16),       # 8 rows; many sub-tiles a warp
    (1, 1, 128, 2, 2, 3, 77, "causal", 528, mx.float32),    # one partial tile, 3 rows
    (3, 4, 128, 12, 4, 2, 1300, "causal", 7, mx.float16),   # GQA 3 x L 2 = 6 rows
    (2, 3, 64, 4, 2, 4, 1024, "causal", 2, mx.float16),     # last tile whole, causal keys
    (5, 3, 128, 12, 4, 1, 700, None, 28, mx.bfloat16),      # --kv-bits 4: 10-bit pairs
    (6, 4, 128, 8, 2, 2, 300, "causal", 528, mx.float16),   # --kv-bits 5
])
def test_emulated_mma_kernel_matches_reference(kb, vb, D, Hq, Hkv, L, S, mask, blocks, dtype,
                                               monkeypatch):
    """The matrix-unit kernel (fragments from pair tables, permuted dims, per-warp online
    softmax) against the reference; its fp16 fragments (rotated queries, P) bound the
    error at ~1e-3 of outputs of magnitude ~2."""
    monkeypatch.setattr(planning, "TARGET_BLOCKS", blocks)
    c, keys, values = _filled_cache("mse", kb, "mse", vb, Hkv=Hkv, S=S, D=D, seed=S)
    q = (2 * mx.random.normal((1, Hq, L, D))).astype(dtype)
    err = _mma_emulated_error(q, keys, values, c, mask)
    assert err < (1e-2 if dtype == mx.bfloat16 else 3e-3), err   # bf16 ulp at 2: 7.8e-3


@emu
def test_emulated_mma_kernel_rising_scores(monkeypatch):
    """Scores that climb ~130 above the first sub-tile's in the odd rows only (the even
    rows' queries are zero): the lazy rescale must move those rows' running maxima as
    well (P = e^(s - m_run) past ~11 overflows its fp16 fragment)."""
    monkeypatch.setattr(planning, "TARGET_BLOCKS", 2)   # one split: 16 sub-tiles a warp
    D, S = 128, 1024
    mx.random.seed(5)
    c = TurboKVCache("turboquant_mse", 3, "turboquant_mse", 3, seed=5)
    direction = mx.random.normal((D,))
    ramp = mx.linspace(0.0, 1.0, S)[:, None]
    k = ramp * 6 * direction + 0.1 * mx.random.normal((1, 2, S, D))
    v = mx.random.normal((1, 2, S, D))
    keys, values = c.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    q = mx.concatenate([mx.zeros((1, 1, 1, D)), 2 * direction.reshape(1, 1, 1, D)], axis=1)
    q = mx.concatenate([q, q], axis=1).astype(mx.float16)   # heads 0, 2: zero; 1, 3: rising
    err = _mma_emulated_error(q, keys, values, c, None)
    assert err < 3e-3, err


@emu
@pytest.mark.parametrize("kb,vb,D,Hq,Hkv,L,S,blocks,dtype", [
    (3, 3, 128, 12, 4, 1, 1300, 28, mx.float16),   # GQA 3 (Llama-3.2-3B), 6 splits
    (2, 4, 64, 4, 4, 1, 300, 528, mx.float16),     # DV 64: 2 dims a lane
    (4, 2, 128, 8, 1, 1, 517, 2, mx.bfloat16),     # 8 rows, splits of several tiles
    (3, 3, 128, 2, 2, 3, 300, 528, mx.float32),    # 3 query rows, a partial last split
    (3, 3, 128, 3, 1, 1, 2700, 528, mx.bfloat16),  # 22 splits: two merge levels (16 + 6)
    (5, 3, 128, 12, 4, 1, 1300, 28, mx.bfloat16),  # 5-bit keys
])
def test_emulated_folded_decode_matches_reference(kb, vb, D, Hq, Hkv, L, S, blocks, dtype,
                                                  monkeypatch):
    """The steady step's one launch (mma kernel + the combine of MMA_FOLD_TAIL: the last
    block of each group of splits merges the group, the last of those merges the groups,
    applies the inverse rotation, writes the output) against the reference; every counter
    is back to zero for the next step."""
    import emulate
    monkeypatch.setattr(planning, "TARGET_BLOCKS", blocks)
    c, keys, values = _filled_cache("mse", kb, "mse", vb, Hkv=Hkv, S=S, D=D, seed=S)
    q = (2 * mx.random.normal((1, Hq, L, D))).astype(dtype)
    scale = D ** -0.5
    p = planning.plan(q, keys, values, c, None, None, "cuda")
    assert p["MMA"] is not None and planning.n_splits(S, Hkv) > 1
    out, cnt = emulate.run_folded_emulated(q, keys, values, c, scale, p,
                                           full=(c.keys, c.values))
    ref = reference_attention(q, keys, values, c, scale)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < (1e-2 if dtype == mx.bfloat16 else 3e-3), err
    nsp = planning.n_splits(S, Hkv)
    assert nsp > source.FOLD_GROUP or S < 2000   # (the last case runs both merge levels)
    assert cnt.size >= launchers.fold_counter_words(Hkv, nsp) and not cnt.any()


@emu
@pytest.mark.parametrize("kb,vb,Hq,Hkv,S,blocks,dtype,stats", [
    (3, 3, 12, 4, 1299, 28, mx.bfloat16, False),   # GQA 3, the token last of a 256-key split
    (4, 2, 8, 2, 384, 528, mx.float16, False),     # the token alone in its split (S = 3 * 128)
    (3, 3, 12, 4, 700, 28, mx.bfloat16, True),     # key statistics (the default)
    (5, 3, 12, 4, 700, 28, mx.bfloat16, True),     # --kv-bits 4 (K5/V3)
])
def test_emulated_appending_decode_codes_the_token(kb, vb, Hq, Hkv, S, blocks, dtype, stats,
                                                   monkeypatch):
    """The steady step's appending launch (src/mma_append.inc): the block holding the new
    token codes its key and value into the buffers, bit for bit as the codecs' encode,
    touching nothing else, and the output attends over it (against the reference on the
    buffers it leaves); the counters end at zero."""
    import emulate
    monkeypatch.setattr(planning, "TARGET_BLOCKS", blocks)
    c, keys, values = _filled_cache("mse", kb, "mse", vb, Hkv=Hkv, S=S, D=128, seed=S,
                                    stats=stats)
    knew = (3 * mx.random.normal((1, Hkv, 1, 128))).astype(dtype)
    if stats:   # the key as the cache hands it to the launch: (k - μ)/s
        knew = c._centred(c._scaled(knew))
    vnew = mx.random.normal((1, Hkv, 1, 128)).astype(dtype)
    q = (2 * mx.random.normal((1, Hq, 1, 128))).astype(dtype)
    scale = 128 ** -0.5
    p = planning.plan(q, keys, values, c, None, None, "cuda")
    assert p["MMA"] is not None and decode._appends(p, keys, c)
    live = decode.LiveBuffers(S + 1, mx.array([S, S + 1, 0, 0], mx.int32), None, None)
    out, kbuf, vbuf, cnt = emulate.run_appending_emulated(
        q, {**c.keys, "live": live}, {**c.values, "live": live}, c, scale, p, knew, vnew)
    for codec, got, old, x in ((c.key_codec, kbuf, c.keys, knew),
                               (c.value_codec, vbuf, c.values, vnew)):
        want = codec.encode(x)
        for name in want:
            assert mx.array_equal(got[name][:, :, S:S + 1], want[name]).item(), name
            for span in (slice(0, S), slice(S + 1, None)):
                assert mx.array_equal(got[name][:, :, span], old[name][:, :, span]).item()
    views = [{n: a[:, :, :S + 1] for n, a in b.items()} for b in (kbuf, vbuf)]
    ref = reference_attention(q, *views, c, scale)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < (1e-2 if dtype == mx.bfloat16 else 3e-3), err
    assert not cnt.any()


def test_plan_chooses_mma_kernel(monkeypatch):
    """mse keys at <= 6 bits and values at <= 4, <= 8 rows and whole-word key quarters: the mma
    kernel (short sequences too); otherwise, or with plan.USE_MMA off, the scalar one."""
    def rep(km, kb, vm, vb, D=128, Hq=8, Hkv=2, L=1, S=300):
        c, keys, values = _filled_cache(km, kb, vm, vb, Hkv=Hkv, S=S, D=D)
        q = mx.zeros((1, Hq, L, D), mx.float16)
        return planning.plan(q, keys, values, c, "causal" if L > 1 else None, None, "cuda")["MMA"]
    assert rep("mse", 3, "mse", 3) == 5
    assert rep("mse", 3, "mse", 3, S=128) == 5
    assert rep("mse", 4, "mse", 4) == 4                # 256-entry pair tables: 16 copies
    cuda = planning.SHARED_BUDGET["cuda"]                # tables aligned to their size (TALIGN)
    assert planning.mma_aligned(5, 128, 128, 3, 3, cuda)
    assert not planning.mma_aligned(4, 128, 128, 4, 4, cuda)
    assert rep("mse", 3, "mse", 3, D=64) is None       # a 48-bit key quarter
    assert rep("mse", 2, "mse", 3, D=64) is not None
    assert rep("mse", 5, "mse", 3) == 3                # 1024-entry key tables: 8 copies
    assert rep("rvq", 2, "mse", 3) is None
    assert rep("mse", 3, "mse", 3, Hq=8, Hkv=2, L=3) is None   # 12 rows
    monkeypatch.setattr(planning, "USE_MMA", False)
    assert rep("mse", 3, "mse", 3) is None


@emu
@pytest.mark.parametrize("DV,nsp,rotv", [(64, 700, 0), (128, 3, 1), (256, 33, 1), (32, 9, 1)])
def test_emulated_combine_matches_numpy(DV, nsp, rotv):
    """The combine kernel alone on random partials, some splits fully masked (m = -inf),
    more splits than threads for DV=64, a padding row (GQ < RB) left unwritten:
    sum_s e^(m_s-M) o_s / sum_s e^(m_s-M) l_s, then (rotv) Hadamard x signs / sqrt(DV)."""
    import emulate
    rng = np.random.default_rng(DV)
    B, H, NRG, RB, GQ = 1, 2, 1, 3, 2
    o = rng.standard_normal((B, H, NRG, nsp, RB, DV)).astype(np.float32)
    m = rng.standard_normal((B, H, NRG, nsp, RB)).astype(np.float32) * 3
    m[..., ::3, :] = -np.inf
    o[..., ::3, :, :] = 0.0   # what a fully masked split writes
    lsum = rng.uniform(0.5, 2.0, (B, H, NRG, nsp, RB)).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], DV).astype(np.float32)
    vmul = (signs / np.sqrt(DV)).astype(np.float32) if rotv else np.ones(DV, np.float32)
    sg = launchers.reduce_groups(DV)
    tpl = [("RB", RB), ("DV", DV), ("GQ", GQ), ("QL", 1), ("ROTV", rotv), ("OT", "float"),
           ("SG", sg)]
    run = emulate.compile_kernel(source.body("reduce"), build.REDUCE_INPUTS, [np.float32] * 4,
                                 build.REDUCE_OUTPUTS, tpl)
    out = np.full((B, H * GQ, 1, DV), 7.0, np.float32)
    run([(a, list(a.shape), [s // 4 for s in a.strides]) for a in (o, m, lsum, vmul)],
        [out], (B * H * NRG * RB, 1), DV * sg)
    w = np.exp(m - m.max(axis=3, keepdims=True))
    want = (w[..., None] * o).sum(3) / (w * lsum).sum(3)[..., None]   # (B, H, NRG, RB, DV)
    want = want[:, :, 0, :GQ]
    if rotv:   # MLX's own transform (unnormalised): the kernel must use its order
        want = np.array(mx.hadamard_transform(mx.array(want), scale=1.0)) * vmul
    np.testing.assert_allclose(out.reshape(B, H, GQ, DV), want, rtol=1e-5, atol=2e-6)


def _kernel_fails_to_compile(monkeypatch, module, launcher: str) -> list:
    """Fake a GPU backend with nothing checked yet, and make ``module.launcher`` raise
    like a failed JIT compile; returns the list its calls are counted in."""
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(module, "_checked", {})
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("nvrtc: compile failed")
    monkeypatch.setattr(module, launcher, broken)
    return calls


def test_first_use_check_warns_once_and_falls_back(monkeypatch):
    c, keys, values = _filled_cache("mse", 3, "mse", 3)   # filled on the CPU path
    calls = _kernel_fails_to_compile(monkeypatch, decode, "run_fused")
    q = mx.random.normal((1, 4, 1, 64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fused_attention(q, keys, values, c, 0.125) is None
        assert fused_attention(q, keys, values, c, 0.125) is None
    assert len(w) == 1 and "compile failed" in str(w[0].message)
    assert len(calls) == 1


def test_failed_matrix_unit_kernel_falls_back_to_the_scalar_one(monkeypatch):
    """A shape whose matrix-unit kernel fails its first-use check goes to the scalar
    kernel (checked in turn) from the next call on, not to the reference."""
    c, keys, values = _filled_cache("mse", 2, "mse", 3)   # whole-word key quarters at D 64
    q = mx.random.normal((1, 4, 1, 64))
    assert planning.plan(q, keys, values, c, None, None, "cuda")["MMA"] is not None
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "_checked", {})
    plans = []

    def run_fused(q, keys, values, c, scale, mask, p, be):
        plans.append(p["MMA"])
        if p["MMA"] is not None:
            raise RuntimeError("nvrtc: compile failed")
        return reference_attention(q, keys, values, c, scale, mask)
    monkeypatch.setattr(decode, "run_fused", run_fused)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fused_attention(q, keys, values, c, 0.125) is None
        for _ in range(2):
            assert fused_attention(q, keys, values, c, 0.125) is not None
    assert len(w) == 1 and "compile failed" in str(w[0].message)
    assert plans[0] is not None and plans[1:] == [None, None]


def test_first_use_check_rejects_wrong_output(monkeypatch):
    c, keys, values = _filled_cache("mse", 3, "mse", 3)   # filled on the CPU path
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "_checked", {})
    monkeypatch.setattr(decode, "run_fused", lambda q, *a, **k: mx.zeros(q.shape, q.dtype) + 1)
    q = mx.random.normal((1, 4, 1, 64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fused_attention(q, keys, values, c, 0.125) is None
    assert len(w) == 1 and "disabled" in str(w[0].message)
    monkeypatch.setattr(check, "MODE", True)
    with pytest.raises(RuntimeError):
        fused_attention(q, keys, values, c, 0.125)


# ----------------------------------------------------------------- fused encode

def _codec(km, kb, D, seed=1):
    return codecs.make(km, kb, D, seed=seed)


def _encode_template(km, kb, D, x_dtype, pair=1, inplace=0):
    """Encode-kernel template constants as encode.launch_args sets them."""
    return [("D", D), ("BITS", kb), ("W", (D * kb + 31) // 32),
            ("MODE", encode.MODES[codecs.canonical_name(km)]), ("NORMT", "float16"),
            ("XT", x_dtype), ("PAIR", pair), ("INPLACE", inplace)]


@pytest.mark.parametrize("km,kb,D,x_dtype,inplace", [("mse", 3, 128, "float16", 0),
                                                     ("rvq", 2, 64, "bfloat16", 0),
                                                     ("mse", 8, 256, "float32", 0),
                                                     ("rvq", 3, 128, "float16", 1)])
def test_encode_metal_source_parses(km, kb, D, x_dtype, inplace, tmp_path):
    tpl = _encode_template(km, kb, D, x_dtype, inplace=inplace)
    assert_metal_parses(render_metal(tpl, "encode_inplace" if inplace else "encode", x_dtype),
                        tmp_path / "encode_metal.cpp")


@pytest.mark.parametrize("inplace", [0, 1])
def test_encode_cuda_source_compiles(inplace, tmp_path):
    # rvq with bf16 input: the mse branch is compiled too (MODE is a constant, not #if).
    name = "encode_inplace" if inplace else "encode"
    assert_cuda_compiles(render_cuda(_encode_template("rvq", 3, 128, "bfloat16",
                                                      inplace=inplace), name, "bfloat16"),
                         tmp_path / f"{name}.cu", ptx=True)


# The encode body run by the C++ thread emulation against the codec's MLX encode, under the
# first-use rule (encode.compare). L=5 cases hand over a transposed (B, L, H, D) view (the
# strides path), contain an all-zero vector, and run 3 blocks for 10 vectors (grid-stride).
ENCODE_CASES = [(km, kb, D) for km, kb in (("mse", 2), ("mse", 3), ("mse", 4), ("rvq", 1),
                                           ("rvq", 2)) for D in (64, 128)] + [("mse", 3, 256)]


@emu
@pytest.mark.parametrize("km,kb,D", ENCODE_CASES)
@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_emulated_encode_matches_codec(km, kb, D, L, dtype, monkeypatch):
    import emulate
    c = _codec(km, kb, D, seed=D + kb)
    mx.random.seed(D * 10 + L)
    B, H = 1, 2
    if L == 1:
        x = (3 * mx.random.normal((B, H, L, D))).astype(dtype)
        base = axes = None
    else:
        monkeypatch.setattr(encode, "MAX_BLOCKS", 3)
        base = (3 * mx.random.normal((B, L, H, D))).astype(dtype)
        base[:, 2, 1] = 0.0
        axes = (0, 2, 1, 3)
        x = base.transpose(axes)
    out = emulate.run_encode_emulated(c, x, base, axes)
    ref = c.encode(x)
    ok, why = encode.compare(c, out, ref)
    assert ok, why
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype, k


def test_token_left_to_attention_is_written_by_any_other_reader(monkeypatch):
    """Where the steady attention launch codes the decode step's token itself,
    update_and_fetch leaves it pending (nothing written yet); whatever reads the buffers
    otherwise (settling the live dicts, the next update, keys_and_values) writes it
    first, so the cache ends equal to a twin written through MLX only."""
    c, _, _ = _filled_cache("mse", 3, "mse", 3, Hkv=2, S=250, D=128)
    twin, _, _ = _filled_cache("mse", 3, "mse", 3, Hkv=2, S=250, D=128)
    monkeypatch.setitem(decode._checked, ("test", "append"), True)
    c._fused_steady = decode.SteadyStep(None, None, ("test", "live"), ("test", "append"), None)
    steps = [[mx.random.normal((1, 2, 1, 128)).astype(mx.float16) for _ in range(2)]
             for _ in range(3)]
    keys, values = c.update_and_fetch(*steps[0])
    assert c._pending is not None and c.offset == 251 and keys["live"].held == 251
    assert not c.keys["codes"][:, :, 250].any().item()        # not written yet
    got = kernels.settle(keys)
    twin.update_and_fetch(*steps[0])
    want = twin.keys_and_values()[0]
    assert c._pending is None and got["codes"].shape[2] == 251
    assert all(mx.array_equal(got[n], want[n]).item() for n in want)
    c.update_and_fetch(*steps[1])
    c.update_and_fetch(*steps[2])    # (the step before never reached attention)
    for k, v in steps[1:]:
        twin.update_and_fetch(k, v)
    for a, b in zip(c.keys_and_values(), twin.keys_and_values()):
        assert all(mx.array_equal(a[n], b[n]).item() for n in b)
    assert c._pending is None and c.offset == twin.offset == 253


def test_positions_follow_the_decode_steps(monkeypatch):
    """A step's positions are [prev, prev + n, 0, 0]: made from host data at a fresh
    start, derived on the GPU from the step before when the steps follow each other."""
    monkeypatch.setattr(encode, "_pos_memo", [None, None])
    monkeypatch.setattr(encode, "_pos_step", {})
    made = []
    device_int4 = encode._device_int4
    monkeypatch.setattr(encode, "_device_int4", lambda v: made.append(v) or device_int4(v))
    steps = [(10, 1), (10, 1), (11, 1), (12, 1), (5, 1), (6, 2), (8, 2), (8, 2), (11, 2)]
    for prev, n in steps:
        pos = encode.positions(prev, n)
        assert pos.dtype == mx.int32 and pos.tolist() == [prev, prev + n, 0, 0]
    # fresh: 10, 5 (a trim), 6 (another n), 11 (a gap); increments for n = 1 and 2
    assert [v[:2] for v in made] == [[10, 11], [1, 1], [5, 6], [6, 8], [2, 2], [11, 13]]


@emu
@pytest.mark.parametrize("km,kb,D", [("mse", 3, 64), ("rvq", 2, 128)])
def test_emulated_in_place_encode_writes_only_its_tokens(km, kb, D, monkeypatch):
    """INPLACE: K and V coded straight into tokens prev..prev+1 of (B=2) cache buffers:
    those hold the codecs' codes, every other word is untouched."""
    import emulate
    monkeypatch.setattr(encode, "MAX_BLOCKS", 3)
    kc, vc = _codec(km, kb, D, seed=1), _codec(km, kb, D, seed=2)
    mx.random.seed(11)
    k = (3 * mx.random.normal((2, 2, 2, D))).astype(mx.float16)
    v = mx.random.normal((2, 2, 2, D)).astype(mx.float16)
    old_k = kc.encode(mx.random.normal((2, 2, 9, D)))
    old_v = vc.encode(mx.random.normal((2, 2, 9, D)))
    prev = 5
    new_k, new_v = emulate.run_encode_in_place_emulated(kc, vc, k, v, old_k, old_v, prev)
    for codec, new, old, x in ((kc, new_k, old_k, k), (vc, new_v, old_v, v)):
        ok, why = encode.compare(codec, {n: a[:, :, prev:prev + 2] for n, a in new.items()},
                                 codec.encode(x))
        assert ok, why
        for n in old:
            keep = mx.concatenate([old[n][:, :, :prev], old[n][:, :, prev + 2:]], axis=2)
            got = mx.concatenate([new[n][:, :, :prev], new[n][:, :, prev + 2:]], axis=2)
            assert mx.array_equal(keep, got).item(), n


@emu
@pytest.mark.parametrize("km,kb,D", [("mse", 3, 64), ("rvq", 2, 128)])
def test_emulated_pair_encode_matches_codecs(km, kb, D, monkeypatch):
    """K and V in one launch (PAIR): each half of the grid codes its own tensor with its
    own codec (different rotation signs), through strides (K a transposed view), 3 blocks
    per tensor for 10 vectors each."""
    import emulate
    monkeypatch.setattr(encode, "MAX_BLOCKS", 3)
    kc, vc = _codec(km, kb, D, seed=1), _codec(km, kb, D, seed=2)
    mx.random.seed(7)
    base = (3 * mx.random.normal((1, 5, 2, D))).astype(mx.float16)
    k = base.transpose(0, 2, 1, 3)
    v = (3 * mx.random.normal((1, 2, 5, D))).astype(mx.float16)
    out_k, out_v = emulate.run_encode_emulated(kc, k, base, (0, 2, 1, 3), vc, v)
    for codec, out, x in ((kc, out_k, k), (vc, out_v, v)):
        ok, why = encode.compare(codec, out, codec.encode(x))
        assert ok, why
    # swapping the codecs breaks it: each half really uses its own table
    swapped = emulate.run_encode_emulated(vc, k, base, (0, 2, 1, 3), kc, v)[0]
    assert not encode.compare(kc, swapped, kc.encode(k))[0]


def test_encode_pair_applies_to_matching_codecs_only(monkeypatch):
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    calls = []
    monkeypatch.setattr(encode, "run_pair_kernel", lambda *a: calls.append(a) or ("k", "v"))
    monkeypatch.setattr(encode, "_checked", {("cuda", "turboquant_mse", 3, 64, "mlx.core.float16",
                                              "pair"): True})
    x = mx.zeros((1, 2, 1, 64), mx.float16)
    assert encode.encode_pair(_codec("mse", 3, 64, 1), _codec("mse", 3, 64, 2), x, x) == ("k", "v")
    assert encode.encode_pair(_codec("mse", 3, 64), _codec("mse", 2, 64), x, x) is None
    assert encode.encode_pair(_codec("mse", 3, 64), _codec("rvq", 3, 64), x, x) is None
    assert encode.encode_pair(_codec("mse", 3, 64), _codec("mse", 3, 64), x,
                              x.astype(mx.float32)) is None
    assert len(calls) == 1


def test_encode_compare_rule():
    """The first-use rule accepts rare ±1 ties and rejects what a faulty kernel produces."""
    from mlx_lm_turbo.packing import pack, unpack
    c = _codec("mse", 3, 64)
    mx.random.seed(0)
    x = mx.random.normal((1, 4, 8, 64))
    ref = c.encode(x)
    idx = unpack(ref["codes"], 3, 64)

    def with_codes(new_idx, norm=None):
        return {"codes": pack(new_idx, 3), "norm": ref["norm"] if norm is None else norm}

    def bump(i, by):  # move code i of vector 0 by `by` levels (kept in range)
        flat = idx.reshape(-1, 64)
        v = flat[0, i].item()
        to = v + by if 0 <= v + by < 8 else v - by
        flat = mx.concatenate([flat[:1, :i], mx.array([[to]], mx.uint32), flat[:1, i + 1:]], 1)
        return mx.concatenate([flat, idx.reshape(-1, 64)[1:]]).reshape(idx.shape)

    assert encode.compare(c, ref, ref)[0]
    assert encode.compare(c, with_codes(bump(5, 1)), ref)[0]            # one tie
    assert not encode.compare(c, with_codes(bump(5, 2)), ref)[0]        # two levels off
    assert not encode.compare(c, with_codes((idx + 1) % 8), ref)[0]     # every code off
    assert not encode.compare(c, with_codes(idx, ref["norm"] * 1.01), ref)[0]
    assert not encode.compare(c, {"codes": ref["codes"], "norm": ref["norm"].astype(mx.float32)},
                              ref)[0]
    cr = _codec("rvq", 2, 64)
    rr = cr.encode(x)
    i1, i2 = unpack(rr["codes1"], 2, 64), unpack(rr["codes2"], 2, 64)
    assert not encode.compare(cr, {**rr, "codes2": pack(3 - i2, 2)}, rr)[0]
    assert not encode.compare(cr, {**rr, "codes1": pack(3 - i1, 2)}, rr)[0]


def test_encode_dispatcher_returns_none_on_cpu(monkeypatch):
    monkeypatch.setattr(check, "MODE", None)
    c = _codec("mse", 3, 64)
    x = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    if check.backend() is None:
        assert encode.encode(c, x) is None
    monkeypatch.setattr(check, "MODE", False)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    assert encode.encode(c, x) is None


def test_encode_supported():
    x64 = mx.zeros((1, 2, 1, 64))
    assert encode.supported(_codec("mse", 3, 64), x64)
    assert encode.supported(_codec("rvq", 4, 64), x64.astype(mx.bfloat16))
    assert not encode.supported(_codec("prod", 3, 64), x64)
    assert not encode.supported(_codec("polar", 3, 64), x64)
    assert not encode.supported(_codec("mse", 3, 96), mx.zeros((1, 2, 1, 96)))   # dense rotation
    assert not encode.supported(_codec("mse", 3, 16), mx.zeros((1, 2, 1, 16)))   # < one warp
    assert not encode.supported(_codec("mse", 3, 64), mx.zeros((1, 2, 0, 64)))
    assert not encode.supported(_codec("mse", 3, 64), x64.astype(mx.int32))


def test_encode_env_forces_kernel_raises_without_gpu(monkeypatch):
    if check.backend() is not None:
        pytest.skip("a GPU backend is active")
    monkeypatch.setattr(check, "MODE", True)
    with pytest.raises(RuntimeError):
        encode.encode(_codec("mse", 3, 64), mx.zeros((1, 2, 1, 64)))


def test_encode_first_use_check_warns_once_and_falls_back(monkeypatch):
    calls = _kernel_fails_to_compile(monkeypatch, encode, "run_kernel")
    pair_calls = _kernel_fails_to_compile(monkeypatch, encode, "run_pair_kernel")
    k = mx.random.normal((1, 2, 3, 64)).astype(mx.float16)
    ref = TurboKVCache("mse", 3, "mse", 3)
    monkeypatch.setattr(check, "MODE", False)
    want = ref.update_and_fetch(k, k)
    monkeypatch.setattr(check, "MODE", None)
    c = TurboKVCache("mse", 3, "mse", 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = c.update_and_fetch(k, k)
        c.update_and_fetch(k, k)
    # one warning per launch form (K and V together, then one tensor), each checked once
    assert len(w) == 2 and all("compile failed" in str(m.message) for m in w)
    assert "K and V in one launch" in str(w[0].message)
    assert len(pair_calls) == 1
    assert len(calls) == 1  # keys and values share (method, bits, dim, dtype): one check
    for a, b in zip(got, want):
        for name in b:
            assert mx.array_equal(a[name], b[name]).item(), name
    monkeypatch.setattr(check, "MODE", True)
    with pytest.raises(RuntimeError):
        c.update_and_fetch(k, k)


def test_encode_first_use_check_rejects_wrong_output(monkeypatch):
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(encode, "_checked", {})
    c = _codec("rvq", 2, 64)

    def wrong(codec, x, be):  # stages swapped: what a mixed-up output order would give
        p = codec.encode(x)
        return {**p, "codes1": p["codes2"], "codes2": p["codes1"]}
    monkeypatch.setattr(encode, "run_kernel", wrong)
    x = mx.random.normal((1, 2, 4, 64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert encode.encode(c, x) is None
        assert encode.encode(c, x) is None
    assert len(w) == 1 and "disabled" in str(w[0].message)


def _append_kernel_then_codec(monkeypatch, methods: tuple, dtype) -> None:
    """Append 4 tokens then 2 single ones to a cache with the kernels on (as patched by
    the caller) and to one with MLX_LM_TURBO_KERNELS=0; their buffers must agree."""
    mx.random.seed(3)
    k = mx.random.normal((1, 2, 6, 64)).astype(dtype)
    v = mx.random.normal((1, 2, 6, 64)).astype(dtype)
    caches = [TurboKVCache(*methods, layer=1) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, c in enumerate(caches):
            if i == 1:
                monkeypatch.setattr(check, "MODE", False)
            c.update_and_fetch(k[:, :, :4], v[:, :, :4])
            for t in (4, 5):
                c.update_and_fetch(k[:, :, t:t + 1], v[:, :, t:t + 1])
    (gk, gv), (rk, rv) = caches[0].keys_and_values(), caches[1].keys_and_values()
    for got, ref, codec in ((gk, rk, caches[0].key_codec), (gv, rv, caches[0].value_codec)):
        ok, why = encode.compare(codec, got, ref)
        assert ok, why


@emu
def test_cache_append_through_emulated_kernel(monkeypatch):
    """The cache hook end to end: with the kernel (emulated) taking the append, the
    buffers equal the codec path's, prefill then single tokens."""
    import emulate
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(encode, "_checked", {})
    used = []

    def emulated(codec, x, be):
        used.append(codec.METHOD)
        return emulate.run_encode_emulated(codec, x)
    monkeypatch.setattr(encode, "run_kernel", emulated)
    _append_kernel_then_codec(monkeypatch, ("rvq", 1, "mse", 2), mx.bfloat16)
    assert len(used) == 6 and set(used) == {"turboquant_rvq", "turboquant_mse"}


@emu
def test_cache_append_through_emulated_pair_kernel(monkeypatch):
    """Matching K/V codecs: the cache appends through the one-launch pair (emulated),
    prefill then single tokens, and its buffers equal the codec path's."""
    import emulate
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(encode, "_checked", {})
    used = []

    def emulated(kc, vc, k, v, be):
        used.append(k.shape[2])
        return emulate.run_encode_emulated(kc, k, codec2=vc, x2=v)
    monkeypatch.setattr(encode, "run_pair_kernel", emulated)
    monkeypatch.setattr(encode, "run_kernel", lambda *a: pytest.fail("one-tensor launch"))
    _append_kernel_then_codec(monkeypatch, ("mse", 3, "mse", 3), mx.float16)
    assert used == [4, 1, 1]


@gpu
@pytest.mark.parametrize("km,kb,D", [("mse", 2, 64), ("mse", 3, 128), ("mse", 4, 256),
                                     ("rvq", 1, 128), ("rvq", 2, 64)])
@pytest.mark.parametrize("L,dtype", [(1, mx.float16), (1, mx.bfloat16), (37, mx.float32)])
def test_encode_kernel_matches_codec(km, kb, D, L, dtype):
    c = _codec(km, kb, D)
    x = mx.random.normal((1, L, 8, D)).astype(dtype).transpose(0, 2, 1, 3)
    out = encode.run_kernel(c, x, check.backend())
    ok, why = encode.compare(c, out, c.encode(x))
    assert ok, why


@gpu
@pytest.mark.parametrize("km,kb,D", [("mse", 3, 128), ("rvq", 2, 64)])
@pytest.mark.parametrize("L,dtype", [(1, mx.bfloat16), (37, mx.float16)])
def test_pair_encode_kernel_matches_codecs(km, kb, D, L, dtype):
    kc, vc = _codec(km, kb, D, seed=3), _codec(km, kb, D, seed=4)
    k = mx.random.normal((1, L, 8, D)).astype(dtype).transpose(0, 2, 1, 3)
    v = mx.random.normal((1, 8, L, D)).astype(dtype)
    out_k, out_v = encode.run_pair_kernel(kc, vc, k, v, check.backend())
    for codec, out, x in ((kc, out_k, k), (vc, out_v, v)):
        ok, why = encode.compare(codec, out, codec.encode(x))
        assert ok, why


# ----------------------------------------------------------------- fp16 window

def _window_template():
    """A windowed decode (mse3/rvq-free, d=128, RB=4, W=64, bf16 copies, centred keys)."""
    return _template(3, 0, 0, 3, 0, 128, 128, 4, win=64, wdtype="bfloat16")


def test_window_metal_source_parses(tmp_path):
    assert_metal_parses(render_metal(_window_template(), "decode", "bfloat16"),
                        tmp_path / "decode_window_metal.cpp")


def test_window_cuda_source_compiles(tmp_path):
    assert_cuda_compiles(render_cuda(_window_template(), "decode", "bfloat16"),
                         tmp_path / "decode_window.cu", ptx=True)


def _windowed_cache(km, kb, vm, vb, Hq, Hkv, L, S, D, W, trim=0, center=False,
                    dtype=mx.float16, seed=0):
    """A cache with an fp16 window after S - L tokens (and ``trim`` more, trimmed off:
    the copies of the trimmed tokens go, so fewer than W remain), then a block of L:
    (cache, keys, values, queries) as attention sees them for that block."""
    mx.random.seed(seed)
    c = TurboKVCache(km, kb, vm, vb, seed=seed, center_keys=center, fp16_window=W)
    shift = 3.0 if center else 0.0  # a key mean for the centring to remove
    k = (mx.random.normal((1, Hkv, S + trim, D)) + shift).astype(dtype)
    v = mx.random.normal((1, Hkv, S + trim, D)).astype(dtype)
    c.update_and_fetch(k[:, :, :S + trim - L], v[:, :, :S + trim - L])
    if trim:
        c.trim(trim)
    keys, values = c.update_and_fetch(k[:, :, S - L:S], v[:, :, S - L:S])
    assert c.offset == S and "recent" in keys
    q = mx.random.normal((1, Hq, L, D)).astype(dtype)
    return c, keys, values, q


def _without_window(packed: dict) -> dict:
    return {k: v for k, v in packed.items() if k != "recent"}


# The window block (copies instead of codes, per-row cut between codes and copies) run by
# the emulation against reference_attention, which applies attention._with_window's rule.
# n = copies handed over: W (decode), S (window > sequence: no codes read, 2 tiles of
# copies), < W (after a trim), W-1+L (a block: later rows read codes inside the span).
@emu
@pytest.mark.parametrize("km,kb,vm,vb,D,Hq,Hkv,L,S,W,trim,center,dtype,blocks", [
    ("mse", 3, "mse", 3, 64, 8, 2, 1, 300, 16, 0, False, mx.float16, 528),    # GQA 4, n = W
    ("rvq", 1, "mse", 2, 128, 2, 2, 1, 150, 200, 0, False, mx.float16, 528),  # GQA 1, W > S
    ("mse", 3, "mse", 3, 128, 2, 2, 1, 300, 32, 10, False, mx.float16, 528),  # n < W (trim)
    ("rvq", 2, "mse", 3, 64, 8, 2, 1, 300, 16, 0, True, mx.bfloat16, 4),      # centred, bf16
    ("mse", 3, "mse", 3, 64, 8, 2, 4, 300, 16, 0, False, mx.float16, 528),    # L=4, n = W+3
    ("rvq", 1, "mse", 2, 64, 2, 2, 3, 300, 16, 8, True, mx.float16, 3),       # L=3, n < W-1+L
    ("mse", 3, "mse", 3, 96, 8, 2, 2, 300, 16, 0, True, mx.float16, 528),     # dense rotations
])
def test_emulated_window_matches_reference(km, kb, vm, vb, D, Hq, Hkv, L, S, W, trim, center,
                                           dtype, blocks, monkeypatch):
    import emulate
    monkeypatch.setattr(planning, "TARGET_BLOCKS", blocks)
    c, keys, values, q = _windowed_cache(km, kb, vm, vb, Hq, Hkv, L, S, D, W, trim, center,
                                         dtype, seed=S + W + L)
    mask = "causal" if L > 1 else None
    p = planning.plan(q, keys, values, c, mask, None, "cuda")
    assert p is not None and p["WIN"] == W and p["NCOPY"] == keys["recent"].shape[2]
    out = emulate.run_fused_emulated(q, keys, values, c, D ** -0.5, mask, p,
                                     full=(c.keys, c.values))
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
    assert out.dtype == q.dtype
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < (4e-3 if dtype == mx.bfloat16 else 2e-3), err   # bf16: output rounding
    # The window matters here: ignoring it would fail the tolerance above.
    plain = reference_attention(q, _without_window(keys), _without_window(values), c,
                                D ** -0.5, mask)
    assert mx.max(mx.abs(plain.astype(mx.float32) - ref.astype(mx.float32))).item() > 1e-2


def test_plan_window():
    c, keys, values, q = _windowed_cache("mse", 3, "mse", 3, 4, 2, 1, 100, 64, 16)
    p = planning.plan(q, keys, values, c, None, None, "cuda")
    assert p["WIN"] == 16 and p["NCOPY"] == 16 and p["SC"] == 84 and p["WCTR"] == 0
    mask = mx.zeros((1, 1, 1, 100), mx.bool_)
    assert planning.plan(q, keys, values, c, mask, None, "cuda") is None   # array mask
    short = {**keys, "recent": keys["recent"][:, :, :0]}
    assert planning.plan(q, short, values, c, None, None, "cuda") is None  # n < L
    # The first-use check keys windowed shapes apart from plain ones.
    plain = planning.plan(q, _without_window(keys), _without_window(values), c, None, None,
                        "cuda")
    assert decode._shape_key(p, q, c, "cuda") != decode._shape_key(plain, q, c, "cuda")


def _dispatch_to_emulator(monkeypatch, field: str) -> list:
    """Fake a GPU backend with nothing checked yet and run the fused attention through the
    C++ emulation; returns the list each launch's plan[field] is appended to."""
    import emulate
    monkeypatch.setattr(check, "MODE", None)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "_checked", {})
    seen = []

    def emulated(q, keys, values, cache, scale, mask, p, be):
        seen.append(p[field])
        return emulate.run_fused_emulated(q, keys, values, cache, scale, mask, p)
    monkeypatch.setattr(decode, "run_fused", emulated)
    return seen


@emu
def test_window_dispatcher_checks_against_reference(monkeypatch):
    """decode_attention on a windowed cache: the first use compares with the reference
    (window included) and the kernel's output is returned; no warning."""
    c, keys, values, q = _windowed_cache("mse", 3, "mse", 3, 8, 2, 1, 300, 64, 16)
    runs = _dispatch_to_emulator(monkeypatch, "WIN")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fused_attention(q, keys, values, c, 0.125)
    assert runs == [16] and out is not None
    assert [k[-3:-1] for k, ok in decode._checked.items() if ok] == [(16, 0)]
    ref = reference_attention(q, keys, values, c, 0.125)
    assert mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item() < 2e-3


@gpu
@pytest.mark.parametrize("km,kb,vm,vb", [("mse", 3, "mse", 3), ("rvq", 1, "mse", 2)])
@pytest.mark.parametrize("D,Hq,Hkv,L,S,W,trim,center", [
    (128, 8, 2, 1, 1000, 64, 0, False), (64, 4, 4, 1, 150, 200, 0, False),
    (128, 8, 2, 1, 1000, 64, 20, True), (64, 8, 2, 4, 333, 16, 0, True)])
def test_fused_window_matches_reference(km, kb, vm, vb, D, Hq, Hkv, L, S, W, trim, center):
    c, keys, values, q = _windowed_cache(km, kb, vm, vb, Hq, Hkv, L, S, D, W, trim, center)
    mask = "causal" if L > 1 else None
    p = planning.plan(q, keys, values, c, mask, None, check.backend())
    assert p is not None
    out = decode.run_fused(q, keys, values, c, D ** -0.5, mask, p, check.backend())
    ref = reference_attention(q, keys, values, c, D ** -0.5, mask)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 5e-3, err



def test_encode_forced_returns_none_where_not_covered(monkeypatch):
    """MLX_LM_TURBO_KERNELS=1 with a GPU backend: codecs the encode kernel does not cover
    (prod keys, d=96) fall back to the codec's encode instead of raising, so forcing the
    decode kernels still works for such models; a covered codec runs the kernel."""
    monkeypatch.setattr(check, "MODE", True)
    monkeypatch.setattr(check, "backend", lambda: "cuda")
    monkeypatch.setattr(encode, "_checked", {})
    ran = []
    monkeypatch.setattr(encode, "run_kernel", lambda codec, x, be: ran.append(1) or codec.encode(x))
    assert encode.encode(_codec("prod", 3, 64), mx.zeros((1, 2, 1, 64))) is None
    assert encode.encode(_codec("mse", 3, 96), mx.zeros((1, 2, 1, 96))) is None
    assert not ran
    assert encode.encode(_codec("mse", 3, 64), mx.random.normal((1, 2, 1, 64))) is not None
    assert ran == [1]


@emu
def test_decode_steps_reuse_the_plan(monkeypatch):
    """Successive decode steps through the dispatcher (kernels emulated): the plan kept on
    the cache is refreshed with each step's length and arrays (outputs equal the
    reference at every step) and keeps no array (a kept view of a buffer would stop the
    next append from updating it in place)."""
    lengths = _dispatch_to_emulator(monkeypatch, "S")
    monkeypatch.setattr(encode, "encode", lambda codec, x: None)   # appends: the codecs'
    monkeypatch.setattr(encode, "encode_pair", lambda *a: None)
    mx.random.seed(5)
    c = TurboKVCache("mse", 3, "mse", 3)
    c.update_and_fetch(*(mx.random.normal((1, 2, 300, 64)).astype(mx.float16) for _ in "kv"))
    for step in range(3):
        kv = [mx.random.normal((1, 2, 1, 64)).astype(mx.float16) for _ in "kv"]
        keys, values = c.update_and_fetch(*kv)
        q = mx.random.normal((1, 8, 1, 64)).astype(mx.float16)
        out = fused_attention(q, keys, values, c, 0.125)
        ref = reference_attention(q, keys, values, c, 0.125)
        assert mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item() < 2e-3
    assert lengths == [301, 302, 303]
    assert not any(isinstance(v, mx.array) for v in c._fused_plan.plan.values())


@pytest.mark.parametrize("name", sorted(source.BODIES))
@pytest.mark.parametrize("backend_name", ["metal", "cuda"])
def test_every_kernel_source_assembles(name, backend_name):
    """Every body expands for both backends: no directive or parameter left, braces
    balanced, the prelude's indices in front."""
    header, src = build.full_source(source.body(name), backend_name, (("D", 64),),
                                    mma=name.startswith("decode_mma"))
    text = header + src
    assert "//@" not in text and "${" not in text
    assert text.count("{") == text.count("}") and text.count("(") == text.count(")")
    assert src.startswith("constexpr int D = 64;\nconst int kv_tid")


def test_kernel_sources_are_package_data():
    """pyproject.toml ships src/*.h and src/*.inc: every source file is one of those."""
    assert all(p.suffix in (".h", ".inc") for p in source.SRC.iterdir())
    assert {n for names in source.BODIES.values() for n in names} <= {
        p.name for p in source.SRC.iterdir()}


def test_directives_expand(tmp_path, monkeypatch):
    """//@include passes parameters down, //@if keeps one branch, ${key} is replaced and a
    missing key raises."""
    (tmp_path / "outer.inc").write_text(
        "a ${x}\n//@include inner.inc y=2 \"z=p + q\"\n//@if flag\nyes\n//@else\nno\n//@endif\n")
    (tmp_path / "inner.inc").write_text("b ${x} ${y} ${z}\n")
    monkeypatch.setattr(source, "SRC", tmp_path)
    source.read.cache_clear()
    try:
        assert source.render("outer.inc", {"x": "1", "flag": "0"}) == "a 1\nb 1 2 p + q\nno\n"
        assert source.render("outer.inc", {"x": "1", "flag": "1"}).endswith("yes\n")
        with pytest.raises(KeyError):
            source.render("inner.inc", {"x": "1"})
    finally:
        source.read.cache_clear()
