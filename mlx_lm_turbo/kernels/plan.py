"""The decode launch's plan: whether a fused kernel covers a call, which one (the scalar
kernel or the matrix-unit one), its row blocking, shared-memory layout and splits.

Settings (module attributes, read at each plan; the benchmark scripts set them):
``USE_MMA`` (False: the scalar kernel even where the mma one applies) and
``TARGET_BLOCKS`` (the grid size the sequence splits aim for).
"""

import math
from functools import lru_cache
from typing import NamedTuple, Optional

import mlx.core as mx

from .build import NT

MAX_QUERY_LEN = 8
TARGET_BLOCKS = 528           # ~4 blocks per SM of a 132-SM GPU: one wave
USE_MMA = True
# Static shared memory per block (bytes): CUDA allows 48 KiB, Metal 32 KiB.
SHARED_BUDGET = {"cuda": 48 * 1024, "metal": 32 * 1024}

KEY_MODES = {"turboquant_mse": 0, "turboquant_rvq": 1, "turboquant_prod": 2}
VALUE_MODES = {"turboquant_mse": 0, "turboquant_rvq": 1}


class PlanMemo(NamedTuple):
    """A cache's kept plan (``cached_plan``): what it was made for, and the plan without
    its arrays (None: the fused path does not apply)."""
    sig: tuple
    plan: Optional[dict]


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
    kernel (DECODE_MMA_BODY) for mse keys and values with Hadamard keys, or None where it
    does not apply: more than 8 rows, keys above 6 bits or values above 4, a key quarter
    not whole words, a lane's value bits not within two words, or tables that do not fit
    ``budget``."""
    if kc.METHOD != "turboquant_mse" or vc.METHOD != "turboquant_mse":
        return None
    if kc.rotation.signs is None or R > 8 or not (1 <= kb <= 6 and 1 <= vb <= 4):
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
    size (TALIGN: up to a table's size of padding; each lookup one instruction shorter).
    4-bit tables with 16 copies do not fit."""
    tabs = max(3 * (1 << 2 * max(kb, vb) << rep), (NT // 32) * 8 * DV)
    return 4 * tabs + _mma_fixed_bytes(D) <= budget


def plan(queries: mx.array, keys: dict, values: dict, cache, mask, sinks,
         backend_name: str, mma: bool = True) -> Optional[dict]:
    """Static description of the launch, or None when the fused path does not apply.
    ``mma=False``: the scalar kernel even where the matrix-unit one applies."""
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
    use_mma = mma and USE_MMA and not (W or mask_mode == 2)
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
    if memo is None or memo.sig != sig or S == 0:
        p = plan(queries, keys, values, cache, mask, sinks, backend_name)
        if S:
            kept = None if p is None else {k: v for k, v in p.items()
                                           if k not in ("kstreams", "vstreams")}
            cache._fused_plan = PlanMemo(sig, kept)
        return p
    if memo.plan is None:
        return None
    return {**memo.plan, "S": S, "SC": S, "kstreams": _streams(kc, keys, True),
            "vstreams": _streams(vc, values, False)}


def n_splits(S: int, blocks_per_split: int) -> int:
    """Splits of the sequence (whole tiles each) so the grid has ~TARGET_BLOCKS blocks."""
    # (integer ceilings: every layer of every decode step comes here)
    tiles = -(-S // NT)
    want = max(1, TARGET_BLOCKS // max(1, blocks_per_split))
    per = max(1, -(-tiles // want))
    return -(-tiles // per)

