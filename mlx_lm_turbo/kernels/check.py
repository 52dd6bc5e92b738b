"""Where the kernels run, and their first-use check.

``MLX_LM_TURBO_KERNELS`` is read once, at import, into ``MODE``: ``0`` forces the
reference paths, ``1`` forces the kernels (a failure raises), anything else (the default)
runs a kernel where it applies and checks it once. Every kernel's first launch for a shape
is compared with its reference (``first_use``); a compile error or disagreement gives one
warning and the reference from then on.
"""

import os
import warnings
from functools import lru_cache
from typing import Optional

import mlx.core as mx

ENV = "MLX_LM_TURBO_KERNELS"


def parse_mode(value: Optional[str]) -> Optional[bool]:
    """False (kernels off), True (forced) or None (auto) for a value of ENV."""
    v = (value or "").strip().lower()
    if v in ("0", "false", "off", "no"):
        return False
    if v in ("1", "true", "on", "yes"):
        return True
    return None


MODE = parse_mode(os.environ.get(ENV))


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
    """The GPU backend a kernel would run on under ``mode`` (see MODE), or None (kernels
    off, or no GPU: the caller falls back); raises when forced without a GPU."""
    if mode is False:
        return None
    be = backend()
    if be is None and mode:
        raise RuntimeError(f"{ENV}=1 but no Metal or CUDA GPU backend is active")
    return be


def agrees(out: mx.array, ref: mx.array) -> tuple[bool, float]:
    """Whether an attention output agrees with the reference's (2% of its largest entry),
    and the largest absolute difference."""
    out32, ref32 = out.astype(mx.float32), ref.astype(mx.float32)
    err = mx.max(mx.abs(out32 - ref32)).item()
    tol = 2e-2 * max(mx.max(mx.abs(ref32)).item(), 1e-3) + 1e-3
    return bool(err <= tol), err


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
