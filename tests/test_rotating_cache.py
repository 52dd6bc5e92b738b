"""TurboRotatingKVCache: mlx-lm's RotatingKVCache semantics over packed codes."""

import shutil

import mlx.core as mx
import pytest
from conftest import random_llama
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import RotatingKVCache

from mlx_lm_turbo import patch
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache
from mlx_lm_turbo.kernels import check
from mlx_lm_turbo.prompt_cache import make_prompt_cache as make_turbo_cache
from mlx_lm_turbo.rotating_cache import TurboRotatingKVCache

WINDOW = 32
CONFIG8 = TurboConfig("turboquant_mse", 8)


def sliding_llama(window: int = WINDOW):
    """A random llama whose first layer is a sliding-window layer (mlx-lm's layer_types)."""
    model = random_llama(layers=2)
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2,
                           intermediate_size=256, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=256, num_key_value_heads=2, sliding_window=window,
                           layer_types=["sliding_attention", "full_attention"])
    sliding = llama.Model(args)
    sliding.update(model.parameters())
    return sliding


def gemma3(window: int = WINDOW):
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=64,
                                 num_hidden_layers=2, intermediate_size=128,
                                 num_attention_heads=2, head_dim=32, num_key_value_heads=1,
                                 vocab_size=256, sliding_window=window,
                                 sliding_window_pattern=2)
    mx.random.seed(0)
    model = gemma3_text.Model(args)
    mx.eval(model.parameters())
    return model


def gpt_oss(window: int = WINDOW):
    from mlx_lm.models import gpt_oss as oss

    args = oss.ModelArgs(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                         vocab_size=256, hidden_size=64, intermediate_size=64, head_dim=32,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                         layer_types=["sliding_attention", "full_attention"])
    mx.random.seed(0)
    model = oss.Model(args)
    mx.eval(model.parameters())
    return model


def greedy(model, caches, prompt: mx.array, steps: int) -> list:
    y = model(prompt[None], cache=caches)[:, -1].argmax(-1)
    out = []
    for _ in range(steps):
        out.append(y.item())
        y = model(y[None], cache=caches)[:, -1].argmax(-1)
    return out


def turbo_caches(model, config=CONFIG8, max_kv_size=None):
    return make_turbo_cache(model, config, max_kv_size)


def prompt(n: int) -> mx.array:
    mx.random.seed(1)
    return mx.random.randint(0, 256, (n,))


def lockstep(model, fp16: list, turbo: list, prompt: mx.array, steps: int) -> tuple:
    """Greedy decoding on the fp16 caches, the turbo caches fed the same tokens: (the
    fraction of steps whose greedy token is the same, the 95th percentile of the
    largest logit difference per step relative to fp16's largest logit)."""
    a, b = model(prompt[None], cache=fp16)[0, -1], model(prompt[None], cache=turbo)[0, -1]
    same, diffs = 0, []
    for _ in range(steps):
        same += a.argmax().item() == b.argmax().item()
        diffs.append((mx.abs(a - b).max() / mx.abs(a).max()).item())
        y = a.argmax()[None, None]
        a, b = model(y, cache=fp16)[0, -1], model(y, cache=turbo)[0, -1]
    return same / steps, sorted(diffs)[int(0.95 * steps)]


# 8-bit codes move these random models' logits by ~1% of their range; keys read from
# the wrong ring slots or under the wrong mask move them by tens of percent. Random
# models have near ties (and gpt_oss's expert choice flips on them): a few steps differ.
LOGIT_ERROR = 0.03
SAME = 0.95


@pytest.mark.parametrize("build", [sliding_llama, gemma3, gpt_oss])
def test_greedy_tokens_past_the_window_equal_fp16(build):
    model = build()
    fp16 = mlx_cache.make_prompt_cache(model)
    turbo = turbo_caches(model)
    assert any(type(c) is RotatingKVCache for c in fp16)
    assert all(isinstance(c, TurboKVCache) for c in turbo)
    p = prompt(2 * WINDOW + 5)   # the prefill itself spans more than the window
    same, error = lockstep(model, fp16, turbo, p, 300)
    print(build.__name__, same, error)
    assert same >= SAME and error < LOGIT_ERROR
    assert turbo[0].offset == fp16[0].offset == p.size + 300
    assert turbo[0].capacity == fp16[0].keys.shape[2] and turbo[0]._idx == fp16[0]._idx


@pytest.mark.parametrize("keep", [0, 4])
def test_ring_layout_follows_mlx_lm(keep):
    """Every update returns the same slots as mlx-lm's RotatingKVCache (codes decoded
    within 8-bit error; a wrong slot would be off by the keys' own size): blocks before
    and after the ring wrapped, single tokens, a trim before it filled."""
    fp16 = RotatingKVCache(WINDOW, keep)
    turbo = TurboRotatingKVCache("turboquant_mse", 8, max_size=WINDOW, keep=keep)
    mx.random.seed(2)
    for n in (10, -3, 1, 1, 15, *[1] * 30, 12, *[1] * 40, 40, 1, 1):
        if n < 0:
            assert fp16.is_trimmable() and turbo.is_trimmable()
            assert turbo.trim(-n) == fp16.trim(-n)
            continue
        k, v = mx.random.normal((1, 2, n, 32)), mx.random.normal((1, 2, n, 32))
        rk, rv = fp16.update_and_fetch(k, v)
        tk, tv = turbo.update_and_fetch(k, v)
        assert (turbo.offset, turbo._idx, turbo.size()) == (fp16.offset, fp16._idx, fp16.size())
        assert mx.abs(turbo.key_codec.decode(tk) - rk).max().item() < 0.05
        assert mx.abs(turbo.value_codec.decode(tv) - rv).max().item() < 0.05
        assert turbo.is_trimmable() == fp16.is_trimmable()
    for n in (1, 5):
        for window in (None, WINDOW // 2):
            want = fp16.make_mask(n, window_size=window)
            got = turbo.make_mask(n, window_size=window)
            assert type(got) is type(want)
            assert not isinstance(want, mx.array) or mx.array_equal(got, want)


def _same_batch(fp16, turbo, got=None, want=None) -> None:
    """The batch ring of codes matches mlx-lm's fp16 one: bookkeeping, slots, masks."""
    assert (turbo._idx, turbo._offset, turbo.rotated) == (fp16._idx, fp16._offset, fp16.rotated)
    assert turbo.offset.tolist() == fp16.offset.tolist()
    assert turbo.left_padding.tolist() == fp16.left_padding.tolist()
    got = turbo.keys_and_values() if got is None else got
    want = fp16.keys_and_values() if want is None else want
    for codec, t, r in zip((turbo.key_codec, turbo.value_codec), got, want):
        assert mx.abs(codec.decode(t) - r).max().item() < 0.05
    for n in (1, 5):
        for window in (None, WINDOW // 2):
            assert mx.array_equal(turbo.make_mask(n, window_size=window),
                                  fp16.make_mask(n, window_size=window))


def test_batch_ring_follows_mlx_lm():
    """BatchTurboRotatingKVCache against mlx-lm's BatchRotatingKVCache through what the
    server does: left-padded and right-padded prefills, decoding past the window,
    filter, extend with a batch at another ring index, extract and merge."""
    from mlx_lm.models.cache import BatchRotatingKVCache

    from mlx_lm_turbo.rotating_cache import BatchTurboRotatingKVCache

    mx.random.seed(4)

    def step(pairs, n):
        k, v = (mx.random.normal((pairs[0][1].batch_size, 2, n, 32)) for _ in range(2))
        out = [c.update_and_fetch(k, v) for c in pairs[0]]
        _same_batch(pairs[0][0], pairs[0][1], out[1], out[0])

    a = (BatchRotatingKVCache(WINDOW, [0, 0, 0]),
         BatchTurboRotatingKVCache(WINDOW, [0, 0, 0], "turboquant_mse", 8))
    for c in a:
        c.prepare(left_padding=[3, 0, 5])
    for n in (10, 1, 1, 15, *[1] * 30, 12, *[1] * 9):
        step([a], n)
    b = (BatchRotatingKVCache(WINDOW, [0, 0]),
         BatchTurboRotatingKVCache(WINDOW, [0, 0], "turboquant_mse", 8))
    for c in b:   # a right-padded prompt: rows of 7 and 4 tokens
        c.prepare(lengths=[7, 4], right_padding=[0, 3])
    step([b], 7)
    for c in b:
        c.finalize()
    step([b], 1)
    for c in a:
        c.filter([0, 2])
    _same_batch(*a)
    a[0].extend(b[0])
    a[1].extend(b[1])
    _same_batch(*a)
    for n in (1,) * 20:
        step([a], n)
    want, got = a[0].extract(3), a[1].extract(3)
    assert (got.offset, got._idx, got.size()) == (want.offset, want._idx, want.size())
    assert mx.abs(got.key_codec.decode(got.keys) - want.keys).max().item() < 0.05
    merged = (BatchRotatingKVCache.merge([a[0].extract(i) for i in (0, 2)]),
              TurboRotatingKVCache.merge([a[1].extract(i) for i in (0, 2)]))
    assert type(merged[1]) is BatchTurboRotatingKVCache
    _same_batch(*merged)
    step([merged], 3)
    step([merged], 1)


def test_keep_tokens_and_blocks_after_the_ring_wrapped():
    """mlx-lm's default for --max-kv-size (keep=4), a prefill after decode steps wrapped
    the ring, then more decode steps: the same next-token logits as fp16."""
    model = random_llama(layers=2)
    fp16 = [RotatingKVCache(WINDOW, keep=4) for _ in range(2)]
    turbo = [TurboRotatingKVCache.from_config(CONFIG8, i, WINDOW, 4) for i in range(2)]
    for caches in (fp16, turbo):
        greedy(model, caches, prompt(20), 40)
    block = prompt(12)
    ref, got = model(block[None], cache=fp16), model(block[None], cache=turbo)
    assert mx.abs(got - ref).max().item() < LOGIT_ERROR * mx.abs(ref).max().item()
    same, error = lockstep(model, fp16, turbo, block[:3], 50)
    assert same >= SAME and error < LOGIT_ERROR
    assert turbo[0]._idx == fp16[0]._idx and turbo[0].capacity == fp16[0].keys.shape[2]


def test_bytes_stay_bounded_by_the_window():
    model = sliding_llama()
    caches = turbo_caches(model, TurboConfig("turboquant_mse", 4))
    held = []
    y = model(prompt(8)[None], cache=caches)[:, -1].argmax(-1)
    for step in range(6 * WINDOW):
        y = model(y[None], cache=caches)[:, -1].argmax(-1)
        if step % WINDOW == WINDOW - 1:
            mx.eval(y)
            held.append(caches[0].nbytes)
    assert held[1] == held[-1] and held[-1] > 0   # flat once the ring is full
    assert caches[1].nbytes > 4 * held[-1]         # the full-attention layer grows
    fp16 = mlx_cache.make_prompt_cache(model)
    greedy(model, fp16, prompt(8), 6 * WINDOW)
    assert held[-1] < 0.35 * fp16[0].nbytes


def test_fp16_window_and_statistics_below_the_ring():
    """An fp16 window (attention reads the ring in temporal order) and key statistics
    that wait for their 64 tokens inside a 96-token ring."""
    model = gemma3(window=96)
    fp16 = mlx_cache.make_prompt_cache(model)
    config = TurboConfig("turboquant_mse", 8, fp16_window=8)
    turbo = turbo_caches(model, config)
    assert turbo[0].center_keys and turbo[0].fp16_window == 8
    same, error = lockstep(model, fp16, turbo, prompt(20), 200)
    assert same >= SAME and error < LOGIT_ERROR


def test_prompt_cache_file_round_trip(tmp_path):
    model = gemma3()
    caches = turbo_caches(model, TurboConfig("turboquant_mse", 4))
    p = prompt(50)
    greedy(model, caches, p, 30)
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, caches)
    patch.apply()   # (load_prompt_cache finds our classes in mlx-lm's cache module)
    loaded = mlx_cache.load_prompt_cache(path)
    assert type(loaded[0]) is TurboRotatingKVCache and type(loaded[1]) is TurboKVCache
    a, b = loaded[0], caches[0]
    assert (a.offset, a.max_size, a.keep, a._idx) == (b.offset, b.max_size, b.keep, b._idx)
    assert a.nbytes == b.nbytes
    y = mx.array([7])
    assert mx.array_equal(model(y[None], cache=loaded), model(y[None], cache=caches))


def test_convert_cache_reads_and_writes_rotating_layers(tmp_path, capsys):
    """mlx-lm's fp16 file with a sliding-window layer -> ours -> fp16 again: the layer
    classes, offsets and the next logits follow (8 bits: close to fp16)."""
    from mlx_lm_turbo.convert_cache import main

    model = sliding_llama()
    fp16 = mlx_cache.make_prompt_cache(model)
    greedy(model, fp16, prompt(50), 20)
    src, out, back = (str(tmp_path / f"{n}.safetensors") for n in ("in", "out", "back"))
    mlx_cache.save_prompt_cache(src, fp16, {"model": "tiny"})
    assert main([src, out, "--kv-method", "turboquant_mse", "--kv-bits", "8"]) in (0, None)
    assert main([out, back, "--to", "fp16"]) in (0, None)
    capsys.readouterr()
    patch.apply()
    turbo, restored = mlx_cache.load_prompt_cache(out), mlx_cache.load_prompt_cache(back)
    assert [type(c).__name__ for c in turbo] == ["TurboRotatingKVCache", "TurboKVCache"]
    assert [type(c).__name__ for c in restored] == ["RotatingKVCache", "KVCache"]
    assert turbo[0].offset == restored[0].offset == fp16[0].offset == 70
    assert turbo[0].nbytes < 0.6 * fp16[0].nbytes
    y = mx.array([[3]])
    ref = model(y, cache=fp16)
    for caches in (turbo, restored):
        error = mx.abs(model(y, cache=caches) - ref).max() / mx.abs(ref).max()
        assert error.item() < LOGIT_ERROR


def test_ratequant_allocates_over_sliding_window_layers():
    from mlx_lm_turbo import ratequant

    class ByteTokenizer:
        def encode(self, text: str) -> list:
            return list(text.encode("utf-8"))

    model = sliding_llama()
    config = ratequant.resolve(model, ByteTokenizer(), TurboConfig(
        "turboquant_mse", 4, ratequant_target=3.0), verbose=False)
    assert all(b is not None for b in config.layer_bits) and len(config.layer_bits) == 2
    caches = turbo_caches(model, config)
    assert type(caches[0]) is TurboRotatingKVCache
    assert (caches[0].key_bits, caches[0].value_bits) == config.layer_bits[0]


def test_server_batches_sliding_window_requests(recwarn):
    """mlx-lm's BatchGenerator (the server's batching) over our caches: both layers batch
    compressed; each request's tokens are mostly those of its own run with mlx-lm's
    fp16 caches."""
    from mlx_lm.generate import BatchGenerator, generate_step

    from mlx_lm_turbo.batch_cache import BatchTurboKVCache
    from mlx_lm_turbo.rotating_cache import BatchTurboRotatingKVCache

    model = sliding_llama()
    prompts = [prompt(40).tolist(), [3, 5], prompt(7).tolist()]
    n = WINDOW + 8
    plain = []
    for p in prompts:
        steps = generate_step(mx.array(p), model, prompt_cache=mlx_cache.make_prompt_cache(model))
        plain.append([int(y) for (y, _), _ in zip(steps, range(n))])
    patch.apply()
    patch.set_config(CONFIG8)
    gen = BatchGenerator(model, max_tokens=n)
    uids = gen.insert(prompts, max_tokens=[n] * len(prompts))
    out, kinds = {u: [] for u in uids}, set()
    while True:
        prompt_responses, responses = gen.next()
        if not prompt_responses and not responses:
            break
        if gen._generation_batch is not None and len(gen._generation_batch):
            kinds.add(tuple(type(c) for c in gen._generation_batch.prompt_cache))
        for r in responses:
            out[r.uid].append(r.token)
    assert kinds == {(BatchTurboRotatingKVCache, BatchTurboKVCache)}
    assert not [w for w in recwarn if "sliding-window" in str(w.message)]
    same = sum(a == b for u, p in zip(uids, plain) for a, b in zip(out[u], p))
    assert all(len(out[u]) == n for u in uids) and same >= SAME * n * len(prompts)


def test_batch_with_an_fp16_window_is_fp16_with_one_warning():
    from mlx_lm_turbo import rotating_cache

    rotating_cache._warned_batch = False
    caches = [TurboRotatingKVCache.from_config(TurboConfig("turboquant_mse", 4, fp16_window=4),
                                               0, WINDOW) for _ in range(2)]
    for c in caches:
        c.update_and_fetch(*(mx.random.normal((1, 2, 6, 32)) for _ in range(2)))
    with pytest.warns(UserWarning, match="batched sliding-window layers"):
        batch = TurboRotatingKVCache.merge(caches)
    assert type(batch) is mlx_cache.BatchRotatingKVCache and batch.offset.tolist() == [6, 6]


def wrapped_ring(batch: bool, window):
    """(cache, keys, values, mask) of a ring that wrapped 25 decode steps after a 20-token
    prompt: one request, or a batch of two (the second left-padded by 6)."""
    from mlx_lm_turbo.rotating_cache import BatchTurboRotatingKVCache

    if batch:
        c = BatchTurboRotatingKVCache(WINDOW, [0, 0], "turboquant_mse", 4)
        c.prepare(left_padding=[0, 6])
    else:
        c = TurboRotatingKVCache("turboquant_mse", 4, max_size=WINDOW, keep=0)
    mx.random.seed(3)
    for n in (20, *[1] * 25):
        k, v = (mx.random.normal((1 + batch, 2, n, 64)).astype(mx.float16) for _ in range(2))
        mask = c.make_mask(n, window_size=window)
        keys, values = c.update_and_fetch(k, v)
    assert c._idx < c.capacity == WINDOW   # wrapped: the newest token is mid-buffer
    return c, keys, values, mask


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ (C++20) not available")
@pytest.mark.parametrize("batch,window", [(False, None), (False, WINDOW // 2), (True, None)])
def test_fused_decode_kernel_reads_the_ring(batch, window):
    """The CUDA decode kernel's text (run by the CPU emulation) over a wrapped ring, as
    update_and_fetch returns it, with the mask mlx-lm gives (rolled where the attention
    window is shorter than the ring; a server batch's with left padding): the
    reference's result."""
    import emulate   # (tests/)
    from mlx_lm_turbo.attention import reference_attention
    from mlx_lm_turbo.kernels import plan as planning

    c, keys, values, mask = wrapped_ring(batch, window)
    q = mx.random.normal((1 + batch, 4, 1, 64)).astype(mx.float16)
    p = planning.plan(q, keys, values, c, mask, None, "cuda")
    assert p is not None
    out = emulate.run_fused_emulated(q, keys, values, c, 0.125, mask, p)
    ref = reference_attention(q, keys, values, c, 0.125, mask)
    assert mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item() < 2e-3


@pytest.mark.skipif(check.backend() is None, reason="no Metal or CUDA backend")
@pytest.mark.parametrize("batch,window", [(False, None), (False, WINDOW // 2), (True, None)])
def test_gpu_decode_kernel_reads_the_ring(batch, window):
    """The same on the GPU: the decode kernel the patched attention launches."""
    from mlx_lm_turbo.attention import reference_attention
    from mlx_lm_turbo.kernels import decode
    from mlx_lm_turbo.kernels import plan as planning

    c, keys, values, mask = wrapped_ring(batch, window)
    q = mx.random.normal((1 + batch, 4, 1, 64)).astype(mx.float16)
    p = planning.plan(q, keys, values, c, mask, None, check.backend())
    assert p is not None
    out = decode.run_fused(q, keys, values, c, 0.125, mask, p, check.backend())
    ref = reference_attention(q, keys, values, c, 0.125, mask)
    assert mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item() < 2e-3
