"""``python -m mlx_lm_turbo.gemma3``: the conversion's pure parts on tiny synthetic inputs
(no download): tensor names, norm weights, config, the SentencePiece tokenizer rebuild."""

import json
import random

import numpy as np
import pytest
from conftest import fake_converted_model

from mlx_lm_turbo import gemma3
from mlx_lm_turbo.pypi_models import gguf_tensor_name

# a toy GGUF vocabulary in llama.cpp's form: user-defined pieces with spaces, not "▁"
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  ", "<b>"]
NORMAL = ["▁", "a", "b", "c", "bc", "ab", "▁a", "abc", "▁ab"]  # best score first


def toy_vocab():
    tokens = CONTROL + USER + [f"<0x{i:02X}>" for i in range(256)] + NORMAL
    types = [3] * len(CONTROL) + [4] * len(USER) + [6] * 256 + [1] * len(NORMAL)
    scores = [-1000.0] * (len(CONTROL) + len(USER)) + [0.0] * 256 + \
        [-float(i) for i in range(len(NORMAL))]
    return tokens, scores, types


def encode(tok, text):
    return [tok.id_to_token(i) for i in tok.encode(text).ids]


def test_tensor_names():
    assert gemma3.tensor_name("blk.3.ffn_norm.weight") == \
        "model.layers.3.pre_feedforward_layernorm.weight"
    assert gemma3.tensor_name("blk.3.post_ffw_norm.weight") == \
        "model.layers.3.post_feedforward_layernorm.weight"
    assert gemma3.tensor_name("blk.0.post_attention_norm.weight") == \
        "model.layers.0.post_attention_layernorm.weight"
    assert gemma3.tensor_name("blk.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert gemma3.tensor_name("blk.17.attn_k_norm.weight") == \
        "model.layers.17.self_attn.k_norm.weight"
    assert gemma3.tensor_name("blk.1.attn_output.weight") == \
        "model.layers.1.self_attn.o_proj.weight"
    assert gemma3.tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gemma3.tensor_name("output_norm.weight") == "model.norm.weight"
    # llama / qwen2 names are unchanged
    assert gguf_tensor_name("blk.3.ffn_norm.weight") == \
        "model.layers.3.post_attention_layernorm.weight"
    assert gemma3.is_norm("model.layers.0.self_attn.q_norm.weight")
    assert not gemma3.is_norm("model.layers.0.self_attn.q_proj.weight")


def test_bpe_merges_rank_by_score_and_skip_non_normal_pieces():
    tokens, scores, types = toy_vocab()
    merges = gemma3.bpe_merges(gemma3.spm_pieces(tokens, types), scores, types)
    assert merges == [("b", "c"), ("a", "b"), ("▁", "a"), ("a", "bc"), ("ab", "c"),
                      ("▁", "ab"), ("▁a", "b")]


def test_tokenizer_encodes_like_sentencepiece_bpe():
    tok = gemma3.build_tokenizer(*toy_vocab())
    assert tok.encode("ab").ids[0] == 2  # <bos> in front
    # highest-scoring merge first: b+c, then ▁+a; ▁abc is no piece
    assert encode(tok, " abc")[1:] == ["▁a", "bc"]
    # user-defined pieces whole (two spaces, \n\n, <b>), never merged with neighbours
    assert encode(tok, "a  b\n\n<b>c")[1:] == ["a", "▁▁", "b", "\n\n", "<b>", "c"]
    assert encode(tok, "é")[1:] == ["<0xC3>", "<0xA9>"]  # byte fallback
    assert encode(tok, "<end_of_turn>a")[1:] == ["<end_of_turn>", "a"]
    text = "ab  c\n\n\né <b>abc"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_tokenizer_matches_sentencepiece_on_random_text():
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = toy_vocab()
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id = 3, 2, 1
    m.trainer_spec.pad_id = 0
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    for i, (t, s, y) in enumerate(zip(gemma3.spm_pieces(tokens, types), scores, types)):
        m.pieces.add(piece=t, score=s, type=2 if t == "<unk>" else y)
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    tok = gemma3.build_tokenizer(tokens, scores, types)
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("aabbc  \n<b>é") for _ in range(rng.randint(1, 30)))
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def _meta(tokens, scores, types, layers=6):
    meta = {
        "general.architecture": "gemma3", "gemma3.block_count": layers,
        "gemma3.context_length": 32768, "gemma3.embedding_length": 16,
        "gemma3.feed_forward_length": 32, "gemma3.attention.head_count": 2,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 8,
        "gemma3.attention.value_length": 8, "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": 512,
        "gemma3.attention.layer_norm_rms_epsilon": 9.999999974752427e-07,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_space_prefix": False,
    }
    return meta


def test_model_config():
    reader = type("Reader", (), {})()
    reader.fields = {k: _Field(v) for k, v in _meta(*toy_vocab(), layers=12).items()}
    cfg = gemma3.model_config(reader, "bfloat16")
    assert cfg["model_type"] == "gemma3_text" and cfg["head_dim"] == 8
    assert cfg["query_pre_attn_scalar"] == 8 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["sliding_window"] == 512 and cfg["sliding_window_pattern"] == 6
    assert cfg["rope_local_base_freq"] == 10_000.0 and cfg["rope_theta"] == 1e6
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11]
    assert cfg["eos_token_id"] == [1, CONTROL.index("<end_of_turn>")]
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] == len(toy_vocab()[0])


def test_convert_synthetic_gguf(tmp_path):
    """A tiny float32 gemma3 GGUF -> a folder that mlx-lm loads: norms lose the 1 that
    llama.cpp added, matrices keep their (rows = outputs) layout, sliding layers rotate."""
    gguf = pytest.importorskip("gguf")
    from mlx_lm import load
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    tokens, scores, types = toy_vocab()
    meta = _meta(tokens, scores, types)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3")
    for k, v in meta.items():
        if k == "general.architecture":  # (the writer adds it)
            continue
        if isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    rng = np.random.default_rng(0)
    d, f, hd, vocab = 16, 32, 8, len(tokens)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for i in range(6):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in [
            ("attn_q", (2 * hd, d)), ("attn_k", (hd, d)), ("attn_v", (hd, d)),
            ("attn_output", (d, 2 * hd)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)),
            ("ffn_down", (d, f)), ("attn_norm", (d,)), ("ffn_norm", (d,)),
            ("post_attention_norm", (d,)), ("post_ffw_norm", (d,)), ("attn_q_norm", (hd,)),
            ("attn_k_norm", (hd,))]})
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    for n, a in arrays.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = tmp_path / "out"
    out.mkdir()
    gemma3.convert_gguf(tmp_path / "m.gguf", out, dtype="float32")
    model, tokenizer = load(str(out))
    layer = model.model.layers[2]
    np.testing.assert_allclose(np.array(layer.pre_feedforward_layernorm.weight),
                               arrays["blk.2.ffn_norm.weight"] - 1, rtol=1e-6)
    np.testing.assert_allclose(np.array(layer.self_attn.q_norm.weight),
                               arrays["blk.2.attn_q_norm.weight"] - 1, rtol=1e-6)
    np.testing.assert_array_equal(np.array(layer.self_attn.q_proj.weight),
                                  arrays["blk.2.attn_q.weight"])
    np.testing.assert_array_equal(np.array(model.model.embed_tokens.weight),
                                  arrays["token_embd.weight"])
    kinds = [type(c) for c in make_prompt_cache(model)]
    assert kinds == [RotatingKVCache] * 5 + [KVCache]
    assert tokenizer.encode("a  b") == [2, tokens.index("a"), tokens.index("  "),
                                        tokens.index("b")]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_second_run_reuses_the_folder(tmp_path, monkeypatch):
    out = tmp_path / "m"
    fake_converted_model(out, "gemma3_text")

    def no_download(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(gemma3, "pip_download", no_download)
    assert gemma3.fetch_gemma3(out) == out.absolute()


def test_wrong_wheels_are_refused(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "w").mkdir()
    with pytest.raises(gemma3.ConversionError):
        gemma3.fetch_gemma3(tmp_path / "m", wheels=tmp_path / "w")
    assert not (tmp_path / "m").exists()
