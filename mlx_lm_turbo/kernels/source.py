"""Kernel source text: the files under ``src/``, read once and assembled.

Each kernel body is written once, for Metal (``mx.fast.metal_kernel``) and CUDA
(``mx.fast.cuda_kernel``) alike; ``metal.h`` / ``cuda.h`` map the few macros the bodies
use (see README.md) and a per-backend prelude defines the thread and block indices (on
Metal, MLX adds a thread attribute only where the *source* names it, so these cannot be
header macros).

The files are C with three directives, each a line of its own:

    //@include NAME key=value ...   the text of src/NAME, with these parameters added
    //@if KEY / //@else / //@endif   lines kept where parameter KEY is 1 (or not)

and ``${key}`` in a line is replaced by that parameter's value. An included file sees the
parameters of the file that includes it.
"""

import re
import shlex
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).with_name("src")
FOLD_GROUP = 16   # splits a block of the folded combine's first level merges (fold_tail.inc)

HEADERS = {"metal": "metal.h", "cuda": "cuda.h"}
MMA_HEADERS = {"metal": "metal_mma.h", "cuda": "cuda_mma.h"}
PRELUDES = {"metal": "metal_prelude.inc", "cuda": "cuda_prelude.inc"}

# Each kernel's body: its files in order.
BODIES = {
    "decode": ("decode.inc",),
    "decode_mma": ("mma_setup.inc", "mma_main.inc"),
    "decode_mma_fold": ("fold_parts.inc", "mma_setup.inc", "mma_main.inc", "fold_tail.inc"),
    "decode_mma_fold_append": ("append_tables.inc", "fold_parts.inc", "mma_setup.inc",
                               "mma_append.inc", "mma_main.inc", "fold_tail.inc"),
    "reduce": ("reduce.inc",),
    "encode": ("encode.inc",),
    "encode_inplace": ("encode_in_place.inc", "encode.inc"),
    "dequant": ("dequant.inc",),
}

_PARAM = re.compile(r"\$\{(\w+)\}")


@lru_cache(maxsize=None)
def read(name: str) -> str:
    """The text of ``src/name``."""
    return (SRC / name).read_text()


def _substitute(line: str, params: dict, name: str) -> str:
    def value(m):
        if m.group(1) not in params:
            raise KeyError(f"{name}: no value for ${{{m.group(1)}}}")
        return params[m.group(1)]
    return _PARAM.sub(value, line)


def render(name: str, params: dict) -> str:
    """``src/name`` with its directives carried out and ``params`` substituted."""
    out, stack, active = [], [], True
    for line in read(name).splitlines():
        text = line.strip()
        if text.startswith("//@"):
            op, *args = shlex.split(_substitute(text[3:], params, name))
            if op == "if":
                stack.append((active, params[args[0]] == "1"))
                active = active and stack[-1][1]
            elif op == "else":
                active = stack[-1][0] and not stack[-1][1]
            elif op == "endif":
                active = stack.pop()[0]
            elif op == "include":
                if active:
                    added = dict(a.split("=", 1) for a in args[1:])
                    out.extend(render(args[0], {**params, **added}).splitlines())
            else:
                raise ValueError(f"{name}: unknown directive {text}")
            continue
        if active:
            out.append(_substitute(line, params, name))
    if stack:
        raise ValueError(f"{name}: //@if without //@endif")
    return "\n".join(out) + "\n"


@lru_cache(maxsize=None)
def body(kernel: str) -> str:
    """The shared body of ``kernel`` (a key of BODIES)."""
    params = {"fold_group": str(FOLD_GROUP)}
    return "".join(render(name, params) for name in BODIES[kernel])


@lru_cache(maxsize=None)
def header(backend_name: str, mma: bool = False, threads: int = 0) -> str:
    """The backend header; ``mma``: with the matrix-unit helpers (and on CUDA the launch
    bounds of ``threads`` a block, 4 blocks an SM) for the mma decode kernels."""
    text = read(HEADERS[backend_name])
    if mma:
        text += read(MMA_HEADERS[backend_name])
        if backend_name == "cuda":
            text += render("cuda_launch_bounds.h", {"nt": str(threads), "blocks": "4"})
    return text


def prelude(backend_name: str) -> str:
    """Lines that open every body: thread and block indices as kv_* names."""
    return read(PRELUDES[backend_name])
