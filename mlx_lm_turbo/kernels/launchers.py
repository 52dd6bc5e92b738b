"""The decode kernels' calls: their constant tables and inputs, and launchers that run
the split-K kernel and its combine (``launcher``) or the mma kernel with the combine
folded in (``fold_launcher``).

Pipeline (rotation is linear, so it never touches the keys or values):
  1. MLX: q~ = scale * Π_K q (and for prod keys q' = scale * gain * S q~), rows grouped
     per KV head as (G query heads x L positions), padded to whole row groups.
  2. Kernel 1 (split-K): per (batch, KV head, row group, split) block, scores from packed
     key words, online softmax, value sums in Π_V's domain -> partial (o, m, l).
     For mse keys and values at <= 4 bits with <= 8 rows per KV head, kernel 1 is the
     matrix-unit variant (mma_setup.inc, mma_main.inc; plan.mma_rep).
  3. Kernel 2: combine the splits.
  4. MLX: Π_Vᵀ once, cast to the queries' dtype.
The steady decode step (decode.py) applies Π_Vᵀ in kernel 2, and on CUDA folds kernel 2
into kernel 1 (the last block of a row combines: fold_tail.inc).

With an fp16 window (keys/values carry "recent", cache.py) kernel 1 gets one more split
per row group, the *window block*: it scores the uncompressed copies with the raw queries
(minus the key mean when centred), sums their values and applies Π_V to its partial, so
kernel 2 combines it like any coded split; the coded splits stop where each row's copies
start (attention._with_window's rule). No extra MLX op on the common path.
"""

import math
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from . import plan as planning
from .build import NT, TABLE_OFFSETS, kernel
from .plan import n_splits
from .source import FOLD_GROUP


class ConstsMemo(NamedTuple):
    """A cache's kernel constants (``kernel_constants``) and what they were built for."""
    key_codec: object
    value_codec: object
    scale: float
    consts: dict


def kernel_constants(cache, scale: float, p: dict) -> dict:
    """Per-(codecs, scale) kernel constants, built and evaluated once, so that a call adds
    no small MLX ops besides the two kernels: padded codebooks, dummies for absent
    streams, and the rotation signs (x scale / sqrt(D)) the kernels apply themselves."""
    kc, vc = cache.key_codec, cache.value_codec
    ent = getattr(cache, "_fused_consts", None)
    if ent is not None and ent.key_codec is kc and ent.value_codec is vc \
            and ent.scale == scale:
        return ent.consts

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
    cache._fused_consts = ConstsMemo(kc, vc, scale, c)
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
    on a GPU page fault. An op's output over 8 bytes is in device memory, so
    arrays read by every decode step are made this way (and over 8 bytes)."""
    return x + mx.zeros(x.shape, x.dtype)


def fused_inputs(queries: mx.array, keys: dict, values: dict, cache, scale: float, mask,
                 p: dict) -> tuple[list, list, int]:
    """MLX-side preparation: (kernel inputs, template constants, number of splits). On the
    common path (Hadamard rotations, no array mask) this adds no MLX op at all."""
    kc = cache.key_codec
    c = kernel_constants(cache, scale, p)
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
    decode_kernel = kernel(backend_name, "decode" if p.get("MMA") is None else "decode_mma",
                            tuple(template))
    sg = reduce_groups(DV)
    reduce_kernel = kernel(backend_name, "reduce",
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


def fold_counter_words(rows: int, nsp: int) -> int:
    """Counters the folded launch needs (fold_tail.inc): one per row, then per row
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
    folded = kernel(backend_name, name, tuple(template) + (("OT", out_dtype),))
    cnt = [fold_counters(rows, planning.TARGET_BLOCKS)]
    prev = [mx.zeros((1,), out_dtype)]
    mx.eval(cnt[0], prev[0])
    dtypes = [mx.float32, out_dtype]
    fixed = [] if vmul is None else [vmul]
    out_shape = (B, Hq, L, DV)
    most = [planning.TARGET_BLOCKS]   # the splits cnt[0] has counters for

    def run(inputs: list, nsp: int, extra=()) -> mx.array:
        if nsp > most[0]:   # (the counters are all zero between launches)
            cnt[0], most[0] = fold_counters(rows, nsp), nsp
        out = folded(inputs=inputs + fixed + [cnt[0], prev[0], *extra],
                     grid=(nsp * NT, rows, 1), threadgroup=(NT, 1, 1),
                     output_shapes=[(rows * nsp * RB * (DV + 2),), out_shape],
                     output_dtypes=dtypes)[1]
        prev[0] = out
        return out
    return run


def run_fused(queries: mx.array, keys: dict, values: dict, cache, scale: float, mask,
              p: dict, backend_name: str) -> mx.array:
    inputs, template, nsp = fused_inputs(queries, keys, values, cache, scale, mask, p)
    c = kernel_constants(cache, scale, p)
    if c["rotv"]:
        return launcher(template, p, backend_name, c["vmul"], True, queries.dtype)(inputs, nsp)
    out = launcher(template, p, backend_name, c["vmul"], False, mx.float32)(inputs, nsp)
    return cache.value_codec.unrotate(out).astype(queries.dtype)

