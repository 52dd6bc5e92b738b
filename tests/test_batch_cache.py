"""BatchTurboKVCache: merge / filter / extend / extract / prepare+finalize round trips equal
per-request caches; batched attention and batched greedy decoding equal per-request ones;
mlx-lm's LRU prompt cache reuses, trims and counts the packed bytes."""

import copy

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turbo.attention import reference_attention
from mlx_lm_turbo.batch_cache import BatchTurboKVCache
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache

H, D = 2, 32


def kv(n, seed):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return (mx.random.normal((1, H, n, D), key=k1) + 0.5,
            mx.random.normal((1, H, n, D), key=k2))


def single(blocks, method="turboquant_mse", bits=3, layer=1, center=True):
    """A per-request cache fed with the given (keys, values) blocks (centred keys by
    default: the per-row key mean is the part of the batch cache that needs care)."""
    c = TurboKVCache(method, bits, seed=7, layer=layer, center_keys=center)
    for k, v in blocks:
        c.update_and_fetch(k, v)
    c.fix_statistics()   # as merge does: a batch row's key statistics stay as they are
    return c


def assert_same_cache(a: TurboKVCache, b: TurboKVCache):
    assert a.offset == b.offset
    if a.offset == 0:
        return
    ka, va = a.keys_and_values()
    kb, vb = b.keys_and_values()
    for x, y in ((ka, kb), (va, vb)):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(np.array(x[name]), np.array(y[name]), err_msg=name)
    np.testing.assert_array_equal(np.array(a.key_mean), np.array(b.key_mean))


@pytest.fixture(params=[True, False], ids=["centred", "plain"])
def three(request):
    """Three requests of lengths 5 (two blocks), 0 (fresh) and 12."""
    blocks = [[kv(3, 1), kv(2, 2)], [], [kv(12, 3)]]
    return blocks, [single(b, center=request.param) for b in blocks]


@pytest.mark.parametrize("method,center", [("turboquant_mse", True), ("turboquant_mse", False),
                                           ("turboquant_prod", True), ("turboquant_rvq", True),
                                           ("polar", False)])
def test_merge_then_extract_round_trips(method, center):
    blocks = [[kv(3, 1), kv(2, 2)], [], [kv(12, 3)]]
    caches = [single(b, method, 2, center=center) for b in blocks]
    batch = TurboKVCache.merge(caches)
    assert isinstance(batch, BatchTurboKVCache)
    assert batch.size() == 12
    assert batch.left_padding.tolist() == [7, 12, 0]
    assert batch.offset.tolist() == [5, 0, 12]
    for i, c in enumerate(caches):
        assert_same_cache(batch.extract(i), c)
    # the padding rows are zero codes
    assert all(int(mx.abs(a[0, :, :7].astype(mx.float32)).max()) == 0
               for a in batch.keys.values())


def test_merge_refuses_mixed_codecs():
    with pytest.raises(ValueError, match="different"):
        TurboKVCache.merge([single([kv(2, 1)], bits=3), single([kv(2, 1)], bits=4)])
    with pytest.raises(ValueError, match="different"):
        TurboKVCache.merge([single([kv(2, 1)]), single([kv(2, 1)], center=False)])


def test_batched_decode_equals_per_request(three):
    blocks, caches = three
    batch = TurboKVCache.merge([copy.deepcopy(c) for c in caches])
    q_all = mx.random.normal((3, 2 * H, 1, D), key=mx.random.key(9))
    for step in range(3):
        new = [kv(1, 100 + 10 * step + i) for i in range(3)]
        mask = batch.make_mask(1)     # made before the update, as the model does
        kb, vb = batch.update_and_fetch(mx.concatenate([n[0] for n in new]),
                                        mx.concatenate([n[1] for n in new]))
        out_b = reference_attention(q_all, kb, vb, batch, 0.125, mask=mask)
        for i, c in enumerate(caches):
            k, v = c.update_and_fetch(*new[i])
            c.fix_statistics()   # a batch row fixes its key statistics from its first block
            k.pop("first", None)
            out = reference_attention(q_all[i:i + 1], k, v, c, 0.125)
            np.testing.assert_allclose(np.array(out_b[i:i + 1]), np.array(out),
                                       rtol=1e-5, atol=1e-5)
    for i, c in enumerate(caches):
        assert_same_cache(batch.extract(i), c)


def test_filter_and_extend_round_trip(three):
    _, caches = three
    batch = TurboKVCache.merge(caches)
    batch.filter([2, 0])
    assert batch.left_padding.tolist() == [0, 7]
    assert_same_cache(batch.extract(0), caches[2])
    assert_same_cache(batch.extract(1), caches[0])
    batch.filter([1])          # only the 5-token request: common left padding dropped
    assert batch.size() == 5 and batch.left_padding.tolist() == [0]
    assert_same_cache(batch.extract(0), caches[0])

    center = caches[0].center_keys
    others = [single([kv(20, 4)], center=center), single([kv(1, 5)], center=center)]
    batch = TurboKVCache.merge(caches)
    batch.extend(TurboKVCache.merge(others))
    assert batch.size() == 20
    assert batch.offset.tolist() == [5, 0, 12, 20, 1]
    for i, c in enumerate(caches + others):
        assert_same_cache(batch.extract(i), c)
    # then everyone decodes one more token, as the generation batch does
    new = [kv(1, 200 + i) for i in range(5)]
    batch.update_and_fetch(mx.concatenate([n[0] for n in new]),
                           mx.concatenate([n[1] for n in new]))
    for i, c in enumerate(caches + others):
        c.update_and_fetch(*new[i])
        assert_same_cache(batch.extract(i), c)


@pytest.mark.parametrize("center", [True, False])
def test_right_padded_prefill_equals_per_request(center):
    """PromptProcessingBatch: fresh rows, right-padded prompt, finalize -> left padding.
    The key mean of each row comes from its real tokens only."""
    lengths = [4, 9, 1]
    prompts = [kv(n, 30 + i) for i, n in enumerate(lengths)]
    batch = TurboKVCache.merge([TurboKVCache("turboquant_mse", 3, seed=7, layer=1,
                                             center_keys=center) for _ in lengths])
    L = max(lengths)
    garbage = kv(L, 99)

    def right_pad(i, which):
        x = prompts[i][which]
        return mx.concatenate([x, garbage[which][:, :, :L - x.shape[2]]], axis=2)

    batch.prepare(lengths=lengths, right_padding=[L - n for n in lengths])
    batch.update_and_fetch(mx.concatenate([right_pad(i, 0) for i in range(3)]),
                           mx.concatenate([right_pad(i, 1) for i in range(3)]))
    batch.finalize()
    assert batch.left_padding.tolist() == [5, 0, 8]
    assert batch.offset.tolist() == lengths
    for i in range(3):
        assert_same_cache(batch.extract(i), single([prompts[i]], center=center))


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="g++ (C++20) needed")
@pytest.mark.parametrize("L", [1, 3])
def test_fused_kernel_text_takes_batched_caches(L):
    """The GPU decode kernel (run on the CPU by tests/emulate.py) over a left-padded batch:
    per-row padding masks, strided views of the batch buffers."""
    import emulate
    from mlx_lm_turbo.kernels import plan

    caches = [single([kv(n, 60 + n)], bits=4) for n in (37, 5, 20)]
    batch = TurboKVCache.merge(caches)
    mask = batch.make_mask(L, return_array=True)
    new = [kv(L, 70 + i) for i in range(3)]
    keys, values = batch.update_and_fetch(mx.concatenate([n[0] for n in new]),
                                          mx.concatenate([n[1] for n in new]))
    q = mx.random.normal((3, 2 * H, L, D), key=mx.random.key(3)).astype(mx.float16)
    p = plan.plan(q, keys, values, batch, mask, None, "cuda")
    assert p is not None and p["B"] == 3 and p["MASK"] == 2
    out = emulate.run_fused_emulated(q, keys, values, batch, D ** -0.5, mask, p,
                                     full=(batch.keys, batch.values))
    ref = reference_attention(q, keys, values, batch, D ** -0.5, mask)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err < 2e-3, err


def test_deepcopy_is_independent(three):
    _, caches = three
    batch = TurboKVCache.merge(caches)
    clone = copy.deepcopy(batch)
    assert clone.key_codec is batch.key_codec   # codecs are shared, buffers are not
    before = {n: np.array(a) for n, a in batch.keys.items()}
    clone.update_and_fetch(*[mx.concatenate([x] * 3) for x in kv(1, 77)])
    clone.trim(1)
    for n, a in batch.keys.items():
        np.testing.assert_array_equal(np.array(a), before[n])
    assert batch.size() == 12


def test_lru_prompt_cache_reuses_trims_and_counts_packed_bytes():
    from mlx_lm.models.cache import KVCache, LRUPromptCache

    layers, n = 4, 64

    def turbo(bits):
        return [single([kv(n, 40 + l)], bits=bits, layer=l) for l in range(layers)]

    def fp16():
        out = []
        for l in range(layers):
            c = KVCache()
            k, v = kv(n, 40 + l)
            c.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
            out.append(c)
        return out

    # Reuse: longest prefix, trimmed deep copy, the stored entry untouched.
    lru = LRUPromptCache(max_size=10)
    tokens = list(range(n))
    lru.insert_cache("m", tokens, turbo(4))
    cache, rest = lru.fetch_nearest_cache("m", tokens[:40] + [999, 998])
    assert rest == [999, 998] and all(c.offset == 40 for c in cache)
    assert all(isinstance(c, TurboKVCache) for c in cache)
    cache[0].update_and_fetch(*kv(2, 5))
    again, _ = lru.fetch_nearest_cache("m", tokens[:40] + [999, 998])
    assert again[0].offset == 40

    # The same byte budget holds ~16/bits as many cached tokens.
    held = {}
    for name, make in (("fp16", fp16), ("turbo4", lambda: turbo(4)), ("turbo2", lambda: turbo(2))):
        entry = sum(c.nbytes for c in make())
        budget = 10 * sum(c.nbytes for c in fp16())
        lru = LRUPromptCache(max_size=1000, max_bytes=budget)
        for r in range(60):
            lru.insert_cache("m", [10_000 + r] + tokens, make())
        held[name] = len(lru) * n
        assert lru.nbytes <= budget and lru.nbytes == len(lru) * entry
    assert held["fp16"] == 10 * n
    # head dim 32: fp16 is 512 bits a vector; 4-bit codes + fp16 norm 144 (3.56x), 2-bit 80
    # (6.4x), less the per-head key mean
    assert held["turbo4"] >= 3.4 * held["fp16"]
    assert held["turbo2"] >= 5.9 * held["fp16"]


def _greedy_batch(model, prompts, n):
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=n)
    uids = gen.insert(prompts, max_tokens=[n] * len(prompts))
    out = {u: [] for u in uids}
    sizes = []
    while True:
        prompt_responses, responses = gen.next()
        if not prompt_responses and not responses:
            break
        sizes.append(len(gen._generation_batch))
        for r in responses:
            out[r.uid].append(r.token)
    return [out[u] for u in uids], max(sizes)


def _greedy_single(model, prompt, n):
    from mlx_lm.generate import generate_step
    from mlx_lm.models import cache as mlx_cache

    cache = mlx_cache.make_prompt_cache(model)
    assert isinstance(cache[0], TurboKVCache)
    steps = generate_step(mx.array(prompt), model, prompt_cache=cache)
    return [int(y) for (y, _), _ in zip(steps, range(n))]


@pytest.mark.parametrize("center", [False, True])
def test_batch_generator_tiny_model_matches_single(tiny_model, center):
    from mlx_lm_turbo import patch

    patch.apply()
    patch.set_config(TurboConfig("turboquant_mse", 4, center_keys=center))
    prompts = [[3, 14, 15, 92, 65], [1], list(range(40, 70)), [7, 7, 7]]
    batched, size = _greedy_batch(tiny_model, prompts, 6)
    assert size == len(prompts)
    assert batched == [_greedy_single(tiny_model, p, 6) for p in prompts]


@pytest.mark.slow
def test_batch_generator_real_model_matches_single(real_model):
    from mlx_lm_turbo import patch

    model, tok = real_model
    patch.apply()
    # Raw keys: with the key statistics (the default) a row that starts in a batch takes
    # them from its first block, a lone cache from its first 64 tokens (recoding as they
    # arrive), so short prompts' codes differ between the two by design.
    patch.set_config(TurboConfig("turboquant_mse", 4, center_keys=False, scale_keys=False))
    prompts = [tok.encode(p) for p in ("The capital of France is", "1, 2, 3, 4,",
                                       "Write a short poem about the sea and the sky, please",
                                       "Hello")]
    batched, size = _greedy_batch(model, prompts, 8)
    assert size == len(prompts)
    assert batched == [_greedy_single(model, p, 8) for p in prompts]
