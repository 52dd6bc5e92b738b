"""Fused decode attention over packed codes: the decode step.

``decode_attention`` plans the launch (plan.py), checks each new shape once against the
reference it is handed (check.py), and runs the kernels (launchers.py). Once a cache's
shape has passed, the *steady* step (mma kernel, no mask, one query per row group) is
resolved once and kept on the cache (``SteadyStep``): later steps only swap S and the
packed views. The steady step also reads the cache's *live* dicts (``LiveBuffers``: the
whole buffers, written in place by the append) and, on CUDA, may code the step's new
token in the same launch.

Settings (module attributes; the benchmark scripts set them): ``FOLD`` (False: the
steady step keeps a separate combine launch) and ``APPEND`` (False: the new token is
coded by a launch of its own).
"""

from typing import Callable, NamedTuple, Optional

import mlx.core as mx

from ..codecs.common import NORM_DTYPE
from . import check, encode
from . import plan as planning
from .build import NT
from .check import ENV, active_backend, agrees, first_use
from .launchers import (fold_launcher, fused_inputs, kernel_constants, launcher,
                        merged_tables, run_fused)
from .plan import cached_plan, n_splits

FOLD = True
APPEND = True

_checked: dict = {}           # shape key -> True (kernel agreed) / False (use the reference)


class LiveBuffers(NamedTuple):
    """What a cache's live dict carries under "live" (cache.py): the keys held, the
    positions array of the in-place append (int32 [written at, held, 0, 0]), the append's
    ``done`` output (None: nothing to wait for) and the cache itself."""
    held: int
    positions: mx.array
    done: Optional[mx.array]
    owner: object


class SteadyStep(NamedTuple):
    """A cache's resolved steady decode step (``_steady``): the signature it was resolved
    for (``_steady_sig``), the step, the first-use keys of the live and appending launches
    (None: no appending launch) and that launch, ``coded(q, k, v, knew, vnew)``."""
    sig: tuple
    step: Callable
    live_key: tuple
    append_key: Optional[tuple]
    coded: Optional[Callable]


def switches() -> tuple:
    """The settings a kept steady step or append was resolved under (compared per layer
    and step: changing one resolves them again)."""
    return check.MODE, planning.USE_MMA, FOLD, APPEND


def _steady(queries: mx.array, keys: dict, values: dict, cache, scale: float, p: dict,
            backend_name: str, fold: bool = False, append: bool = False):
    """``run_fused`` for the following decode steps of the mma kernel (same shapes, no
    mask, only S and the packed views change) with everything else resolved now: the
    per-call Python work of the general path (plan, inputs, template, kernel lookups)
    is host time, which batch-1 decode waits on. The step also takes the cache's *live*
    dicts (``LiveBuffers``): then the LIVE kernel reads S from the positions and runs
    after ``done``.
    ``fold``: one launch per step (``fold_launcher``). ``append`` (with ``fold``): a
    token the owner left to attention (its ``_pending``) is coded by that same launch
    (mma_append.inc); ``decode_attention`` passes one only where that launch applies
    (it writes the token first otherwise, ``owner._flush``).
    Returns (step, coded) or None: ``coded(q, k, v, knew, vnew)`` runs the appending
    launch on live dicts k, v (None without ``append``)."""
    inputs, template, _ = fused_inputs(queries, keys, values, cache, scale, None, p)
    c = kernel_constants(cache, scale, p)
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
        offsets, cdata = merged_tables([qmul, kpt, vpt, c["vmul"],
                                        encode.consts(cache.key_codec),
                                        encode.consts(cache.value_codec)])
        run_append = fold_launcher(live_template + [("NORMT", NORM_DTYPE)] + offsets,
                                   p, backend_name, None, queries.dtype,
                                   "decode_mma_fold_append")

    def live_inputs(q: mx.array, k: dict, v: dict) -> tuple[list, int]:
        """(inputs, splits) of a LIVE launch on live dicts k, v."""
        live = k["live"]
        return ([q, qmul, k["codes"], k["norm"], v["codes"], v["norm"], kpt, vpt,
                 live.positions, dep if live.done is None else live.done],
                n_splits(live.held, rows))

    def coded(q: mx.array, k: dict, v: dict, knew: mx.array, vnew: mx.array) -> mx.array:
        live = k["live"]
        return run_append([q, cdata, k["codes"], k["norm"], v["codes"], v["norm"],
                           live.positions, dep if live.done is None else live.done],
                          n_splits(live.held, rows), (knew, vnew))

    def step(q: mx.array, k: dict, v: dict) -> mx.array:
        live = k.get("live")
        if live is None:
            kn = k["norm"]
            return run([q, qmul, k["codes"], kn, v["codes"], v["norm"], kpt, vpt, nk, dep],
                       n_splits(kn.shape[2], rows))
        owner = live.owner
        if owner._pending is not None:
            knew, vnew, _ = owner._pending
            out = coded(q, k, v, knew, vnew)
            owner._pending, owner._coded = None, out
            return out
        return run_live(*live_inputs(q, k, v))
    return step, (None if run_append is None else coded)


def live_allowed(steady: SteadyStep) -> bool:
    """Whether a cache whose ``_fused_steady`` memo is ``steady`` may hand attention live
    dicts: not once the LIVE kernel failed its first-use check (every step would then
    wait for its write, ``settle``)."""
    return _checked.get(steady.live_key) is not False


def append_allowed(steady: SteadyStep) -> bool:
    """Whether such a cache may leave a decode step's token for attention to code
    (``_steady``'s ``append``): the memo has the appending launch, which has not failed
    its first-use check."""
    return steady.append_key is not None and _checked.get(steady.append_key) is not False


def settle(packed: dict) -> dict:
    """A cache's live dict (see ``_steady``) as the plain packed views of the keys held,
    for any other reader: writes a token left to attention and waits for the writes (the
    owner's ``_settle``), then slices the buffers. Other dicts pass through."""
    live = packed.get("live")
    if live is None:
        return packed
    live.owner._settle()
    return {n: a[:, :, :live.held] for n, a in packed.items() if n != "live"}


def _steady_sig(queries: mx.array, scale: float, cache) -> tuple:
    """What a ``_steady`` memo was resolved for (S and the packed views may change)."""
    return (queries.shape, queries.dtype, scale, cache.key_codec, cache.value_codec,
            switches())


# --------------------------------------------------------------------------- dispatch

def _shape_key(p: dict, queries: mx.array, cache, backend_name: str) -> tuple:
    kc, vc = cache.key_codec, cache.value_codec
    return (backend_name, p["B"], p["Hq"], p["Hkv"], p["L"], p["D"], p["DV"], p["MASK"],
            str(queries.dtype), kc.METHOD, kc.bits, vc.METHOD, vc.bits, p["WIN"], p["WCTR"],
            p["MMA"])



def decode_attention(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                     mask=None, sinks: Optional[mx.array] = None, *,
                     reference: Callable) -> Optional[mx.array]:
    """Fused attention, or None where it does not apply (the caller runs the reference).
    ``reference(queries, keys, values, cache, scale, mask=None, sinks=None)``: the
    attention a kernel's first launch for a shape is checked against."""
    steady = getattr(cache, "_fused_steady", None)
    if mask is None and sinks is None and steady is not None and "recent" not in keys \
            and steady.sig == _steady_sig(queries, scale, cache):
        owner = keys["live"].owner if "live" in keys else None
        if owner is not None and owner._pending is not None:
            # The token waits for this launch to code it (cache.py ``_pending``), which
            # reads it in the queries' dtype (the kernel is built for one).
            knew, vnew, at = owner._pending
            usable = at == keys["live"].held - 1 and knew.dtype == vnew.dtype == queries.dtype
            if steady.append_key is not None and usable:
                state = _checked.get(steady.append_key)
                if state is None:   # first use: judged on copies of the buffers
                    state = first_use(_checked, steady.append_key, check.MODE,
                                      "decode attention kernel that codes the new token",
                                      "a launch of its own for the append",
                                      *_append_check(queries, keys, values, cache, scale,
                                                     steady.coded, reference)) is not None
                if state:   # (``step``'s appending branch inline: host time per layer)
                    out = steady.coded(queries, keys, values, knew, vnew)
                    owner._pending, owner._coded = None, out
                    return out
            owner._flush()
        live = _checked.get(steady.live_key) if "live" in keys else True
        if live:
            return steady.step(queries, keys, values)
        if live is None:   # the LIVE kernel's first use: judged on the settled views
            def agree_live(out):
                ok, err = agrees(out, reference(queries, settle(keys), settle(values), cache,
                                                scale))
                return ok, f"max abs error {err:.3g} vs the reference"
            out = first_use(_checked, steady.live_key, check.MODE,
                            "live decode attention kernel", "the sliced views",
                            lambda: steady.step(queries, keys, values), agree_live)
            if out is not None:
                return out
    keys, values = settle(keys), settle(values)
    mode = check.MODE
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
    if state is False and p["MMA"] is not None:
        # The matrix-unit kernel failed its check for this shape: the scalar one
        # (checked in turn) before the reference.
        p = planning.plan(queries, keys, values, cache, mask, sinks, be, mma=False)
        if p is None:
            return None
        key = _shape_key(p, queries, cache, be)
        state = _checked.get(key)
    if state is False:
        if mode:
            raise RuntimeError(f"{ENV}=1 but the fused kernel failed its check for {key}")
        return None

    def agree(out):
        ok, err = agrees(out, reference(queries, keys, values, cache, scale, mask, sinks))
        return ok, f"max abs error {err:.3g} vs the reference"
    if state is None:
        # First use for this backend and shape: compare with the reference once.
        return first_use(_checked, key, mode, "fused decode attention kernel",
                         "the reference path",
                         lambda: run_fused(queries, keys, values, cache, scale, mask, p, be),
                         agree)
    if mask is None and sinks is None and "recent" not in keys and p["MMA"] is not None:
        # The steady step, with the combine folded into the decode launch where that
        # passed its own first-use check (CUDA only: see fold_tail.inc).
        fkey = key + ("fold",)
        fold = be == "cuda" and FOLD and _checked.get(fkey) is not False
        made = _steady(queries, keys, values, cache, scale, p, be, fold,
                       fold and _appends(p, keys, cache))
        if made is not None:
            step, coded = made
            live_key = key + (("live", "fold") if fold else ("live",))
            append_key = None if coded is None else live_key + ("append",)
            cache._fused_steady = SteadyStep(_steady_sig(queries, scale, cache), step,
                                             live_key, append_key, coded)
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
    (mma_append.inc: one query position, a thread per dim, no fp16 window, the norms in
    the in-place append's dtype); APPEND = False says no. Key statistics need nothing of
    the launch: the pending key is already held as (k - μ)/s (cache._write_in_place)."""
    return (APPEND and p["L"] == 1 and p["D"] == p["DV"] == NT
            and not getattr(cache, "fp16_window", 0) and keys["norm"].dtype == NORM_DTYPE
            and not getattr(cache.key_codec, "plain_scale", False))


def _append_check(queries: mx.array, keys: dict, values: dict, cache, scale: float,
                  coded, reference: Callable) -> tuple:
    """(run, agree) for ``first_use`` of the appending launch: it runs on copies of the
    live buffers; the token it codes must equal the codecs' encode (encode.compare's
    rule), nothing else may change, and its output must agree with the reference over
    the copies."""
    S, owner = keys["live"].held, keys["live"].owner
    knew, vnew, at = owner._pending
    copies = [{n: a + 0 for n, a in d.items() if n != "live"} for d in (keys, values)]

    def run():
        return coded(queries, {**copies[0], "live": keys["live"]},
                     {**copies[1], "live": values["live"]}, knew, vnew)

    def agree(out):
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
        ref = reference(queries, *({n: a[:, :, :S] for n, a in c.items()}
                                   for c in copies), cache, scale)
        good, err = agrees(out, ref)
        return ok and good, "; ".join(why) + f"; max abs error {err:.3g} vs the reference"
    return run, agree

