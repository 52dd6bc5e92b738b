"""Long prompts: the prefill path's results, its memory, and bytes reported = bytes alive."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turbo import attention, patch
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache
from mlx_lm_turbo.prompt_cache import make_prompt_cache

from conftest import random_llama


def filled(method="turboquant_mse", bits=4, window=0, center=False, S0=700, L=300):
    """A cache holding S0 tokens, then the dicts attention gets for an L-token block."""
    c = TurboKVCache(method, bits, fp16_window=window, center_keys=center)
    k, v = mx.random.normal((1, 2, S0, 64)) * 2 + 1, mx.random.normal((1, 2, S0, 64))
    c.update_and_fetch(k, v)
    kn, vn = mx.random.normal((1, 2, L, 64)) * 2 + 1, mx.random.normal((1, 2, L, 64))
    keys, values = c.update_and_fetch(kn, vn)
    return c, keys, values


@pytest.mark.parametrize("case", [
    dict(mask="causal"), dict(mask=None), dict(mask="bool"), dict(mask="additive", window=8),
    dict(mask="causal", window=16), dict(mask="causal", window=64, center=True),
    dict(mask="causal", sinks=True, window=4, center=True),
    dict(mask="causal", method="turboquant_rvq", bits=2, window=8),
    dict(mask="causal", method="polar"),
])
def test_blocked_prefill_equals_the_reference(case):
    mx.random.seed(1)
    case = dict(case)
    mask, sinks = case.pop("mask"), case.pop("sinks", False)
    c, keys, values = filled(**case)
    L, S = 300, 1000
    q = mx.random.normal((1, 6, L, 64))
    if mask == "bool":
        mask = mx.random.uniform(shape=(1, 1, L, S)) > 0.3
    elif mask == "additive":
        mask = mx.random.normal((1, 6, L, S))
    sk = mx.random.normal((6,)) if sinks else None
    want = attention.reference_attention(q, keys, values, c, 0.125, mask, sk)
    got = attention.prefill_attention(q, keys, values, c, 0.125, mask, sk, block=256)
    assert float(mx.abs(got - want).max()) < 1e-5   # float32 throughout


def test_fused_path_in_model_dtype_matches_within_rounding():
    mx.random.seed(2)
    c, keys, values = filled()
    q = mx.random.normal((1, 6, 300, 64)).astype(mx.bfloat16)
    want = attention.reference_attention(q.astype(mx.float32), keys, values, c, 0.125, "causal")
    got = attention._fused_in_model_dtype(q, keys, values, c, 0.125, "causal")
    assert got.dtype == mx.bfloat16
    # bf16 keys, values and output: a few units of bf16's 2^-8 relative rounding.
    assert float(mx.abs(got.astype(mx.float32) - want).max()) < 0.05


def prefill_peak(model, caches, prompt) -> int:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    gen = generate_step(prompt, model, max_tokens=1, prompt_cache=caches,
                        prefill_step_size=2048)
    next(gen)
    return mx.get_peak_memory()


@pytest.mark.slow
def test_long_prefill_peaks_lower_than_the_plain_cache():
    patch.apply()
    model = random_llama(layers=16, heads=1, kv_heads=1)   # KV-heavy: one 128-dim head
    prompt = mx.array(np.random.default_rng(0).integers(0, 256, 8192))
    plain = mlx_cache.make_prompt_cache(model)
    plain_peak = prefill_peak(model, plain, prompt)
    plain_kv = sum(c.nbytes for c in plain)
    del plain
    ours = make_prompt_cache(model, TurboConfig("turboquant_mse", 4))
    our_peak = prefill_peak(model, ours, prompt)
    saved = plain_kv - sum(c.nbytes for c in ours)
    assert saved > 0.8 * plain_kv
    assert our_peak <= plain_peak - saved / 2, (our_peak, plain_peak, saved)


def alive_delta(fn) -> int:
    """Memory alive after ``fn()`` minus before it."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    fn()
    gc.collect()
    return mx.get_active_memory() - before


@pytest.mark.parametrize("window", [0, 64])
def test_bytes_reported_are_bytes_alive(tiny_model, window):
    """A 2048-token prefill step, then decoding, grow the memory alive by what nbytes
    reports (the window's copies own their memory, not views of a step's keys)."""
    ids = mx.array(np.random.default_rng(3).integers(0, 256, 2064))[None]
    caches = make_prompt_cache(tiny_model, TurboConfig("turboquant_mse", 3, fp16_window=window))

    def step(tokens):
        mx.eval(tiny_model(tokens, cache=caches))
        mx.eval([c.state for c in caches])   # as mlx-lm's generate_step does

    step(ids[:, :16])   # (the codecs' constants)
    for block in (ids[:, 16:2064], *(ids[:, t:t + 1] for t in range(8))):
        held = sum(c.nbytes for c in caches)
        alive = alive_delta(lambda: step(block))
        grown = sum(c.nbytes for c in caches) - held
        assert abs(alive - grown) <= 0.05 * (held + grown) + 65536, (block.shape, alive, grown)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_kernel_text_equals_the_codec_decode(bits):
    """The fused dequantize's text, run by the CPU emulation on a token slice of a cache
    buffer (read through its strides, as MLX hands it over)."""
    pytest.importorskip("ctypes")
    import emulate
    from mlx_lm_turbo.kernels import dequant, source

    c = TurboKVCache("turboquant_mse", bits)
    c.update_and_fetch(mx.random.normal((1, 2, 300, 64)), mx.random.normal((1, 2, 300, 64)))
    keys, _ = c.keys_and_values()          # slices of 512-token buffers
    run = emulate.compile_kernel(source.body("dequant"), dequant.INPUTS,
                                 [np.uint32, np.uint16, np.float32], dequant.OUTPUTS,
                                 [("BITS", bits), ("D", 64), ("NTG", dequant.NTG),
                                  ("OutT", "float")])
    out = np.zeros((1, 2, 300, 64), np.float32)
    n = out.size
    run([emulate._np(keys["codes"], c.keys["codes"]),
         emulate._np(keys["norm"], c.keys["norm"]), emulate._np(c.key_codec.centroids)],
        [out], (-(-n // dequant.NTG), 1), dequant.NTG)
    want = np.array(c.key_codec.decode_rotated(keys))
    assert np.abs(out - want).max() == 0.0


def test_handover_memory_does_not_grow_with_the_context():
    """--quantized-kv-start's hand-over (and convert-cache) code a long fp16 cache a block
    at a time: its peak is the same for 16k and 64k tokens."""
    from mlx_lm.models.cache import KVCache

    def peak(n):
        kv = KVCache()
        kv.update_and_fetch(*(mx.random.normal((1, 2, n, 64)).astype(mx.float16)
                              for _ in range(2)))
        mx.eval(kv.keys, kv.values)
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        c = TurboKVCache.from_kv_cache(kv, TurboConfig("turboquant_mse", 3), 0)
        mx.eval(c.keys, c.values)
        return mx.get_peak_memory() - base - c.nbytes

    assert peak(65536) <= 1.2 * peak(16384)
