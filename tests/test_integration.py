"""TurboKVCache inside mlx-lm: logits, bytes held, prompt-cache files, trim, the patch."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turbo import patch
from mlx_lm_turbo.attention import reference_attention
from mlx_lm_turbo.cache import STATS_TOKENS, TurboConfig, TurboKVCache
from mlx_lm_turbo.prompt_cache import make_prompt_cache

from conftest import ROOT

patch.apply()


def prefill(model, tokens: mx.array, caches, step: int = 256) -> mx.array:
    out = [model(tokens[None, s:s + step], cache=caches) for s in range(0, tokens.size, step)]
    return mx.concatenate(out, axis=1)[0]


@pytest.mark.slow
def test_real_model_8bit_logits_match_fp16(real_model, wikitext):
    model, tok = real_model
    ids = mx.array(tok.encode(wikitext[:6000])[:512])
    ref = prefill(model, ids, mlx_cache.make_prompt_cache(model))
    out = prefill(model, ids, make_prompt_cache(model, TurboConfig("turboquant_mse", 8)))
    p, q = mx.softmax(ref, -1), mx.softmax(out, -1)
    kl = float((p * (mx.log(p + 1e-20) - mx.log(q + 1e-20))).sum(-1).mean())
    top1 = float((ref.argmax(-1) == out.argmax(-1)).mean())
    # Tolerance: mean KL(fp16 || turbo-8bit) < 2e-3 nats, top-1 agreement >= 97%.
    assert kl < 2e-3 and top1 >= 0.97, (kl, top1)


def walk_arrays(c: TurboKVCache):
    for store in (c.keys, c.values):
        yield from store.values()


@pytest.mark.parametrize("method,bits", [("turboquant_mse", 3), ("turboquant_rvq", 2),
                                         ("polar", 4), ("turboquant_prod", 3)])
def test_bytes_held_after_4k_prefill(tiny_model, method, bits):
    cfg = TurboConfig(method, bits)
    caches = make_prompt_cache(tiny_model, cfg)
    ids = mx.array(np.random.default_rng(0).integers(0, 256, 4096))
    mx.eval(prefill(tiny_model, ids, caches, step=1024))
    head_dim = tiny_model.args.hidden_size // tiny_model.args.num_attention_heads
    for c in caches:
        assert isinstance(c, TurboKVCache) and c.offset == 4096
        elements = 2 * 1 * tiny_model.args.num_key_value_heads * 4096 * head_dim
        assert abs(c.nbytes - c.bits_per_element * elements / 8) <= 0.02 * c.nbytes
        for a in walk_arrays(c):  # packed words and a few fp16 scalars per vector
            assert a.dtype == mx.uint32 or (a.dtype == mx.float16 and (
                a.ndim == 3 or a.shape[-1] <= head_dim // 16)), (a.dtype, a.shape)


def test_centred_keys_leave_attention_unchanged():
    """Scores shift by q·μ for every key alike: attention over centred keys equals
    attention over the same decoded keys with μ added back."""
    c = TurboKVCache("turboquant_mse", 3, center_keys=True)
    k = mx.random.normal((1, 2, 50, 64)) + 5 * mx.random.normal((1, 2, 1, 64))
    kp, vp = c.update_and_fetch(k, mx.random.normal((1, 2, 50, 64)))
    # μ: the mean of the first STATS_TOKENS keys, whatever the block
    mu = k[:, :, :STATS_TOKENS].mean(axis=2, keepdims=True)
    assert float(mx.abs(c.key_mean.astype(mx.float32) - mu).max()) < 1e-2
    q = mx.random.normal((1, 2, 1, 64))
    out = reference_attention(q, kp, vp, c, 0.125)
    kh = c.key_codec.decode(kp) + c.key_mean
    ref = mx.softmax(0.125 * q @ kh.swapaxes(-1, -2), -1) @ c.value_codec.decode(vp)
    assert mx.allclose(out, ref, atol=1e-4)


def test_deepcopy_is_independent():
    import copy

    c = TurboKVCache("turboquant_mse", 3)
    c.update_and_fetch(mx.random.normal((1, 2, 10, 64)), mx.random.normal((1, 2, 10, 64)))
    d = copy.deepcopy(c)
    before = mx.array(c.keys["codes"])
    d.trim(5)
    d.update_and_fetch(mx.random.normal((1, 2, 5, 64)), mx.random.normal((1, 2, 5, 64)))
    assert c.offset == 10 and mx.array_equal(c.keys["codes"], before)
    assert d.key_codec is c.key_codec


def test_config_rejects_key_only_value_method():
    with pytest.raises(ValueError, match="key-only"):
        TurboConfig("turboquant_mse", 4, "qjl", 1)


def test_prompt_cache_file_round_trip(tiny_model, tmp_path):
    ids = mx.array(np.random.default_rng(1).integers(0, 256, 300))
    caches = make_prompt_cache(tiny_model, TurboConfig("turboquant_rvq", 2, seed=7))
    prefill(tiny_model, ids[:-1], caches)
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, caches, {"model": "tiny"})
    loaded, meta = mlx_cache.load_prompt_cache(path, return_metadata=True)
    assert meta["model"] == "tiny" and all(isinstance(c, TurboKVCache) for c in loaded)
    assert loaded[0].seed == 7 and loaded[0].key_bits == 2
    a = tiny_model(ids[None, -1:], cache=caches)
    b = tiny_model(ids[None, -1:], cache=loaded)
    assert mx.array_equal(a, b)


@pytest.mark.parametrize("method", ["turboquant_mse", "turboquant_rvq", "turboquant_prod"])
def test_block_prefill_equals_token_by_token_decode(tiny_model, method):
    """Codes do not depend on how the prompt is split: a 256-token block prefill gives the
    logits of feeding the same tokens one at a time, within float noise."""
    ids = mx.array(np.random.default_rng(5).integers(0, 256, 40))
    block = prefill(tiny_model, ids, make_prompt_cache(tiny_model, TurboConfig(method, 3)))
    caches = make_prompt_cache(tiny_model, TurboConfig(method, 3))
    steps = mx.concatenate([tiny_model(ids[None, i:i + 1], cache=caches)[0] for i in range(40)])
    # (key statistics: every layer's s and μ come from its first STATS_TOKENS keys, so
    # a float-rounding difference there moves all of that layer's codes a little; without
    # the exact first-key rule the difference is ~0.1-0.4)
    assert float(mx.abs(block - steps).max()) < 2e-3


def test_trim_then_refeed_gives_same_logits(tiny_model):
    ids = mx.array(np.random.default_rng(2).integers(0, 256, 100))
    caches = make_prompt_cache(tiny_model, TurboConfig("turboquant_mse", 4))
    prefill(tiny_model, ids[:90], caches)
    first = tiny_model(ids[None, 90:], cache=caches)
    assert mlx_cache.can_trim_prompt_cache(caches)
    assert mlx_cache.trim_prompt_cache(caches, 10) == 10 and caches[0].offset == 90
    again = tiny_model(ids[None, 90:], cache=caches)
    assert mx.allclose(first, again, atol=1e-5)


def test_quantized_kv_start_hands_over_once(tiny_model):
    from mlx_lm.generate import generate_step

    patch.set_config(TurboConfig("turboquant_mse", 4, quantized_kv_start=200))
    caches = mlx_cache.make_prompt_cache(tiny_model)
    assert all(type(c) is mlx_cache.KVCache for c in caches)
    ids = mx.array(np.random.default_rng(3).integers(0, 256, 300))
    for _ in generate_step(ids, tiny_model, max_tokens=2, prompt_cache=caches,
                           prefill_step_size=128, quantized_kv_start=200):
        pass
    assert all(isinstance(c, TurboKVCache) and c.offset >= 300 for c in caches)


def test_without_flags_mlx_lm_is_unchanged(tiny_model):
    patch.set_config(None)
    ids = mx.array(np.random.default_rng(4).integers(0, 256, 64))[None]
    caches = mlx_cache.make_prompt_cache(tiny_model)
    assert all(type(c) is mlx_cache.KVCache for c in caches)
    patched = tiny_model(ids, cache=caches)
    from mlx_lm.models import llama

    saved = llama.scaled_dot_product_attention
    llama.scaled_dot_product_attention = patch._originals["sdpa"]
    try:
        plain = tiny_model(ids, cache=[mlx_cache.KVCache() for _ in caches])
    finally:
        llama.scaled_dot_product_attention = saved
    assert mx.array_equal(patched, plain)


def test_patch_is_idempotent():
    from mlx_lm.models import base, llama

    before = (base.scaled_dot_product_attention, mlx_cache.make_prompt_cache)
    patch.apply()
    patch.apply()
    assert (base.scaled_dot_product_attention, mlx_cache.make_prompt_cache) == before
    assert llama.scaled_dot_product_attention is patch.scaled_dot_product_attention
    assert mlx_cache.TurboKVCache is TurboKVCache


@pytest.mark.parametrize("batch,n_q,n_kv,length", [(2, 4, 2, 1), (3, 6, 2, 5), (1, 4, 4, 7)])
def test_reference_attention_masks_gqa_batch_sinks(batch, n_q, n_kv, length):
    d, s = 64, 40
    c = TurboKVCache("turboquant_mse", 4, layer=3, center_keys=True)
    k, v = mx.random.normal((batch, n_kv, s, d)), mx.random.normal((batch, n_kv, s, d))
    kp, vp = c.update_and_fetch(k, v)
    q = mx.random.normal((batch, n_q, length, d))
    mask = mx.random.uniform(shape=(batch, 1, length, s)) > 0.3
    mask[..., 0] = True
    sinks = mx.random.normal((n_q,))
    out = reference_attention(q, kp, vp, c, 0.125, mask, sinks)
    # Explicit softmax over the decoded vectors (original domain), sink in the denominator.
    kh = mx.repeat(c.key_codec.decode(kp) + c.key_mean, n_q // n_kv, axis=1)
    vh = mx.repeat(c.value_codec.decode(vp), n_q // n_kv, axis=1)
    scores = mx.where(mask, 0.125 * q @ kh.swapaxes(-1, -2), -mx.inf)
    full = mx.concatenate([mx.broadcast_to(sinks[None, :, None, None], (*scores.shape[:-1], 1)),
                           scores], -1)
    ref = mx.softmax(full, -1)[..., 1:] @ vh
    assert mx.allclose(out, ref, atol=1e-4), float(mx.abs(out - ref).max())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_lm_turbo", "generate", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("flags,message", [
    (["--kv-method", "turbo"], "invalid choice"),
    (["--kv-method", "turboquant_mse", "--kv-bits", "0"], "out of range"),
    (["--kv-method", "turboquant_mse", "--kv-bits", "9"], "out of range"),
    (["--kv-method", "turboquant_rvq", "--kv-bits", "5"], "out of range for turboquant_rvq"),
    (["--kv-method", "turboquant_prod", "--kv-value-method", "qjl"], "key-only"),
    (["--kv-key-bits", "3"], "needs --kv-method"),
])
def test_bad_flags_exit_with_argparse_error(flags, message):
    r = run_cli("--model", "unused", "--prompt", "x", *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
# Every method at its sensible bits answers like fp16 ("Paris.") on the raw prompt (the
# chat-templated prompt makes even the fp16 cache of this 135M model ramble). qjl at its
# default 3 bits (outlier coordinates kept exactly; a plain 1-bit sketch was incoherent
# here even at 8 bits).
@pytest.mark.parametrize("method,bits", [("turboquant_mse", 4), ("turboquant_rvq", 2),
                                         ("polar", 4), ("turboquant_prod", 4), ("qjl", 3)])
def test_cli_generates_coherent_text(method, bits, model_dir):
    r = run_cli("--model", str(model_dir), "--kv-method", method, "--kv-bits", str(bits),
                "--prompt", "The capital of France is", "--max-tokens", "20",
                "--ignore-chat-template")
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.split("==========")[1]
    assert answer.strip().startswith("Paris"), answer
    assert "KV cache: " in r.stdout and "30/30 layers compressed" in r.stdout


def test_unsupported_mlx_lm_version_fails_loudly(monkeypatch):
    import mlx_lm

    monkeypatch.setattr(mlx_lm, "__version__", "0.40.1")
    with pytest.raises(RuntimeError, match="supports mlx-lm >= 0.32.0, < 0.33.0; found 0.40.1"):
        patch.check_mlx_lm_version()


def _filled(tokens: int, **settings) -> list:
    caches = [TurboKVCache("turboquant_mse", 4, "turboquant_mse", 4, layer=i, **settings)
              for i in range(2)]
    for c in caches:
        c.update_and_fetch(mx.random.normal((1, 3, tokens, 64)), mx.random.normal((1, 3, tokens, 64)))
    return caches


def test_summary_compares_the_tokens_held_with_fp16():
    """300 tokens sit in 512-token buffers; the line is about the 300."""
    import re

    caches = _filled(300)
    assert caches[0].capacity == 512
    line = patch.cache_summary(caches)
    held, fp16 = map(float, re.search(r"([\d.]+) MiB held vs ([\d.]+) MiB as fp16", line).groups())
    tokens_fp16 = 2 * 2 * 3 * 300 * (64 + 64)  # layers, heads, tokens, K+V dims, 2 bytes
    assert fp16 == round(tokens_fp16 / 2**20, 2), line
    assert held == round(tokens_fp16 * 4.25 / 16 / 2**20, 2), line  # 4 bits + fp16 norm / 64
    assert "4.250 bits/element, 300 tokens" in line and "(3.76x smaller)" in line, line


def test_summary_explains_a_window_longer_than_the_context():
    line = patch.cache_summary(_filled(20, fp16_window=64))
    assert "20.250 bits/element (the 64-token fp16 window holds all 20 tokens" in line, line
    line = patch.cache_summary(_filled(100, fp16_window=16))
    assert "bits/element (incl. the 16-token fp16 window)" in line, line
