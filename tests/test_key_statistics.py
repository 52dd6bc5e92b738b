"""Keys with a large shared offset and outlier channels (Qwen2.5's: k bias up to 145, a
few low-frequency RoPE channels 10-100x the median RMS): the default cache must stay
close to fp16 and get better with every bit; raw keys (no statistics) must not, which
shows the model below really has the structure."""


import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turbo import patch
from mlx_lm_turbo.cache import STATS_TOKENS, TurboConfig, TurboKVCache
from mlx_lm_turbo.prompt_cache import make_prompt_cache

patch.apply()

HEAD_DIM = 64


@pytest.fixture(scope="module")
def offset_model():
    return build_offset_model()


def build_offset_model(loudness=(10, 40)):
    """A 2-layer random qwen2 (4 q / 2 KV heads, head_dim 64) whose k and q biases put a
    large common offset on head channels 31 and 63 (the lowest RoPE frequencies, which
    barely rotate) and whose k rows make 6 channels per head 10-40x louder than the rest."""
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=256, num_hidden_layers=2,
                           intermediate_size=512, num_attention_heads=4, rms_norm_eps=1e-6,
                           vocab_size=512, num_key_value_heads=2, rope_theta=1e6,
                           tie_word_embeddings=False)
    mx.random.seed(3)
    model = qwen2.Model(args)
    rng = np.random.default_rng(3)
    for layer in model.model.layers:
        att = layer.self_attn
        kb = rng.normal(0, 3, (2, HEAD_DIM)).astype(np.float32)
        kb[:, [31, 63]] = rng.choice([-1, 1], (2, 2)) * rng.uniform(80, 145, (2, 2))
        wk = np.array(att.k_proj.weight).reshape(2, HEAD_DIM, -1)
        loud = [29, 30, 31, 61, 62, 63]
        wk[:, loud] *= rng.uniform(*loudness, (2, len(loud), 1))
        att.k_proj.weight = mx.array(wk.reshape(2 * HEAD_DIM, -1))
        att.k_proj.bias = mx.array(kb.reshape(-1))
        qb = np.zeros((4, HEAD_DIM), np.float32)
        qb[:, [31, 63]] = rng.normal(0, 1.5, (4, 2))
        att.q_proj.bias = mx.array(qb.reshape(-1))
    model.lm_head.weight = model.lm_head.weight * 3   # a peaked next-token distribution
    mx.eval(model.parameters())
    return model


def next_token_kl(model, config, tokens, block=64) -> float:
    """Mean KL(fp16 || cache) of the next-token distributions, prefill in blocks."""
    def run(caches):
        out = [model(tokens[None, s:s + block], cache=caches)
               for s in range(0, tokens.size, block)]
        return mx.concatenate(out, axis=1)[0].astype(mx.float32)

    from mlx_lm.models.cache import make_prompt_cache as fp_cache

    ref = run(fp_cache(model))
    got = run(make_prompt_cache(model, config))
    lp, lq = ref - mx.logsumexp(ref, -1, keepdims=True), got - mx.logsumexp(got, -1, keepdims=True)
    return float((mx.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(0).integers(0, 512, 320))


def test_keys_have_the_structure(offset_model, tokens):
    """The fixture's keys look like Qwen2.5's (else the test below proves nothing)."""
    from mlx_lm_turbo.ratequant import CalibrationCache

    caches = [CalibrationCache() for _ in offset_model.layers]
    mx.eval(offset_model(tokens[None], cache=caches))
    k = caches[0].keys[:, :, :caches[0].offset].astype(mx.float32)
    mu = k.mean(axis=2, keepdims=True)
    share = float(mx.sqrt((mu * mu).sum(-1)).mean() / mx.sqrt((k * k).sum(-1).mean()))
    rms = np.array(mx.sqrt(((k - mu) ** 2).mean(axis=2))[0])
    assert share > 0.7 and (rms / np.median(rms, -1, keepdims=True)).max() > 10


def test_default_is_close_to_fp16_and_monotonic_in_bits(offset_model, tokens):
    kl = {b: next_token_kl(offset_model, TurboConfig("turboquant_mse", b), tokens)
          for b in (2, 3, 4, 8)}
    assert kl[2] > kl[3] > kl[4] > kl[8], kl
    # near fp16 at 4 bits (raw keys: ~0.75 nats here, and ~0.01 at 8 bits)
    assert kl[4] < 0.1, kl
    raw = {b: next_token_kl(offset_model, TurboConfig("turboquant_mse", b, center_keys=False,
                                                      scale_keys=False), tokens)
           for b in (3, 4)}
    # raw keys: the offset and outliers set every key's error
    assert raw[4] > 5 * kl[4] and raw[3] > 3 * kl[3], (raw, kl)


def test_statistics_do_not_depend_on_the_split(offset_model, tokens):
    """Codes from one block equal codes from single tokens (once STATS_TOKENS arrived)."""
    keys = mx.random.normal((1, 2, 80, HEAD_DIM)) * 20 + 100
    values = mx.random.normal((1, 2, 80, HEAD_DIM))
    cfg = TurboConfig("turboquant_mse", 3)
    a, b = TurboKVCache.from_config(cfg, 0), TurboKVCache.from_config(cfg, 0)
    a.update_and_fetch(keys, values)
    for i in range(80):
        b.update_and_fetch(keys[:, :, i:i + 1], values[:, :, i:i + 1])
    ka, kb = a.keys_and_values()[0], b.keys_and_values()[0]
    for name in ka:
        assert mx.array_equal(ka[name], kb[name]), name
    assert mx.array_equal(a.key_scale, b.key_scale) and mx.array_equal(a.key_mean, b.key_mean)
    assert b.first_keys is None and a.nbytes == b.nbytes


def test_statistics_are_counted_and_saved():
    keys = mx.random.normal((1, 2, STATS_TOKENS - 4, HEAD_DIM)).astype(mx.float16) * 9 + 50
    values = mx.random.normal(keys.shape).astype(mx.float16)
    c = TurboKVCache.from_config(TurboConfig("turboquant_mse", 4), 0)
    c.update_and_fetch(keys, values)
    raw = TurboKVCache("turboquant_mse", 4)
    raw.update_and_fetch(keys, values)
    # the exact first keys are held (and counted) until the statistics are fixed
    assert c.nbytes >= raw.nbytes + keys.nbytes
    d = TurboKVCache.__new__(TurboKVCache)
    d.state = c.state
    more = mx.random.normal((1, 2, 8, HEAD_DIM)).astype(mx.float16) * 9 + 50
    for x in (c, d):
        x.update_and_fetch(more, more)
    assert c.first_keys is None and d.first_keys is None
    assert mx.array_equal(c.key_scale, d.key_scale)
    kc, kd = c.keys_and_values()[0], d.keys_and_values()[0]
    assert all(mx.array_equal(kc[n], kd[n]) for n in kc)
    fp = c.to_fp16()
    full = mx.concatenate([keys, more], axis=2).astype(mx.float32)
    err = mx.linalg.norm(fp.keys[:, :, :full.shape[2]].astype(mx.float32) - full)
    assert float(err / mx.linalg.norm(full - full.mean(axis=2, keepdims=True))) < 0.2


def test_statistics_of_bf16_keys_cast_exactly():
    """Every path applies the statistics in the keys' dtype (cache.stats_in): for bf16
    keys they are bf16 values, so queries (q·s) and keys (k/s - μ/s) use the very same."""
    from mlx_lm_turbo.key_statistics import key_statistics
    keys = (mx.random.normal((1, 2, 64, HEAD_DIM), key=mx.random.key(1)) * 3 + 20)
    for dtype in (mx.bfloat16, mx.float16):
        s, m = key_statistics(keys.astype(dtype), True, True)
        for a in (s, m):
            assert mx.array_equal(a.astype(dtype).astype(mx.float16), a)
    c = TurboKVCache("turboquant_mse", 4, center_keys=True, scale_keys=True)
    c.update_and_fetch(keys.astype(mx.bfloat16), keys.astype(mx.bfloat16))
    q = c.stats_in(mx.bfloat16, 6).query_scale
    assert q.shape == (1, 6, 1, HEAD_DIM) and q.dtype == mx.bfloat16
    assert mx.array_equal(q[:, 3], c.key_scale[:, 1].astype(mx.bfloat16))
