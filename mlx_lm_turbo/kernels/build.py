"""Kernel objects: the shared body of a kernel (source.py) specialised for one backend and
one set of template values, built once and kept.

MLX re-renders a custom kernel's source and formats every template value on each call, so
each specialisation gets a kernel object of its own with its values baked into the text as
constants: a call passes no template. Inputs are read through their strides (cache slices
and transposed key views arrive without a copy).
"""

import hashlib
import os

import mlx.core as mx

from . import source

NT = 128                      # threads per decode block = keys per tile

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
    """Kernel text without comments, indentation or blank lines: MLX hashes a custom
    kernel's whole source each time it evaluates one (host time of every decode step)."""
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
    carries the matrix-unit helpers (the mma decode kernels)."""
    head = constants(template, backend_name) if template else ""
    header = source.header(backend_name, mma, NT)
    return compact(header), compact(head + source.prelude(backend_name) + body)


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
    ``template``: its values are baked into the source, so a call passes no template."""
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
    evaluation, and batch-1 decode waits on host time. The one-line source also lists
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


# name -> (input names, output names) of the decode-path kernels (bodies: source.BODIES)
SIGNATURES = {"decode": (DECODE_INPUTS, DECODE_OUTPUTS),
              "decode_mma": (MMA_INPUTS, DECODE_OUTPUTS),
              "decode_mma_fold": (FOLD_INPUTS, FOLD_OUTPUTS),
              "decode_mma_fold_append": (APPEND_INPUTS, FOLD_OUTPUTS),
              "reduce": (REDUCE_INPUTS, REDUCE_OUTPUTS)}
_kernels: dict = {}           # (backend, name, template) -> kernel object


def kernel(backend_name: str, name: str, template: tuple):
    """The kernel object of decode-path kernel ``name`` for ``template`` (built once)."""
    key = (backend_name, name, template)
    made = _kernels.get(key)
    if made is None:
        inputs, outputs = SIGNATURES[name]
        made = _kernels[key] = build_kernel(source.body(name), backend_name, name, inputs,
                                            outputs, template,
                                            mma=name.startswith("decode_mma"))
    return made
