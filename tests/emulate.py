"""Run the kernel bodies on the CPU, for tests: a third backend header maps the macros to
C++ threads (one std::thread per GPU thread, std::barrier for the block barrier, a
per-warp barrier plus scratch for the SIMD reductions). Blocks run one after another, so
block-shared arrays can be ``static``. Slow, but it executes the very text the GPUs
compile, so layout, masking and split logic are checked without a GPU.

Needs g++ (C++20). ``run_fused_emulated`` mirrors ``launchers.run_fused``.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import mlx.core as mx
import numpy as np

from mlx_lm_turbo.kernels import build, decode, encode, launchers, source

CPU_HEADER = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };
#define KV_SHARED static
#define KV_TG
#define KV_DEV
thread_local int emu_tid, emu_bx, emu_by;
static int emu_nbx, emu_nby;
static std::barrier<>* emu_block;
static std::barrier<>* emu_warps[32];
static float emu_scratch[32][32];
#define KV_BARRIER() emu_block->arrive_and_wait()
// Blocks run one after another: a block's count is seen by the next one.
#define KV_DEVICE_FENCE() std::atomic_thread_fence(std::memory_order_seq_cst)
#define KV_ATOMIC_INC(p, i) (((uint32_t*)(p))[i]++)
static float emu_warp_reduce(float x, bool is_max) {
  const int w = emu_tid >> 5, l = emu_tid & 31;
  emu_scratch[w][l] = x;
  emu_warps[w]->arrive_and_wait();
  float r = emu_scratch[w][0];
  for (int i = 1; i < 32; ++i) r = is_max ? std::fmax(r, emu_scratch[w][i]) : r + emu_scratch[w][i];
  emu_warps[w]->arrive_and_wait();
  return r;
}
#define KV_WARP_MAX(x) emu_warp_reduce(x, true)
#define KV_WARP_SUM(x) emu_warp_reduce(x, false)
#define KV_WARP_ANY(p) (emu_warp_reduce((p) ? 1.0f : 0.0f, true) > 0.0f)
#define KV_EXP(x) std::exp(x)
#define KV_MAX(a, b) std::fmax(a, b)
#define KV_MIN(a, b) std::min(a, b)
#define KV_IMAX(a, b) ((a) > (b) ? (a) : (b))
#define KV_SQRT(x) std::sqrt(x)
static float emu_h2f(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  float v = e == 0 ? std::ldexp(float(m), -24)
          : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(float(m | 1024), e - 25);
  return s ? -v : v;
}
#define KV_H2F(x) emu_h2f(x)
// fp16 with the GPUs' float -> half rounding (to nearest even), for fp16 outputs.
static uint16_t emu_f2h(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);          // rounds past 65504
  if (ax < 0x38800000u) {                                          // half subnormal
    float a;
    std::memcpy(&a, &ax, 4);
    return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
  }
  return uint16_t(sign | ((ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13));
}
struct emu_half {
  uint16_t bits;
  emu_half() = default;
  explicit emu_half(float f) : bits(emu_f2h(f)) {}
  operator float() const { return emu_h2f(bits); }
};
#define KV_NEG_INF (-INFINITY)
// The matrix-unit helpers of DECODE_MMA_BODY with CUDA's fragment layout (G = lane/4,
// L = lane%4): each lane posts its fragments, then computes its own C elements.
#define KV_MG(lane) ((lane) >> 2)
#define KV_ML(lane) ((lane) & 3)
#define KV_GX0 4
#define KV_GX1 8
#define KV_GX2 16
#define KV_WARP_SYNC() emu_warps[emu_tid >> 5]->arrive_and_wait()
static float emu_shfl_xor(float x, int o) {
  const int w = emu_tid >> 5, l = emu_tid & 31;
  emu_scratch[w][l] = x;
  emu_warps[w]->arrive_and_wait();
  const float r = emu_scratch[w][l ^ o];
  emu_warps[w]->arrive_and_wait();
  return r;
}
#define KV_SHFL_XOR(x, o) emu_shfl_xor(x, o)
// As on CUDA: tables aligned to their size (TALIGN), looked up at (base | offset).
#define KV_TAB_PAD(p, n) ((0u - uint32_t(uintptr_t(p) / 4u)) & uint32_t((n) - 1))
#define KV_TAB_BASE uintptr_t
#define KV_TAB_ADDR(p) uintptr_t(p)
#define KV_TAB_LOAD(a, base, off) (*(const uint32_t*)((a) ? ((base) | (off)) : ((base) + (off))))
// A 128-bit store needs a 16-byte aligned address (the GPU faults otherwise): here a
// misaligned one writes garbage, so a wrong padding fails the emulated tests.
static void kv_store4(uint32_t* p, uint32_t v) {
  const uint32_t bad = (uintptr_t(p) % 16) ? 0x7c007c00u : 0u;
  p[0] = p[1] = p[2] = p[3] = v ^ bad;
}
static uint32_t kv_pack_h2(float lo, float hi) {
  return uint32_t(emu_f2h(lo)) | (uint32_t(emu_f2h(hi)) << 16);
}
static void kv_load_b(uint32_t* b, const float* p, int ldk, int ldn, int lane) {
  const int g = lane >> 2, l = lane & 3;
  b[0] = kv_pack_h2(p[(2 * l) * ldk + g * ldn], p[(2 * l + 1) * ldk + g * ldn]);
  b[1] = kv_pack_h2(p[(2 * l + 8) * ldk + g * ldn], p[(2 * l + 9) * ldk + g * ldn]);
}
static uint32_t emu_frag[32][32][6];
static float emu_half_of(uint32_t x, int k) { return emu_h2f(uint16_t(x >> (16 * (k & 1)))); }
static void kv_mma(float* c, const uint32_t* a, const uint32_t* b) {
  const int w = emu_tid >> 5, l = emu_tid & 31;
  for (int i = 0; i < 4; ++i) emu_frag[w][l][i] = a[i];
  emu_frag[w][l][4] = b[0];
  emu_frag[w][l][5] = b[1];
  emu_warps[w]->arrive_and_wait();
  for (int e = 0; e < 4; ++e) {
    const int row = (l >> 2) + 8 * (e >> 1), n = 2 * (l & 3) + (e & 1);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const uint32_t* fa = emu_frag[w][(row % 8) * 4 + (k % 8) / 2];
      const uint32_t* fb = emu_frag[w][n * 4 + (k % 8) / 2];
      s += emu_half_of(fa[(row >= 8) + 2 * (k >= 8)], k) * emu_half_of(fb[4 + (k >= 8)], k);
    }
    c[e] += s;
  }
  emu_warps[w]->arrive_and_wait();
}
"""

CPU_PRELUDE = """
  const int kv_tid = emu_tid;
  const int kv_bx = emu_bx;
  const int kv_by = emu_by;
  const int kv_nbx = emu_nbx;
  const int kv_nby = emu_nby;
  const int kv_lane = emu_tid & 31;
  const int kv_warp = emu_tid >> 5;
"""

_libs: dict = {}
_H2F_INPUTS = ("kn", "krn", "vn")   # decode inputs read as raw fp16 bits (KV_H2F)
# The real run_fused, even where a test replaces decode.run_fused by this emulation.
_RUN_FUSED = launchers.run_fused


def _ctype(dt) -> str:
    return {np.float32: "float", np.uint16: "uint16_t", np.uint32: "uint32_t",
            np.int32: "int32_t"}[dt]


# Output element types: fp16 outputs are written through emu_half (GPU rounding).
_OUT_CTYPES = {np.float32: "float", np.uint32: "uint32_t", np.float16: "emu_half"}


def compile_kernel(body: str, names: list, dtypes: list, outs: list, template: list,
                   out_dtypes: list = None):
    """Compile ``body`` for the CPU; returns a callable(inputs, outputs, grid_blocks, nt).
    ``out_dtypes`` (numpy types, default float32) type the outputs; an output of
    np.float16 must be passed as a uint16 buffer."""
    args, uses = [], []
    for n, dt in zip(names, dtypes):
        args.append(f"const {_ctype(dt)}* {n}")
        u = (f"{n}_shape" in body, f"{n}_strides" in body)
        uses.append(u)
        if u[0]:
            args.append(f"const int32_t* {n}_shape")
        if u[1]:
            args.append(f"const int64_t* {n}_strides")
    out_dtypes = out_dtypes or [np.float32] * len(outs)
    args += [f"{_OUT_CTYPES[dt]}* {n}" for n, dt in zip(outs, out_dtypes)]
    consts = "".join(f"  using {k} = {v};\n" if isinstance(v, str) else f"  constexpr int {k} = {v};\n"
                     for k, v in template)
    call = ", ".join(f"({a.rsplit(' ', 1)[0]})p[{i}]" for i, a in enumerate(args))
    src = (CPU_HEADER + "static void kern(" + ", ".join(args) + ") {\n" + consts + CPU_PRELUDE
           + body + "\n}\n" + r"""
extern "C" void launch(void** p, int gx, int gy, int nt) {
  emu_nbx = gx;
  emu_nby = gy;
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      std::barrier<> blk(nt);
      std::vector<std::barrier<>*> ws;
      for (int w = 0; w < nt / 32; ++w) { ws.push_back(new std::barrier<>(32)); emu_warps[w] = ws.back(); }
      emu_block = &blk;
      std::vector<std::thread> th;
      for (int t = 0; t < nt; ++t)
        th.emplace_back([=] { emu_tid = t; emu_bx = bx; emu_by = by; kern(""" + call + r"""); });
      for (auto& x : th) x.join();
      for (auto* w : ws) delete w;
    }
}
""")
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    if key not in _libs:
        d = os.path.join(tempfile.gettempdir(), "mlx_lm_turbo_emu")
        os.makedirs(d, exist_ok=True)
        cpp, so = os.path.join(d, f"{key}.cpp"), os.path.join(d, f"{key}.so")
        if not os.path.exists(so):
            with open(cpp, "w") as f:
                f.write(src)
            cxx = shutil.which("g++") or shutil.which("clang++")
            subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                            "-Wno-unknown-pragmas", "-o", so, cpp], check=True,
                           capture_output=True, text=True)
        _libs[key] = (ctypes.CDLL(so), uses)
    lib, uses = _libs[key]

    def run(inputs, outputs, grid, nt):
        keep, ptrs = [], []
        for (arr, shape, strides), u in zip(inputs, uses):
            keep.append(arr)
            ptrs.append(arr.ctypes.data)
            if u[0]:
                s = np.array(list(shape) + [0] * 10, np.int32)
                keep.append(s)
                ptrs.append(s.ctypes.data)
            if u[1]:
                s = np.array(list(strides) + [0] * 10, np.int64)
                keep.append(s)
                ptrs.append(s.ctypes.data)
        for o in outputs:
            ptrs.append(o.ctypes.data)
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        lib.launch(arr, ctypes.c_int(grid[0]), ctypes.c_int(grid[1]), ctypes.c_int(nt))
    return run


def _np(a: mx.array, full: mx.array = None):
    """(contiguous numpy buffer, logical shape, element strides). With ``full`` given, ``a``
    is a token-axis slice of it: the buffer is ``full`` and strides are full's."""
    src = a if full is None else full
    x = np.array(src)
    if x.dtype == np.float16:
        x = x.view(np.uint16)
    x = np.ascontiguousarray(x)
    strides = [s // x.itemsize for s in x.strides]
    return x, list(a.shape), strides


def _captured(fn) -> dict:
    """Run ``fn`` with decode's kernels replaced by recorders: {kernel name: (inputs,
    template, grid, threadgroup, output shapes)} of the launches it makes."""
    captured = {}

    def fake_kernel(backend_name, name, template):
        def call(inputs, grid, threadgroup, output_shapes, output_dtypes):
            captured[name] = (inputs, list(template), grid, threadgroup, output_shapes)
            return [mx.zeros(s, mx.float32) for s in output_shapes]
        return call

    orig = launchers.kernel
    launchers.kernel = fake_kernel
    try:
        fn()
    finally:
        launchers.kernel = orig
    return captured


def _host_arrays(names: list, inputs: list, keys: dict, values: dict, full) -> list:
    """The kernel inputs as the emulation reads them. ``full``: (keys_full, values_full),
    the buffers the packed views were sliced from, so that the kernels see them as MLX
    hands them over (whole buffer + strides)."""
    views = {}
    if full is not None:
        for view, buf in ((keys, full[0]), (values, full[1])):
            for k, v in view.items():
                if k in buf:   # (the window's "recent" copies are not in the buffers)
                    views[id(v)] = buf[k]

    def host(name, a):
        # The kernels read every float input but the fp16 norms (KV_H2F) through
        # static_cast<float>: fp16/bf16 -> fp32 on the host is exact.
        if a.dtype == mx.bfloat16 or (a.dtype == mx.float16 and name not in _H2F_INPUTS):
            a = a.astype(mx.float32)
        return _np(a, views.get(id(a)))
    return [host(n, a) for n, a in zip(names, inputs)]


def _tpl(t):
    """Template types for the emulation: floats, but the norms' fp16 (NORMT) bit for bit."""
    return [((k, "emu_half" if k == "NORMT" else "float") if isinstance(v, mx.Dtype)
             else (k, v)) for k, v in t]


def run_fused_emulated(queries, keys, values, cache, scale, mask, p, full=None):
    """launchers.run_fused with both kernels executed on the CPU (``full``: see
    ``_host_arrays``)."""
    captured = _captured(lambda: _RUN_FUSED(queries, keys, values, cache, scale, mask, p,
                                            "cuda"))
    name = "decode_mma" if "decode_mma" in captured else "decode"
    body, (names, onames) = source.body(name), build.SIGNATURES[name]
    inputs, template, grid, tg, oshapes = captured[name]
    nt = tg[0]
    arrs = _host_arrays(names, inputs, keys, values, full)
    outs = [np.zeros(s, np.float32) for s in oshapes]
    run = compile_kernel(body, names, [x.dtype.type for x, _, _ in arrs], onames, _tpl(template))
    run(arrs, outs, (grid[0] // nt, grid[1]), nt)
    rin, rtpl, rgrid, rtg, rshapes = captured["reduce"]
    vmul = _np(rin[3])
    out = np.zeros(rshapes[0], np.float32)
    run2 = compile_kernel(source.body("reduce"), build.REDUCE_INPUTS, [np.float32] * 4,
                          build.REDUCE_OUTPUTS, _tpl(rtpl))
    run2([(o, list(o.shape), [s // 4 for s in o.strides]) for o in outs] + [vmul], [out],
         (rgrid[0] // rtg[0], 1), rtg[0])
    o = mx.array(out)
    if dict(rtpl)["ROTV"] == 0:
        o = cache.value_codec.unrotate(o)
    return o.astype(queries.dtype)


def run_folded_emulated(queries, keys, values, cache, scale, p, full=None):
    """The steady decode step's one launch (the mma kernel with the combine folded in,
    ``launchers.fold_launcher``) executed on the CPU -> (output, the counters afterwards)."""
    captured = _captured(lambda: decode._steady(queries, keys, values, cache, scale, p,
                                                "cuda", fold=True)[0](queries, keys, values))
    body, (names, onames) = source.body("decode_mma_fold"), build.SIGNATURES["decode_mma_fold"]
    inputs, template, grid, tg, oshapes = captured["decode_mma_fold"]
    arrs = _host_arrays(names, inputs, keys, values, full)
    outs = [np.zeros(s, np.float32) for s in oshapes]
    run = compile_kernel(body, names, [x.dtype.type for x, _, _ in arrs], onames, _tpl(template))
    run(arrs, outs, (grid[0] // tg[0], grid[1]), tg[0])
    return mx.array(outs[1]).astype(queries.dtype), arrs[names.index("cnt")][0]


def run_appending_emulated(queries, keys, values, cache, scale, p, knew, vnew):
    """The steady step's appending launch (``decode._steady``'s ``coded``: it codes the
    token knew/vnew at live position S - 1 into the buffers, then attends) executed on the
    CPU, on copies of the live dicts' buffers -> (output, key buffers, value buffers,
    counters), the buffers as the launch leaves them."""
    captured = _captured(lambda: decode._steady(queries, keys, values, cache, scale, p, "cuda",
                                                fold=True, append=True)[1](
        queries, keys, values, knew, vnew))
    name = "decode_mma_fold_append"
    body, (names, onames) = source.body(name), build.SIGNATURES[name]
    inputs, template, grid, tg, oshapes = captured[name]
    arrs = _host_arrays(names, inputs, keys, values, None)
    outs = [np.zeros(s, np.float32) for s in oshapes]
    run = compile_kernel(body, names, [x.dtype.type for x, _, _ in arrs], onames, _tpl(template))
    run(arrs, outs, (grid[0] // tg[0], grid[1]), tg[0])

    def back(codes, norm):
        return {"codes": mx.array(arrs[names.index(codes)][0]),
                "norm": mx.array(arrs[names.index(norm)][0].view(np.float16))}
    return (mx.array(outs[1]).astype(queries.dtype), back("kc", "kn"), back("vc", "vn"),
            arrs[names.index("cnt")][0])


def run_encode_emulated(codec, x: mx.array, base: mx.array = None, axes=None, codec2=None,
                        x2: mx.array = None):
    """encode.run_kernel with the kernel executed on the CPU. ``base`` and ``axes``
    (optional): ``x`` is ``base.transpose(axes)``, and the kernel is handed base's buffer
    with the permuted strides, as MLX hands over a transposed view. ``codec2``/``x2``: the
    one-launch pair (encode.run_pair_kernel); returns the two dicts."""

    x4, kw = encode.launch_args(codec, x, codec2, x2)
    xin, cst, x2in, cst2 = kw["inputs"][:4]
    # Inputs are read through static_cast<float>: fp16/bf16 -> fp32 on the host is exact.
    if base is not None:
        buf = np.ascontiguousarray(np.array(base.astype(mx.float32)))
        strides = [buf.strides[a] // buf.itemsize for a in axes]
        xh = (buf, list(xin.shape), strides)
    else:
        xh = _np(xin.astype(mx.float32))

    dt_np = {mx.uint32: np.uint32, mx.float16: np.float16}
    out_dtypes = [dt_np[d] for d in kw["output_dtypes"]]
    outs = [np.zeros(s, np.uint16 if d == np.float16 else d)
            for s, d in zip(kw["output_shapes"], out_dtypes)]
    extra = [_np(a) for a in kw["inputs"][4:]]   # the in-place launch's dummies
    run = compile_kernel(source.body("encode"), encode.INPUTS,
                         [np.float32] * 4 + [x.dtype.type for x, _, _ in extra],
                         encode.OUTPUTS, _tpl(kw["template"]), out_dtypes)
    nt = kw["threadgroup"][0]
    run([xh, _np(cst), _np(x2in.astype(mx.float32)), _np(cst2)] + extra, outs,
        (kw["grid"][0] // nt, 1), nt)
    for j in (2, 5):
        outs[j] = outs[j].view(np.float16)
    first = encode.as_packed(codec, x, [mx.array(o) for o in outs[:3]])
    if x2 is None:
        return first
    return first, encode.as_packed(codec2, x2, [mx.array(o) for o in outs[3:]])


def run_encode_in_place_emulated(kc, vc, k: mx.array, v: mx.array, kbuf: dict, vbuf: dict,
                                 prev: int) -> tuple[dict, dict]:
    """encode.write_pair_in_place with the kernel executed on the CPU: returns copies of
    the buffers ``kbuf``/``vbuf`` (the codecs' packed dicts) as the launch leaves them."""

    _, kw = encode.launch_args(kc, k, vc, v)
    template = [(n, 1 if n == "INPLACE" else x) for n, x in kw["template"]]

    def buffers(codec, buf):
        names = encode.in_place_names(codec)
        codes2 = buf[names[1]] if names[1] else mx.zeros((1, 1, 1, 1), mx.uint32)
        return [_np(a) for a in (buf[names[0]], codes2, buf["norm"])], names

    kb_np, knames = buffers(kc, kbuf)
    vb_np, vnames = buffers(vc, vbuf)
    pos = np.array([prev, prev + k.shape[2], 0, 0], np.int32)
    ins = ([_np(k.astype(mx.float32)), _np(encode.consts(kc)), _np(v.astype(mx.float32)),
            _np(encode.consts(vc)), (pos, [4], [1]), _np(mx.zeros((4,), mx.uint32))]
           + kb_np + vb_np)
    outs = [np.zeros((4,), np.uint32)]
    run = compile_kernel(source.body("encode_inplace"), encode.INPUTS,
                         [x.dtype.type for x, _, _ in ins], encode.IN_PLACE_OUTPUTS,
                         _tpl(template), [np.uint32])
    nt = kw["threadgroup"][0]
    run(ins, outs, (kw["grid"][0] // nt, 1), nt)

    def back(arrs, names):
        return {name: mx.array(x.view(np.float16) if name == "norm" else x)
                for (x, _, _), name in zip(arrs, (names[0], names[1], "norm"))
                if name is not None}
    return back(kb_np, knames), back(vb_np, vnames)
