"""Fused decode attention over packed codes: dispatcher, kernel builder, first-use check.

Pipeline (rotation is linear, so it never touches the keys or values):
  1. MLX: q~ = scale * Π_K q (and for prod keys q' = scale * gain * S q~), rows grouped
     per KV head as (G query heads x L positions), padded to whole row groups.
  2. Kernel 1 (split-K): per (batch, KV head, row group, split) block, scores from packed
     key words, online softmax, value sums in Π_V's domain -> partial (o, m, l).
     For mse keys and values at <= 4 bits with <= 8 rows per KV head, kernel 1 is the
     matrix-unit variant (DECODE_MMA_BODY: mma fragments from pair tables; mma_rep).
  3. Kernel 2: combine the splits.
  4. MLX: Π_Vᵀ once, cast to the queries' dtype.
The steady decode step (``_steady``: mma kernel, no mask) applies Π_Vᵀ in kernel 2, and
on CUDA folds kernel 2 into kernel 1 (the last block of a row combines: MMA_FOLD_TAIL).

With an fp16 window (keys/values carry "recent", cache.py) kernel 1 gets one more split
per row group, the *window block*: it scores the uncompressed copies with the raw queries
(minus the key mean when centred), sums their values and applies Π_V to its partial, so
kernel 2 combines it like any coded split; the coded splits stop where each row's copies
start (attention._with_window's rule). No extra MLX op on the common path.
"""

import hashlib
import math
import os
import warnings
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from . import source

MAX_QUERY_LEN = 8
NT = 128                      # threads per block = keys per tile
TARGET_BLOCKS = int(os.environ.get("MLX_LM_TURBO_BLOCKS", "528"))  # ~4 blocks per H100 SM
ENV = "MLX_LM_TURBO_KERNELS"
# "0": the scalar decode kernel even where the mma one applies (which is the default).
MMA_ENV = "MLX_LM_TURBO_MMA"
FOLD_ENV = "MLX_LM_TURBO_FOLD"   # "0": the steady decode step keeps a separate combine launch
# "0": the steady decode step codes the new token in a launch of its own (see MMA_APPEND)
APPEND_ENV = "MLX_LM_TURBO_APPEND"
# Static shared memory per block (bytes): CUDA allows 48 KiB, Metal 32 KiB.
SHARED_BUDGET = {"cuda": 48 * 1024, "metal": 32 * 1024}

KEY_MODES = {"turboquant_mse": 0, "turboquant_rvq": 1, "turboquant_prod": 2}
VALUE_MODES = {"turboquant_mse": 0, "turboquant_rvq": 1}

_kernels: dict = {}           # (backend, name, template) -> compiled kernel object
_checked: dict = {}           # shape key -> True (kernel agreed) / False (use the reference)


@lru_cache(maxsize=1)
def _gpu_backend() -> Optional[str]:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


def backend() -> Optional[str]:
    """'cuda', 'metal' or None (no GPU backend: the reference path runs)."""
    if mx.default_device() != mx.gpu:
        return None
    return _gpu_backend()   # (asked once: every layer of every decode step comes here)


def active_backend(mode: Optional[bool]) -> Optional[str]:
    """The GPU backend a kernel would run on under ``mode`` (see ``env_mode``), or None
    (kernels off, or no GPU: the caller falls back); raises when forced without a GPU."""
    if mode is False:
        return None
    be = backend()
    if be is None and mode:
        raise RuntimeError(f"{ENV}=1 but no Metal or CUDA GPU backend is active")
    return be


_ENV_NAMES = (ENV, MMA_ENV, FOLD_ENV, APPEND_ENV)
# CPython keeps the environment in os.environ._data, keyed by os.fsencode(name) on POSIX.
_ENV_KEYS = tuple(os.fsencode(n) for n in _ENV_NAMES) if os.name == "posix" else None


def env_state() -> tuple:
    """This module's four environment switches as set now (bytes or str, only for
    comparing): what a memoised decode step or append was resolved under, checked per
    layer and step. Read from os.environ's own dict where it is the POSIX one: its
    public ``get`` costs ~0.5 µs a name, host time that batch-1 decode waits on."""
    data = getattr(os.environ, "_data", None)
    if _ENV_KEYS is not None and type(data) is dict:
        k0, k1, k2, k3 = _ENV_KEYS
        return data.get(k0), data.get(k1), data.get(k2), data.get(k3)
    return tuple(os.environ.get(n) for n in _ENV_NAMES)


def env_mode() -> Optional[bool]:
    """MLX_LM_TURBO_KERNELS: '0' forces the reference, '1' forces the kernel, else auto."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "false", "off", "no"):
        return False
    if v in ("1", "true", "on", "yes"):
        return True
    return None


# --------------------------------------------------------------------------- sources

# What MLX writes for a dtype in kernel source, per backend.
TYPE_NAMES = {
    "cuda": {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float",
             mx.uint32: "uint32_t"},
    "metal": {mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float32: "float",
              mx.uint32: "uint32_t"},
}


def constants(template, backend_name: str) -> str:
    """Template values as the first lines of the kernel body (the text MLX's CUDA backend
    writes for them). A dtype may be given as an mx.Dtype or its name."""
    names = TYPE_NAMES[backend_name]
    lines = []
    for k, v in template:
        if isinstance(v, str):
            v = getattr(mx, v)
        if isinstance(v, mx.Dtype):
            lines.append(f"  using {k} = {names[v]};")
        elif isinstance(v, bool):
            lines.append(f"  constexpr bool {k} = {'true' if v else 'false'};")
        else:
            lines.append(f"  constexpr int {k} = {int(v)};")
    return "\n".join(lines) + "\n"


def compact(text: str) -> str:
    """Kernel text without comments, indentation or blank lines. MLX hashes a custom
    kernel's whole source each time it evaluates one (host time of every decode step):
    the mma kernel's text is 20 KB with comments, 15.5 KB without."""
    lines = []
    for line in text.splitlines():
        if '"' not in line:   # no string literal on the line, so // starts a comment
            line = line.split("//", 1)[0]
        line = line.strip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


def full_source(body: str, backend_name: str, template=(), mma: bool = False) -> tuple[str, str]:
    """(header, source) for mx.fast.*_kernel: the template values baked in as constants,
    then the backend prelude, then the shared body, compacted. ``mma``: the header also
    carries the matrix-unit helpers (DECODE_MMA_BODY)."""
    head = constants(template, backend_name) if template else ""
    if backend_name == "metal":
        extra = source.METAL_MMA_HEADER if mma else ""
        header, src = source.METAL_HEADER + extra, head + source.METAL_PRELUDE + body
    else:
        extra = (source.CUDA_MMA_HEADER + source.CUDA_LAUNCH_BOUNDS.format(nt=NT, blocks=4)
                 if mma else "")
        header, src = source.CUDA_HEADER + extra, head + source.CUDA_PRELUDE + body
    return compact(header), compact(src)


DECODE_INPUTS = ["q", "qmul", "q2", "kc1", "kc2", "kn", "krn", "vc1", "vc2", "vn", "mask",
                 "cbk1", "cbk2", "cbv1", "cbv2", "qw", "rk", "rv", "kmu", "vmul"]
DECODE_OUTPUTS = ["opart", "mpart", "lpart"]
# nk, dep: the live launch (LIVE, see ``_steady``); dummies otherwise.
MMA_INPUTS = ["q", "qmul", "kc", "kn", "vc", "vn", "kpt", "vpt", "nk", "dep"]
REDUCE_INPUTS = ["opart", "mpart", "lpart", "vmul"]
REDUCE_OUTPUTS = ["out"]
# The mma kernel with the combine folded in (source.MMA_FOLD_TAIL): cnt, the per-row and
# per-group counters of finished blocks (``fold_counters``, zero between launches); prev,
# the output of the launch before on the same counters (unread: it orders the launches,
# see ``fold_launcher``); part, the three partials in one scratch output
# (source.MMA_FOLD_PARTS).
FOLD_INPUTS = MMA_INPUTS + ["vmul", "cnt", "prev"]
FOLD_OUTPUTS = ["part", "out"]
# The folded launch that also codes the new token (source.MMA_APPEND): its key and value;
# its constant tables (qmul, kpt, vpt, vmul and the codecs' encode tables) in one input,
# cdata, at the offsets TABLE_OFFSETS name (``merged_tables``, source.APPEND_TABLES).
APPEND_INPUTS = ["q", "cdata", "kc", "kn", "vc", "vn", "nk", "dep", "cnt", "prev", "knew",
                 "vnew"]
TABLE_OFFSETS = ("TQMUL", "TKPT", "TVPT", "TVMUL", "TCK", "TCV")


def build_kernel(body: str, backend_name: str, name: str, inputs: list, outputs: list,
                 template=(), mma: bool = False):
    """``mx.fast.metal_kernel`` / ``cuda_kernel`` of a shared body, specialised for one
    ``template``: its values are baked into the source, so a call passes no template.
    MLX re-renders the source and formats every template value on each call; with one
    kernel object per specialisation the two decode launches took 26 instead of 39 µs of
    host time on an H100 (batch-1 decode waits on host time). Inputs are read through their
    strides (cache slices and transposed key views arrive without a copy)."""
    header, src = full_source(body, backend_name, template, mma)
    make = mx.fast.metal_kernel if backend_name == "metal" else mx.fast.cuda_kernel
    # MLX caches compiled kernels by name (its CUDA backend also on disk): a hash of the
    # text, constants included, in the name keeps an edited body from loading a stale
    # binary and gives each specialisation its own.
    tag = hashlib.sha1((header + src).encode()).hexdigest()[:10]
    if backend_name == "cuda":
        header, src = included(header, src, inputs, f"turbo_{name}_{tag}")
    return make(name=f"turbo_{name}_{tag}", input_names=inputs, output_names=outputs,
                source=src, header=header, ensure_row_contiguous=False)


def kernel_dir() -> str:
    """Where ``included`` keeps kernel text: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlx_lm_turbo", "kernels")


def shape_params(src: str, inputs: list) -> list:
    """The ``<input>_shape``/``_strides``/``_ndim`` names ``src`` uses: MLX passes those
    parameters of a custom kernel only where it finds the names in its source."""
    return [f"{n}_{w}" for n in inputs for w in ("shape", "strides", "ndim")
            if f"{n}_{w}" in src]


def included(header: str, src: str, inputs: list, stem: str) -> tuple[str, str]:
    """CUDA: (header, source) that ``#include`` the kernel's text from files, for NVRTC to
    read. MLX rebuilds a custom kernel's whole source on every call and hashes it at every
    evaluation (~3 µs of host time per call for the 17 KB mma kernel, measured on the
    H200 machine), and batch-1 decode waits on host time. The one-line source also lists
    the ``<input>_shape``/``_strides``/``_ndim`` names the text uses: MLX passes those
    parameters only where it finds the names in the source it is given. The files are
    named by the text's hash, written whole (a temporary file renamed into place) and
    read back before use; if the folder cannot be written, the text goes inline."""
    d = kernel_dir()
    paths = (os.path.join(d, f"{stem}.h.cuh"), os.path.join(d, f"{stem}.body.cuh"))
    try:
        os.makedirs(d, exist_ok=True)
        for path, text in zip(paths, (header, src)):
            try:
                with open(path) as f:
                    if f.read() == text:
                        continue
            except OSError:
                pass
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):   # (a failed write leaves nothing behind)
                    os.remove(tmp)
    except OSError:
        return header, src
    used = shape_params(src, inputs)
    return (f'#include "{paths[0]}"\n',
            f'#include "{paths[1]}"\n' + (f"// {' '.join(used)}\n" if used else ""))


def _kernel(backend_name: str, name: str, template: tuple):
    key = (backend_name, name, template)
    kernel = _kernels.get(key)
    if kernel is None:
        body, inputs, outputs = KERNELS[name]
        kernel = _kernels[key] = build_kernel(body, backend_name, name, inputs, outputs,
                                              template, mma=name.startswith("decode_mma"))
    return kernel


KERNELS = {"decode": (source.DECODE_BODY, DECODE_INPUTS, DECODE_OUTPUTS),
           "decode_mma": (source.DECODE_MMA_BODY, MMA_INPUTS, DECODE_OUTPUTS),
           "decode_mma_fold": (source.MMA_FOLD_PARTS + source.DECODE_MMA_BODY
                               + source.MMA_FOLD_TAIL, FOLD_INPUTS, FOLD_OUTPUTS),
           "decode_mma_fold_append": (source.APPEND_TABLES + source.MMA_FOLD_PARTS
                                      + source.MMA_SETUP
                                      + source.MMA_APPEND + source.MMA_MAIN
                                      + source.MMA_FOLD_TAIL, APPEND_INPUTS, FOLD_OUTPUTS),
           "reduce": (source.REDUCE_BODY, REDUCE_INPUTS, REDUCE_OUTPUTS)}


# --------------------------------------------------------------------------- plan

def _streams(codec, packed: dict, is_key: bool):
    """(mode, [(bits, words, codes array, codebook)], extra) for a codec, or None."""
    method = codec.METHOD
    if is_key and method == "turboquant_mse":
        return [(codec.bits, packed["codes"], codec.centroids)]
    if method == "turboquant_rvq":
        s = codec.scale
        return [(codec.bits, packed["codes1"], codec.centroids1 * s),
                (codec.bits, packed["codes2"], codec.centroids2 * s)]
    if not is_key and method == "turboquant_mse":
        return [(codec.bits, packed["codes"], codec.centroids)]
    if is_key and method == "turboquant_prod" and codec.mse_bits >= 1:
        return [(codec.mse_bits, packed["codes"], codec.centroids),
                (1, packed["signs"], mx.array([-1.0, 1.0]))]
    return None


def _window(queries: mx.array, keys: dict, values: dict, cache, mask, S: int,
            DV: int) -> Optional[tuple[int, int]]:
    """(W, n copies) of a windowed call the window block covers, else None: copies of
    the last n >= L positions in the cache's layout, mask None or "causal"."""
    rk, rv = keys.get("recent"), values.get("recent")
    W = getattr(cache, "fp16_window", 0)
    if rk is None or rv is None or W < 1 or isinstance(mask, mx.array):
        return None
    B, Hq, L, D = queries.shape
    if rk.ndim != 4 or rv.ndim != 4:
        return None
    n = rk.shape[2]
    Hkv = keys["norm"].shape[1]
    if rk.shape != (B, Hkv, n, D) or rv.shape != (B, Hkv, n, DV) or not L <= n <= S:
        return None
    floats = (mx.float16, mx.bfloat16, mx.float32)
    if rk.dtype not in floats or rv.dtype not in floats:
        return None
    mu = getattr(cache, "key_mean", None)
    if getattr(cache, "center_keys", False) and (
            mu is None or mu.ndim != 4 or mu.shape[0] not in (1, B)
            or mu.shape[1:] != (Hkv, 1, D)):
        return None
    return W, n


@lru_cache(maxsize=256)
def row_blocking(R: int, D: int, DV: int, nc: int, wv: int, nv: int, vb: int,
                 budget: int) -> tuple[int, int, int]:
    """(RB query rows per block, score-table floats, shared floats) for the largest RB
    whose shared memory fits ``budget``; RB = 0 if none does."""
    for cand in (8, 4, 2, 1):
        if cand > 1 and cand > max(1, 4 * math.ceil(R / 4)):
            continue
        tabn = 4 * math.ceil(D * nc * cand / 4)
        sh = max(tabn + max(cand * D, NT * wv * nv), (NT // 32) * cand * DV)
        sh = 4 * math.ceil(sh / 4)
        total = 4 * (sh + 2 * (1 << vb) + (NT // 32) * cand + 4 * math.ceil(NT * cand / 4))
        if total <= budget:
            return cand, tabn, sh
    return 0, 0, 0


def mma_rep(kc, vc, R: int, D: int, DV: int, kb: int, vb: int,
            budget: int) -> Optional[int]:
    """log2 of the copies of each pair table (key and value alike) of the matrix-unit
    kernel (DECODE_MMA_BODY) for mse keys and values with Hadamard keys, or None where it does
    not apply: more than 8 rows, bits above 4, a key quarter not whole words, a lane's
    value bits not within two words, or tables that do not fit ``budget``."""
    if kc.METHOD != "turboquant_mse" or vc.METHOD != "turboquant_mse":
        return None
    if kc.rotation.signs is None or R > 8 or not (1 <= kb <= 4 and 1 <= vb <= 4):
        return None
    if D % 16 or DV % 16 or (D // 4) * kb % 32:
        return None
    vg = DV // 8
    if any((g * vg * vb) % 32 + vg * vb > 64 for g in range(8)):
        return None
    for rep in (5, 4, 3, 2, 1, 0):
        tabs = max((1 << 2 * kb << rep) + (1 << 2 * vb << rep), (NT // 32) * 8 * DV)
        if 4 * tabs + _mma_fixed_bytes(D) <= budget:
            return rep
    return None


def _mma_fixed_bytes(D: int) -> int:
    """The mma kernel's shared memory besides the tables: qs, qb, pst, red_m, red_l."""
    nw = NT // 32
    return 4 * (2 * 8 * D + nw * 16 * 8 + 2 * nw * 8 + 4)   # + up to 3 words of alignment


def mma_aligned(rep: int, D: int, DV: int, kb: int, vb: int, budget: int) -> bool:
    """Whether the mma kernel's pair tables, with 2^rep copies, also fit aligned to their
    size (TALIGN: up to a table's size of padding; each lookup one instruction shorter:
    the 3-bit decode kernel at 128k 75.0 -> 70.2 µs on the H100). 4-bit tables with 16
    copies do not fit (with 8 copies, bank conflicts made 4-bit 13% slower)."""
    tabs = max(3 * (1 << 2 * max(kb, vb) << rep), (NT // 32) * 8 * DV)
    return 4 * tabs + _mma_fixed_bytes(D) <= budget


def plan(queries: mx.array, keys: dict, values: dict, cache, mask, sinks,
         backend_name: str) -> Optional[dict]:
    """Static description of the launch, or None when the fused path does not apply."""
    kc, vc = cache.key_codec, cache.value_codec
    if kc is None or vc is None or sinks is not None:
        return None
    if kc.METHOD not in KEY_MODES or vc.METHOD not in VALUE_MODES:
        return None
    if queries.ndim != 4 or queries.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return None
    B, Hq, L, D = queries.shape
    norm = keys["norm"]
    Bk, Hkv, S = norm.shape
    DV = vc.dim
    if L > MAX_QUERY_LEN or S == 0 or Bk != B or Hq % Hkv or D != kc.dim:
        return None
    if DV % 32 or DV < 32:
        return None
    ks = _streams(kc, keys, True)
    vs = _streams(vc, values, False)
    if ks is None or vs is None:
        return None
    vb = vs[0][0]
    if (DV // 32) * vb > 32:
        return None   # a lane's value window must fit one 32-bit word
    W = n_copies = 0
    if "recent" in keys:   # fp16 window (cache.py)
        win = _window(queries, keys, values, cache, mask, S, DV)
        if win is None:
            return None
        W, n_copies = win
    if isinstance(mask, str) and mask != "causal":
        return None
    if mask is not None and not isinstance(mask, (str, mx.array)):
        return None
    mask_mode = 0
    if isinstance(mask, str):
        mask_mode = 1 if L > 1 else 0
    elif isinstance(mask, mx.array):
        mask_mode = 2
    G = Hq // Hkv
    R = G * L
    nc = sum(1 << b for b, _, _ in ks)
    budget = SHARED_BUDGET.get(backend_name, SHARED_BUDGET["cuda"])
    force = os.environ.get(MMA_ENV, "").strip()   # "0": the scalar kernel
    use_mma = not (W or mask_mode == 2 or force == "0")
    rep = mma_rep(kc, vc, R, D, DV, ks[0][0], vb, budget) if use_mma else None
    talign = int(rep is not None and mma_aligned(rep, D, DV, ks[0][0], vb, budget))
    if rep is not None:
        rb, tabn, sh = 8, 0, 0
    else:
        rb, tabn, sh = row_blocking(R, D, DV, nc, vs[0][1].shape[-1], len(vs), vb, budget)
    if rb == 0:
        return None
    nrg = math.ceil(R / rb)
    kmode = KEY_MODES[kc.METHOD]
    return dict(B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, DV=DV, S=S, G=G, R=R, RB=rb, NRG=nrg, SH=sh,
                MMA=rep, TALIGN=talign,
                TABN=tabn, KMODE=kmode, VMODE=VALUE_MODES[vc.METHOD], MASK=mask_mode,
                kstreams=ks, vstreams=vs, WIN=W, NCOPY=n_copies,
                WCTR=int(bool(W) and bool(getattr(cache, "center_keys", False))),
                # codes are read below SC (the kernel derives the same from S, n and W)
                SC=max(S - n_copies, S - W) if W else S)


def cached_plan(queries: mx.array, keys: dict, values: dict, cache, mask, sinks,
                backend_name: str) -> Optional[dict]:
    """``plan`` for a decode step. Without an fp16 window, sinks or an array mask, plans
    of successive steps differ only in S and the packed arrays: the rest is kept on the
    cache (without the arrays: a kept view of a buffer would stop the next append from
    updating it in place) and those are filled in."""
    if sinks is not None or isinstance(mask, mx.array) or "recent" in keys:
        return plan(queries, keys, values, cache, mask, sinks, backend_name)
    kc, vc = cache.key_codec, cache.value_codec
    S = keys["norm"].shape[2]
    Bk, Hkv = keys["norm"].shape[:2]
    sig = (backend_name, tuple(queries.shape), queries.dtype, mask, kc, vc, (Bk, Hkv))
    memo = getattr(cache, "_fused_plan", None)
    if memo is None or memo[0] != sig or S == 0:
        p = plan(queries, keys, values, cache, mask, sinks, backend_name)
        if S:
            kept = None if p is None else {k: v for k, v in p.items()
                                           if k not in ("kstreams", "vstreams")}
            cache._fused_plan = (sig, kept)
        return p
    if memo[1] is None:
        return None
    return {**memo[1], "S": S, "SC": S, "kstreams": _streams(kc, keys, True),
            "vstreams": _streams(vc, values, False)}


def n_splits(S: int, blocks_per_split: int) -> int:
    """Splits of the sequence (whole tiles each) so the grid has ~TARGET_BLOCKS blocks."""
    # (integer ceilings: every layer of every decode step comes here)
    tiles = -(-S // NT)
    want = max(1, TARGET_BLOCKS // max(1, blocks_per_split))
    per = max(1, -(-tiles // want))
    return -(-tiles // per)


# --------------------------------------------------------------------------- launch

def _consts(cache, scale: float, p: dict) -> dict:
    """Per-(codecs, scale) kernel constants, built and evaluated once, so that a call adds
    no small MLX ops besides the two kernels: padded codebooks, dummies for absent
    streams, and the rotation signs (x scale / sqrt(D)) the kernels apply themselves."""
    kc, vc = cache.key_codec, cache.value_codec
    ent = getattr(cache, "_fused_consts", None)
    if ent is not None and ent[0] is kc and ent[1] is vc and ent[2] == scale:
        return ent[3]

    def pad8(a):
        a = a.astype(mx.float32).reshape(-1)
        return mx.pad(a, (0, max(0, 8 - a.size)))

    ks, vs = p["kstreams"], p["vstreams"]
    rotq = kc.rotation.signs is not None and p["KMODE"] != 2
    rotv = vc.rotation.signs is not None
    D, DV = kc.dim, vc.dim
    cbk2 = ks[1][2] if len(ks) > 1 else mx.zeros((8,))
    if p["KMODE"] == 2:
        cbk2 = cbk2 * kc.gain
    c = dict(
        rotq=rotq, rotv=rotv,
        # qmul[D] = scale: the window block scales the raw queries by it.
        qmul=mx.concatenate([(kc.rotation.signs * (scale / math.sqrt(D))) if rotq
                             else mx.ones((D,)), mx.array([scale])]),
        vmul=(vc.rotation.signs / math.sqrt(DV)) if rotv else mx.ones((DV,)),
        cbk1=pad8(ks[0][2]), cbk2=pad8(cbk2),
        cbv1=pad8(vs[0][2]), cbv2=pad8(vs[1][2] if len(vs) > 1 else mx.zeros((8,))),
        codes_dummy=mx.zeros((1, 1, 1, 8), mx.uint32),
        norm_dummy=mx.zeros((1, 1, 8), mx.float16),
        f32_dummy=mx.zeros((1, 1, 1, 8), mx.float32),
        nk_dummy=mx.zeros((4,), mx.int32), dep_dummy=mx.zeros((4,), mx.uint32),
    )
    mx.eval(c)
    cache._fused_consts = (kc, vc, scale, c)
    return c


def pair_table(codec) -> mx.array:
    """The mma kernel's pair table of an mse codec: word x holds (c[x mod 2^b], c[x >> b])
    as two fp16 (low half first). The kernel repeats each word 2^KREPL times in shared
    memory. Kept on the codec."""
    t = codec.__dict__.get("_pair_table")
    if t is None:
        b = codec.bits
        c = np.array(codec.centroids.astype(mx.float32)).astype(np.float16).view(np.uint16)
        x = np.arange(1 << 2 * b)
        words = c[x & ((1 << b) - 1)].astype(np.uint32) | (c[x >> b].astype(np.uint32) << 16)
        t = codec.__dict__["_pair_table"] = device_resident(mx.array(words))
        mx.eval(t)
    return t


def merged_tables(tables: list) -> tuple[list, mx.array]:
    """One uint32 array holding ``tables`` (float32 ones by their bits), each at a
    multiple of 4 words, and the template constants [(TABLE_OFFSETS[i], word offset)]
    that place them; evaluated, in device memory."""
    words, offsets, at = [], [], 0
    for name, t in zip(TABLE_OFFSETS, tables):
        t = t.reshape(-1)
        if t.dtype == mx.float32:
            t = t.view(mx.uint32)
        elif t.dtype != mx.uint32:
            raise TypeError(f"table {name}: float32 or uint32 words, not {t.dtype}")
        pad = -t.size % 4
        words += [t, mx.zeros((pad,), mx.uint32)] if pad else [t]
        offsets.append((name, at))
        at += t.size + pad
    merged = device_resident(mx.concatenate(words))
    mx.eval(merged)
    return offsets, merged


def device_resident(x: mx.array) -> mx.array:
    """``x`` as the output of a GPU op. On CUDA, MLX keeps arrays made from host data,
    and every array of 8 bytes or less, in managed memory, whose page a host write (of
    that array or of a neighbour) moves back to the CPU; a kernel reading it then waits
    on a GPU page fault (ncu, H200: the live decode kernel 27 µs instead of 11 at 4k, the
    in-place append 7 instead of 4). An op's output over 8 bytes is in device memory, so
    arrays read by every decode step are made this way (and over 8 bytes)."""
    return x + mx.zeros(x.shape, x.dtype)


def fused_inputs(queries: mx.array, keys: dict, values: dict, cache, scale: float, mask,
                 p: dict) -> tuple[list, list, int]:
    """MLX-side preparation: (kernel inputs, template constants, number of splits). On the
    common path (Hadamard rotations, no array mask) this adds no MLX op at all."""
    kc = cache.key_codec
    c = _consts(cache, scale, p)
    B, Hkv, L, D, DV, S, RB, NRG = (p[k] for k in ("B", "Hkv", "L", "D", "DV", "S", "RB", "NRG"))
    (kb1, kc1, _), *rest = p["kstreams"]
    (vb, vc1, _), *vrest = p["vstreams"]
    rows = B * Hkv * NRG
    if p["MMA"] is not None:   # mse keys/values, Hadamard keys: none of the inputs below
        rep = p["MMA"]
        template = [("D", D), ("DV", DV), ("KB", kb1), ("WK", kc1.shape[-1]), ("VB", vb),
                    ("WV", vc1.shape[-1]), ("GQ", p["G"]), ("QL", L), ("MASK", p["MASK"]),
                    ("NT", NT), ("KREPL", rep), ("VREPL", rep), ("TALIGN", p["TALIGN"]),
                    ("QT", queries.dtype), ("LIVE", 0)]
        inputs = [queries, c["qmul"], kc1, keys["norm"], vc1, values["norm"],
                  pair_table(kc), pair_table(cache.value_codec), c["nk_dummy"], c["dep_dummy"]]
        return inputs, template, n_splits(S, rows)
    if c["rotq"]:
        q = queries
        q2 = c["f32_dummy"]
    else:
        q = kc.rotate(queries) * scale
        q2 = (q @ kc.sketch.T) if p["KMODE"] == 2 else c["f32_dummy"]
    kb2, kc2 = (rest[0][0], rest[0][1]) if rest else (0, c["codes_dummy"])
    krn = keys["residual_norm"] if p["KMODE"] == 2 else c["norm_dummy"]
    vc2 = vrest[0][1] if vrest else c["codes_dummy"]
    if p["MASK"] == 2:
        m = mask
        if m.dtype == mx.bool_:
            m = mx.where(m, 0.0, -math.inf)
        m = mx.broadcast_to(m.astype(mx.float32), (B, p["Hq"], L, S))
        m = m.reshape(B, Hkv, p["G"] * L, S)
        pad = NRG * RB - p["G"] * L
        if pad:
            m = mx.pad(m, [(0, 0), (0, 0), (0, pad), (0, 0)])
        m = mx.contiguous(m)
    else:
        m = c["f32_dummy"]
    if p["WIN"]:
        # One more split: the window block (kernel 1's last along x).
        qw, rk, rv = queries, keys["recent"], values["recent"]
        if not c["rotv"]:
            rv = cache.value_codec.rotate(rv.astype(mx.float32))  # dense Π_V: MLX applies it
        kmu = cache.key_mean if p["WCTR"] else c["f32_dummy"]
        nsp = max(1, n_splits(p["SC"], rows)) + 1
    else:
        qw = rk = rv = kmu = c["f32_dummy"]
        nsp = n_splits(S, rows)
    template = [("D", D), ("DV", DV), ("KB1", kb1), ("WK1", kc1.shape[-1]), ("KB2", kb2),
                ("WK2", kc2.shape[-1] if rest else 0), ("KMODE", p["KMODE"]), ("VB", vb),
                ("WV", vc1.shape[-1]), ("VMODE", p["VMODE"]), ("GQ", p["G"]), ("QL", L),
                ("RB", RB), ("NRG", NRG), ("MASK", p["MASK"]), ("ROTQ", int(c["rotq"])),
                ("NT", NT), ("TABN", p["TABN"]), ("SH", p["SH"]), ("QT", q.dtype),
                ("WIN", p["WIN"]), ("WCTR", p["WCTR"]), ("WROTV", int(c["rotv"])),
                ("QWT", qw.dtype), ("RKT", rk.dtype), ("RVT", rv.dtype), ("MUT", kmu.dtype)]
    inputs = [q, c["qmul"], q2, kc1, kc2, keys["norm"], krn, vc1, vc2, values["norm"], m,
              c["cbk1"], c["cbk2"], c["cbv1"], c["cbv2"], qw, rk, rv, kmu, c["vmul"]]
    return inputs, template, nsp


def reduce_groups(DV: int) -> int:
    """Split groups of the combine kernel: DV * SG threads per row, at most 1024 (one
    block per row: the more groups, the fewer rounds of loads per thread)."""
    return max(1, 1024 // DV)


def launcher(template: list, p: dict, backend_name: str, vmul: mx.array, rotv: bool,
             out_dtype):
    """The two kernels as ``run(inputs, nsp)``: split-K partials, then their combination
    (+ Π_Vᵀ when rotv) -> (B, Hq, L, DV) in out_dtype."""
    B, Hkv, NRG, RB, DV, Hq, L = (p[k] for k in ("B", "Hkv", "NRG", "RB", "DV", "Hq", "L"))
    rows = B * Hkv * NRG
    decode_kernel = _kernel(backend_name, "decode" if p.get("MMA") is None else "decode_mma",
                            tuple(template))
    sg = reduce_groups(DV)
    reduce_kernel = _kernel(backend_name, "reduce",
                            (("RB", RB), ("DV", DV), ("GQ", p["G"]), ("QL", L),
                             ("ROTV", int(rotv)), ("OT", out_dtype), ("SG", sg)))
    f32 = [mx.float32] * 3

    def run(inputs: list, nsp: int) -> mx.array:
        opart, mpart, lpart = decode_kernel(
            inputs=inputs, grid=(nsp * NT, rows, 1), threadgroup=(NT, 1, 1),
            output_shapes=[(B, Hkv, NRG, nsp, RB, DV), (B, Hkv, NRG, nsp, RB),
                           (B, Hkv, NRG, nsp, RB)], output_dtypes=f32)
        return reduce_kernel(inputs=[opart, mpart, lpart, vmul],
                             grid=(rows * RB * DV * sg, 1, 1), threadgroup=(DV * sg, 1, 1),
                             output_shapes=[(B, Hq, L, DV)], output_dtypes=[out_dtype])[0]
    return run


FOLD_GROUP = source.FOLD_GROUP


def fold_counter_words(rows: int, nsp: int) -> int:
    """Counters the folded launch needs (source.MMA_FOLD_TAIL): one per row, then per row
    one per group of FOLD_GROUP splits, for ``nsp`` splits."""
    return rows * (1 + -(-nsp // FOLD_GROUP))


def fold_counters(rows: int, nsp: int) -> mx.array:
    """Zeroed counters for up to ``nsp`` splits; at least 4 words, so MLX keeps them in
    device memory."""
    return mx.zeros((max(fold_counter_words(rows, nsp), 4),), mx.uint32)


def fold_launcher(template: list, p: dict, backend_name: str, vmul: Optional[mx.array],
                  out_dtype, name: str = "decode_mma_fold"):
    """The mma kernel with its combine folded in, as ``run(inputs, nsp, extra=())`` -> (B,
    Hq, L, DV) in out_dtype (Π_Vᵀ applied): one launch instead of ``launcher``'s two.
    The kernel's inputs are ``inputs``, vmul (unless None: the appending kernel reads it
    from its tables), its counters and the launch before's output, then ``extra``. Each
    ``run`` owns a counter array (the kernel's ``cnt``), and two launches counting on it
    at once would corrupt it for good. MLX's CUDA graphs may run independent nodes
    concurrently (a test or a benchmark queueing several calls before one eval), so every
    launch takes an output of the one before as an input: the graph orders them."""
    B, Hkv, NRG, RB, DV, Hq, L = (p[k] for k in ("B", "Hkv", "NRG", "RB", "DV", "Hq", "L"))
    rows = B * Hkv * NRG
    kernel = _kernel(backend_name, name, tuple(template) + (("OT", out_dtype),))
    cnt = [fold_counters(rows, TARGET_BLOCKS)]
    prev = [mx.zeros((1,), out_dtype)]
    mx.eval(cnt[0], prev[0])
    dtypes = [mx.float32, out_dtype]
    fixed = [] if vmul is None else [vmul]
    out_shape = (B, Hq, L, DV)
    most = [TARGET_BLOCKS]   # the splits cnt[0] has counters for

    def run(inputs: list, nsp: int, extra=()) -> mx.array:
        if nsp > most[0]:   # (the counters are all zero between launches)
            cnt[0], most[0] = fold_counters(rows, nsp), nsp
        out = kernel(inputs=inputs + fixed + [cnt[0], prev[0], *extra],
                     grid=(nsp * NT, rows, 1), threadgroup=(NT, 1, 1),
                     output_shapes=[(rows * nsp * RB * (DV + 2),), out_shape],
                     output_dtypes=dtypes)[1]
        prev[0] = out
        return out
    return run


def run_fused(queries: mx.array, keys: dict, values: dict, cache, scale: float, mask,
              p: dict, backend_name: str) -> mx.array:
    inputs, template, nsp = fused_inputs(queries, keys, values, cache, scale, mask, p)
    c = _consts(cache, scale, p)
    if c["rotv"]:
        return launcher(template, p, backend_name, c["vmul"], True, queries.dtype)(inputs, nsp)
    out = launcher(template, p, backend_name, c["vmul"], False, mx.float32)(inputs, nsp)
    return cache.value_codec.unrotate(out).astype(queries.dtype)


def _steady(queries: mx.array, keys: dict, values: dict, cache, scale: float, p: dict,
            backend_name: str, fold: bool = False, append: bool = False):
    """``run_fused`` for the following decode steps of the mma kernel (same shapes, no
    mask, only S and the packed views change) with everything else resolved now: the
    per-call Python work of the general path (plan, inputs, template, kernel lookups)
    was ~10 µs a layer, and batch-1 decode waits on host time. The step also takes the
    cache's *live* dicts (cache.py: the whole buffers and "live": (S, positions, done,
    owner)): then the LIVE kernel reads S from the positions and runs after ``done``.
    ``fold``: one launch per step (``fold_launcher``). ``append`` (with ``fold``): a
    token the owner left to attention (its ``_pending``) is coded by that same launch
    (source.MMA_APPEND); ``decode_attention`` passes one only where that launch applies
    (it writes the token first otherwise, ``owner._flush``).
    Returns (step, coded) or None: ``coded(q, k, v, knew, vnew)`` runs the appending
    launch on live dicts k, v (None without ``append``)."""
    inputs, template, _ = fused_inputs(queries, keys, values, cache, scale, None, p)
    c = _consts(cache, scale, p)
    if not c["rotv"]:
        return None
    live_template = template[:-1] + [("LIVE", 1)]
    if fold:
        run = fold_launcher(template, p, backend_name, c["vmul"], queries.dtype)
        run_live = fold_launcher(live_template, p, backend_name, c["vmul"], queries.dtype)
    else:
        run = launcher(template, p, backend_name, c["vmul"], True, queries.dtype)
        run_live = launcher(live_template, p, backend_name, c["vmul"], True, queries.dtype)
    qmul, kpt, vpt, nk, dep = inputs[1], inputs[6], inputs[7], inputs[8], inputs[9]
    rows = p["B"] * p["Hkv"] * p["NRG"]
    run_append = None
    if append and fold:
        from . import encode
        offsets, cdata = merged_tables([qmul, kpt, vpt, c["vmul"],
                                        encode.consts(cache.key_codec),
                                        encode.consts(cache.value_codec)])
        run_append = fold_launcher(live_template + [("NORMT", encode.NORM_DTYPE)] + offsets,
                                   p, backend_name, None, queries.dtype,
                                   "decode_mma_fold_append")

    def live_inputs(q: mx.array, k: dict, v: dict) -> tuple[list, int]:
        """(inputs, splits) of a LIVE launch on live dicts k, v."""
        S, pos, done = k["live"][:3]
        return ([q, qmul, k["codes"], k["norm"], v["codes"], v["norm"], kpt, vpt, pos,
                 dep if done is None else done], n_splits(S, rows))

    def coded(q: mx.array, k: dict, v: dict, knew: mx.array, vnew: mx.array) -> mx.array:
        S, pos, done = k["live"][:3]
        return run_append([q, cdata, k["codes"], k["norm"], v["codes"], v["norm"], pos,
                           dep if done is None else done], n_splits(S, rows), (knew, vnew))

    def step(q: mx.array, k: dict, v: dict) -> mx.array:
        live = k.get("live")
        if live is None:
            kn = k["norm"]
            return run([q, qmul, k["codes"], kn, v["codes"], v["norm"], kpt, vpt, nk, dep],
                       n_splits(kn.shape[2], rows))
        owner = live[3]
        if owner._pending is not None:
            knew, vnew, _ = owner._pending
            out = coded(q, k, v, knew, vnew)
            owner._pending, owner._coded = None, out
            return out
        return run_live(*live_inputs(q, k, v))
    return step, (None if run_append is None else coded)


def live_allowed(steady: tuple) -> bool:
    """Whether a cache whose ``_fused_steady`` memo is ``steady`` may hand attention live
    dicts: not once the LIVE kernel failed its first-use check (every step would then
    wait for its write, ``settle``)."""
    return _checked.get(steady[2]) is not False


def append_allowed(steady: tuple) -> bool:
    """Whether such a cache may leave a decode step's token for attention to code
    (``_steady``'s ``append``): the memo has the appending launch, which has not failed
    its first-use check."""
    return steady[3] is not None and _checked.get(steady[3]) is not False


def settle(packed: dict) -> dict:
    """A cache's live dict (see ``_steady``) as the plain packed views of the keys held,
    for any other reader: writes a token left to attention and waits for the writes (the
    owner's ``_settle``), then slices the buffers. Other dicts pass through."""
    live = packed.get("live")
    if live is None:
        return packed
    live[3]._settle()
    S = live[0]
    return {n: a[:, :, :S] for n, a in packed.items() if n != "live"}


def _steady_sig(queries: mx.array, scale: float, cache) -> tuple:
    """What a ``_steady`` memo was resolved for (S and the packed views may change)."""
    return (queries.shape, queries.dtype, scale, cache.key_codec, cache.value_codec,
            env_state())


# --------------------------------------------------------------------------- dispatch

def _shape_key(p: dict, queries: mx.array, cache, backend_name: str) -> tuple:
    kc, vc = cache.key_codec, cache.value_codec
    return (backend_name, p["B"], p["Hq"], p["Hkv"], p["L"], p["D"], p["DV"], p["MASK"],
            str(queries.dtype), kc.METHOD, kc.bits, vc.METHOD, vc.bits, p["WIN"], p["WCTR"],
            p["MMA"])


def _agrees(out: mx.array, ref: mx.array) -> tuple[bool, float]:
    out32, ref32 = out.astype(mx.float32), ref.astype(mx.float32)
    err = mx.max(mx.abs(out32 - ref32)).item()
    tol = 2e-2 * max(mx.max(mx.abs(ref32)).item(), 1e-3) + 1e-3
    return bool(err <= tol), err


def decode_attention(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                     mask=None, sinks: Optional[mx.array] = None) -> Optional[mx.array]:
    """Fused attention, or None where it does not apply (the caller runs the reference)."""
    steady = getattr(cache, "_fused_steady", None)
    if mask is None and sinks is None and steady is not None and "recent" not in keys \
            and steady[0] == _steady_sig(queries, scale, cache):
        owner = keys["live"][3] if "live" in keys else None
        if owner is not None and owner._pending is not None:
            # The token waits for this launch to code it (cache.py ``_pending``), which
            # reads it in the queries' dtype (the kernel is built for one).
            knew, vnew, at = owner._pending
            usable = at == keys["live"][0] - 1 and knew.dtype == vnew.dtype == queries.dtype
            if steady[3] is not None and usable:
                state = _checked.get(steady[3])
                if state is None:   # first use: judged on copies of the buffers
                    state = first_use(_checked, steady[3], env_mode(),
                                      "decode attention kernel that codes the new token",
                                      "a launch of its own for the append",
                                      *_append_check(queries, keys, values, cache, scale,
                                                     steady[4])) is not None
                if state:   # (``step``'s appending branch inline: host time per layer)
                    out = steady[4](queries, keys, values, knew, vnew)
                    owner._pending, owner._coded = None, out
                    return out
            owner._flush()
        live = _checked.get(steady[2]) if "live" in keys else True
        if live:
            return steady[1](queries, keys, values)
        if live is None:   # the LIVE kernel's first use: judged on the settled views
            from ..attention import reference_attention

            def agree_live(out):
                ref = reference_attention(queries, settle(keys), settle(values), cache,
                                          scale)
                ok, err = _agrees(out, ref)
                return ok, f"max abs error {err:.3g} vs the reference"
            out = first_use(_checked, steady[2], env_mode(), "live decode attention kernel",
                            "the sliced views", lambda: steady[1](queries, keys, values),
                            agree_live)
            if out is not None:
                return out
    keys, values = settle(keys), settle(values)
    mode = env_mode()
    be = active_backend(mode)
    if be is None:
        return None
    p = cached_plan(queries, keys, values, cache, mask, sinks, be)
    if p is None:
        if mode:
            raise RuntimeError(f"{ENV}=1 but the fused kernel does not cover this call "
                               f"(methods, head dim, query length, mask or sinks)")
        return None
    key = _shape_key(p, queries, cache, be)
    state = _checked.get(key)
    if state is False:
        if mode:
            raise RuntimeError(f"{ENV}=1 but the fused kernel failed its check for {key}")
        return None

    def agree(out):
        from ..attention import reference_attention
        ok, err = _agrees(out, reference_attention(queries, keys, values, cache, scale,
                                                   mask, sinks))
        return ok, f"max abs error {err:.3g} vs the reference"
    if state is None:
        # First use for this backend and shape: compare with the reference once.
        return first_use(_checked, key, mode, "fused decode attention kernel",
                         "the reference path",
                         lambda: run_fused(queries, keys, values, cache, scale, mask, p, be),
                         agree)
    if mask is None and sinks is None and "recent" not in keys and p["MMA"] is not None:
        # The steady step, with the combine folded into the decode launch where that
        # passed its own first-use check (CUDA only: see source.MMA_FOLD_TAIL).
        fkey = key + ("fold",)
        fold = be == "cuda" and os.environ.get(FOLD_ENV) != "0" and _checked.get(fkey) is not False
        made = _steady(queries, keys, values, cache, scale, p, be, fold,
                       fold and _appends(p, keys, cache))
        if made is not None:
            step, coded = made
            live_key = key + (("live", "fold") if fold else ("live",))
            append_key = None if coded is None else live_key + ("append",)
            cache._fused_steady = (_steady_sig(queries, scale, cache), step, live_key,
                                   append_key, coded)
            if not fold or _checked.get(fkey):
                return step(queries, keys, values)
            out = first_use(_checked, fkey, mode, "folded decode attention kernel",
                            "two launches a step", lambda: step(queries, keys, values), agree)
            if out is not None:
                return out
            cache._fused_steady = None    # rebuilt without the fold on the next call
    return run_fused(queries, keys, values, cache, scale, mask, p, be)


def _appends(p: dict, keys: dict, cache) -> bool:
    """Whether the steady step of this call may code the decode step's token itself
    (source.MMA_APPEND: one query position, a thread per dim, no key centring or fp16
    window, the norms in the in-place append's dtype); MLX_LM_TURBO_APPEND=0 says no."""
    from .encode import NORM_DTYPE
    return (os.environ.get(APPEND_ENV) != "0" and p["L"] == 1 and p["D"] == p["DV"] == NT
            and not getattr(cache, "center_keys", False)
            and not getattr(cache, "fp16_window", 0) and keys["norm"].dtype == NORM_DTYPE)


def _append_check(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                  coded) -> tuple:
    """(run, agree) for ``first_use`` of the appending launch: it runs on copies of the
    live buffers; the token it codes must equal the codecs' encode (encode.compare's
    rule), nothing else may change, and its output must agree with the reference over
    the copies."""
    from . import encode
    S, _, _, owner = keys["live"]
    knew, vnew, at = owner._pending
    copies = [{n: a + 0 for n, a in d.items() if n != "live"} for d in (keys, values)]

    def run():
        return coded(queries, {**copies[0], "live": keys["live"]},
                     {**copies[1], "live": values["live"]}, knew, vnew)

    def agree(out):
        from ..attention import reference_attention
        mx.eval(out)
        why, ok = [], True
        for codec, got, orig, x in ((cache.key_codec, copies[0], keys, knew),
                                    (cache.value_codec, copies[1], values, vnew)):
            good, w = encode.compare(codec, {n: a[:, :, at:at + 1] for n, a in got.items()},
                                     codec.encode(x))
            moved = sum(not mx.array_equal(got[n][:, :, s], orig[n][:, :, s]).item()
                        for n in got for s in (slice(0, at), slice(at + 1, None)))
            ok = ok and good and moved == 0
            why.append(f"{w}, {moved} other spans changed")
        ref = reference_attention(queries, *({n: a[:, :, :S] for n, a in c.items()}
                                             for c in copies), cache, scale)
        good, err = _agrees(out, ref)
        return ok and good, "; ".join(why) + f"; max abs error {err:.3g} vs the reference"
    return run, agree


def checked_launch(checked: dict, key: tuple, mode: Optional[bool], what: str,
                   fallback: str, run, agree):
    """``run()`` once ``key`` passed its first-use check; None (or, forced, an error) once
    it failed; else the check itself (``first_use``)."""
    state = checked.get(key)
    if state is True:
        return run()
    if state is False:
        if mode:
            raise RuntimeError(f"{ENV}=1 but the {what} failed its check for {key}")
        return None
    return first_use(checked, key, mode, what, fallback, run, agree)


def first_use(checked: dict, key: tuple, mode: Optional[bool], what: str, fallback: str,
              run, agree) -> Optional[mx.array]:
    """Run a kernel for the first time on ``key`` and judge it with ``agree(out) -> (ok,
    why)``; remember the verdict. A compile error or disagreement raises when the kernel
    is forced (``mode``), else warns once and returns None (the caller falls back)."""
    try:
        out = run()
        ok, why = agree(out)
    except Exception as e:  # compile or launch failure
        if mode:
            raise
        ok, why = False, f"{type(e).__name__}: {e}"
    checked[key] = ok
    if ok:
        return out
    if mode:
        raise RuntimeError(f"{what} disagrees with the reference: {why}")
    warnings.warn(f"mlx_lm_turbo: {what} disabled for {key} ({why}); using {fallback}",
                  stacklevel=4)
    return None
