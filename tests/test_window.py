"""The fp16 window (--kv-fp16-window): exact per-query rule, bytes, files, trim, quality."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turbo import patch
from mlx_lm_turbo.attention import reference_attention
from mlx_lm_turbo.cache import STATS_TOKENS, TurboConfig, TurboKVCache
from mlx_lm_turbo.prompt_cache import make_prompt_cache

patch.apply()


def prefill(model, tokens: mx.array, caches, step: int = 256) -> mx.array:
    out = [model(tokens[None, s:s + step], cache=caches) for s in range(0, tokens.size, step)]
    return mx.concatenate(out, axis=1)[0]


def manual_attention(q, k, v, cache, W, scale, extra_mask=None):
    """Attention spelled out: query i reads keys i-W < j <= i from fp16 copies, the rest
    from the codes (decoded), causal."""
    kc, vc = cache.key_codec, cache.value_codec
    kd, vd = kc.decode(kc.encode(k)), vc.decode(vc.encode(v))
    k16, v16 = (a.astype(mx.float16).astype(mx.float32) for a in (k, v))
    G = q.shape[1] // k.shape[1]
    kd, vd, k16, v16 = (mx.repeat(a, G, axis=1) for a in (kd, vd, k16, v16))
    S = k.shape[2]
    i, j = mx.arange(S)[:, None], mx.arange(S)[None]
    near = (i - j < W) & (j <= i)
    s = mx.where(near, q @ k16.swapaxes(-1, -2), q @ kd.swapaxes(-1, -2)) * scale
    s = mx.where(j <= i, s, -mx.inf)
    if extra_mask is not None:
        s = s + extra_mask
    p = mx.softmax(s, axis=-1)
    return mx.where(near, p, 0) @ v16 + mx.where(near, 0, p) @ vd


@pytest.mark.parametrize("method,block", [("turboquant_mse", 1), ("turboquant_mse", 7),
                                          ("turboquant_rvq", 64)])
def test_window_attention_is_the_per_query_rule(method, block):
    B, Hk, G, D, S, W = 2, 2, 3, 64, 150, 16
    k, v, q = (mx.random.normal(s, key=mx.random.key(n)) for n, s in
               enumerate([(B, Hk, S, D), (B, Hk, S, D), (B, Hk * G, S, D)]))
    c = TurboKVCache(method, 2, method, 2, fp16_window=W)
    outs = []
    for s0 in range(0, S, block):
        kp, vp = c.update_and_fetch(k[:, :, s0:s0 + block], v[:, :, s0:s0 + block])
        L = min(block, S - s0)
        outs.append(reference_attention(q[:, :, s0:s0 + L], kp, vp, c, 0.125,
                                        "causal" if L > 1 else None))
    got = mx.concatenate(outs, axis=2)
    want = manual_attention(q, k, v, c, W, 0.125)
    assert float(mx.abs(got - want).max()) < 1e-4
    assert c.recent_keys.shape == (B, Hk, W, D) and c.recent_keys.dtype == mx.float16


def test_window_with_additive_and_bool_masks():
    B, Hk, G, D, S, W = 1, 2, 2, 64, 40, 8
    k, v, q = (mx.random.normal(s) for s in [(B, Hk, S, D), (B, Hk, S, D), (B, Hk * G, S, D)])
    extra = mx.where(mx.random.uniform(shape=(S, S)) < 0.2, -mx.inf, 0.0)
    extra = mx.where(mx.eye(S, dtype=mx.bool_), 0.0, extra)    # every row keeps a key
    causal = mx.where(mx.arange(S)[None] <= mx.arange(S)[:, None], 0.0, -mx.inf)
    for mask in (extra + causal, (extra + causal) == 0):
        c = TurboKVCache("turboquant_mse", 3, fp16_window=W)
        kp, vp = c.update_and_fetch(k, v)
        got = reference_attention(q, kp, vp, c, 0.125, mask)
        want = manual_attention(q, k, v, c, W, 0.125, extra)
        assert float(mx.abs(got - want).max()) < 1e-4


def test_block_prefill_equals_token_by_token_decode(tiny_model):
    # (past STATS_TOKENS: queries below it read exact keys, window or not)
    n = STATS_TOKENS + 40
    ids = mx.array(np.random.default_rng(5).integers(0, 256, n))
    cfg = TurboConfig("turboquant_mse", 3, fp16_window=8)
    block = prefill(tiny_model, ids, make_prompt_cache(tiny_model, cfg))
    caches = make_prompt_cache(tiny_model, cfg)
    steps = mx.concatenate([tiny_model(ids[None, i:i + 1], cache=caches)[0] for i in range(n)])
    # (key statistics: every layer's s and μ come from its first STATS_TOKENS keys, so
    # a float-rounding difference there moves all of that layer's codes a little; without
    # the exact first-key rule the difference is ~0.1-0.4)
    assert float(mx.abs(block - steps).max()) < 2e-3
    # ... and the window changes the result (it is used at all).
    plain = prefill(tiny_model, ids, make_prompt_cache(tiny_model, TurboConfig("turboquant_mse", 3)))
    assert float(mx.abs(block - plain).max()) > 1e-3


def test_window_bytes_are_counted(tiny_model):
    W = 32
    caches = make_prompt_cache(tiny_model, TurboConfig("turboquant_mse", 3, fp16_window=W))
    ids = mx.array(np.random.default_rng(0).integers(0, 256, 4096))
    mx.eval(prefill(tiny_model, ids, caches, step=1024))
    head_dim = tiny_model.args.hidden_size // tiny_model.args.num_attention_heads
    heads = tiny_model.args.num_key_value_heads
    plain = TurboKVCache.from_config(TurboConfig("turboquant_mse", 3), 0)   # no window
    plain.update_and_fetch(mx.zeros((1, heads, 4096, head_dim)), mx.zeros((1, heads, 4096, head_dim)))
    for c in caches:
        window_bytes = 2 * 2 * heads * W * head_dim            # K and V, 2 bytes each
        assert c.nbytes == plain.nbytes + window_bytes
        elements = 2 * heads * 4096 * head_dim
        assert abs(c.nbytes - c.bits_per_element * elements / 8) <= 0.02 * c.nbytes


def test_file_round_trip_and_trim(tiny_model, tmp_path):
    ids = mx.array(np.random.default_rng(1).integers(0, 256, 120))
    cfg = TurboConfig("turboquant_mse", 3, fp16_window=16)
    caches = make_prompt_cache(tiny_model, cfg)
    prefill(tiny_model, ids[:100], caches)
    path = str(tmp_path / "w.safetensors")
    mlx_cache.save_prompt_cache(path, caches)
    loaded = mlx_cache.load_prompt_cache(path)
    assert loaded[0].fp16_window == 16 and loaded[0].recent_keys.shape[2] == 16
    a = tiny_model(ids[None, 100:], cache=caches)
    b = tiny_model(ids[None, 100:], cache=loaded)
    assert mx.array_equal(a, b)
    # Trim 20 (the 16 copies go with them), re-feed: codes are read where copies are
    # gone, so compare with a cache that never held those copies.
    assert mlx_cache.trim_prompt_cache(loaded, 20) == 20 and loaded[0].recent_keys.shape[2] == 0
    again = tiny_model(ids[None, 100:], cache=loaded)
    fresh = make_prompt_cache(tiny_model, cfg)
    prefill(tiny_model, ids[:100], fresh)
    for c in fresh:
        c.recent_keys, c.recent_values = c.recent_keys[:, :, :0], c.recent_values[:, :, :0]
    assert float(mx.abs(again - tiny_model(ids[None, 100:], cache=fresh)).max()) < 1e-4


def test_to_fp16_uses_the_exact_copies():
    k, v = mx.random.normal((1, 2, 30, 64)), mx.random.normal((1, 2, 30, 64))
    c = TurboKVCache("turboquant_mse", 2, fp16_window=10)
    c.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    kv = c.to_fp16()
    assert mx.array_equal(kv.keys[:, :, 20:30], k[:, :, 20:].astype(mx.float16))
    assert float(mx.abs(kv.keys[:, :, :20] - k[:, :, :20]).max()) > 0.05   # coded


@pytest.mark.slow
def test_window_lowers_perplexity_on_the_real_model(real_model, wikitext):
    """The reason the option exists: 16 fp16 tokens recover much of the loss of
    ``--kv-bits 3`` (4-bit keys, 2-bit values)."""
    model, tokenizer = real_model
    ids = mx.array(tokenizer.encode(wikitext)[:512])

    def nll(config):
        logits = prefill(model, ids[:-1], make_prompt_cache(model, config)).astype(mx.float32)
        return float(mx.mean(mx.logsumexp(logits, -1) - logits[mx.arange(511), ids[1:]]))

    fp16 = nll(TurboConfig("turboquant_mse", 8, fp16_window=512))   # every key exact
    plain = nll(TurboConfig("turboquant_mse", 4, value_bits=2))
    windowed = nll(TurboConfig("turboquant_mse", 4, value_bits=2, fp16_window=16))
    # At least half of the gap to fp16 closed.
    assert windowed - fp16 < 0.5 * (plain - fp16), (fp16, plain, windowed)


def _kv(n, seed, H=2, D=32):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal((1, H, n, D), key=k1), mx.random.normal((1, H, n, D), key=k2)


def _single(blocks, W):
    c = TurboKVCache("turboquant_mse", 3, seed=7, layer=1, fp16_window=W)
    for k, v in blocks:
        c.update_and_fetch(k, v)
    return c


def _decode_both(batch, singles, steps: int, seed: int, compare_from: int) -> None:
    """Decode the same new tokens through the batch and each request; from step
    ``compare_from`` on, batched attention must equal each request's."""
    n = len(singles)
    q = mx.random.normal((n, 4, 1, 32), key=mx.random.key(seed))
    for step in range(steps):
        new = [_kv(1, seed + 10 * step + i) for i in range(n)]
        mask = batch.make_mask(1)
        kb, vb = batch.update_and_fetch(mx.concatenate([x[0] for x in new]),
                                        mx.concatenate([x[1] for x in new]))
        out_b = reference_attention(q, kb, vb, batch, 0.125, mask=mask)
        for i, c in enumerate(singles):
            k, v = c.update_and_fetch(*new[i])
            if step >= compare_from:
                out = reference_attention(q[i:i + 1], k, v, c, 0.125)
                np.testing.assert_allclose(np.array(out_b[i:i + 1]), np.array(out), atol=1e-5)


def test_batched_decode_with_window_equals_per_request():
    """Requests of 5 (two blocks), 0, 2 (all tokens have copies) and 12 tokens; W = 4."""
    import copy

    W = 4
    caches = [_single(b, W) for b in ([_kv(3, 1), _kv(2, 2)], [], [_kv(2, 3)], [_kv(12, 4)])]
    batch = TurboKVCache.merge([copy.deepcopy(c) for c in caches])
    assert batch.recent_keys.shape[2] == W
    _decode_both(batch, caches, steps=W + 2, seed=100, compare_from=0)
    for i, c in enumerate(caches):
        e = batch.extract(i)
        assert e.fp16_window == W and e.offset == c.offset
        assert mx.array_equal(e.recent_keys, c.recent_keys)


def test_right_padded_prefill_with_window_then_decode():
    W, lengths = 6, [6, 9, 7]
    prompts = [_kv(n, 30 + i) for i, n in enumerate(lengths)]
    batch = TurboKVCache.merge([TurboKVCache("turboquant_mse", 3, seed=7, layer=1,
                                             fp16_window=W) for _ in lengths])
    L, junk = max(lengths), _kv(max(lengths), 99)
    pad = lambda i, w: mx.concatenate([prompts[i][w], junk[w][:, :, :L - lengths[i]]], axis=2)  # noqa: E731
    batch.prepare(lengths=lengths, right_padding=[L - n for n in lengths])
    batch.update_and_fetch(mx.concatenate([pad(i, 0) for i in range(3)]),
                           mx.concatenate([pad(i, 1) for i in range(3)]))
    batch.finalize()
    # Rolled into place, only copies every row still has survive: W - max shift of 3.
    assert batch.recent_keys.shape[2] == 3
    for i, (k, _) in enumerate(prompts):
        assert mx.array_equal(batch.recent_keys[i], k[0, :, -3:].astype(mx.float16))
    # Copies lost in the roll come back as tokens arrive: from step W-1 on the batch holds
    # the same W copies as each request again.
    _decode_both(batch, [_single([p], W) for p in prompts], steps=W + 1, seed=300,
                 compare_from=W - 1)


def test_batch_generator_with_window_matches_single(tiny_model):
    from mlx_lm.generate import BatchGenerator, generate_step

    patch.set_config(TurboConfig("turboquant_mse", 3, fp16_window=4))
    prompts = [[3, 14, 15, 92, 65], [1], list(range(40, 70)), [7, 7, 7]]
    gen = BatchGenerator(tiny_model, max_tokens=6)
    uids = gen.insert(prompts, max_tokens=[6] * len(prompts))
    out = {u: [] for u in uids}
    while True:
        prompt_responses, responses = gen.next()
        if not prompt_responses and not responses:
            break
        for r in responses:
            out[r.uid].append(r.token)
    for u, p in zip(uids, prompts):
        cache = mlx_cache.make_prompt_cache(tiny_model)
        assert cache[0].fp16_window == 4
        steps = generate_step(mx.array(p), tiny_model, prompt_cache=cache)
        assert out[u] == [int(y) for (y, _), _ in zip(steps, range(6))]
