"""generate --prompt-cache-file: one checker (cache_file.py, shared with convert-cache)
refuses every bad file with one ``error:`` line, never a traceback, and refuses a file that
does not fit the model or flags that differ from the file's window / key centring."""

import json
import random
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm.models.cache import save_prompt_cache

from mlx_lm_turbo import cache_file, patch
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache

from conftest import ROOT

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def write_cache(path, model_dir, layers=LAYERS, heads=KV_HEADS, dim=HEAD_DIM, **settings):
    """A TurboKVCache file of 6 random tokens that names ``model_dir`` as its model (key
    statistics on and K5/V3, as the flags default to, unless ``settings`` say otherwise)."""
    mx.random.seed(0)
    caches = []
    settings = {"center_keys": True, "scale_keys": True, **settings}
    for i in range(layers):
        c = TurboKVCache("turboquant_mse", 5, "turboquant_mse", 3, layer=i, **settings)
        c.update_and_fetch(mx.random.normal((1, heads, 6, dim)),
                           mx.random.normal((1, heads, 6, dim)))
        caches.append(c)
    save_prompt_cache(str(path), caches, {"model": str(model_dir), "tokenizer_config": "{}"})
    return path


def generate(path, *flags):
    return subprocess.run([sys.executable, "-m", "mlx_lm_turbo", "generate",
                           "--prompt-cache-file", str(path), "--prompt", "x",
                           "--max-tokens", "2", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def assert_one_error_line(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def bad_files(tmp_path, model_dir):
    good = write_cache(tmp_path / "good.safetensors", model_dir, layers=2)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "random.safetensors").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "folder.safetensors").mkdir()
    return [("missing.safetensors", "no such file"),
            ("empty.safetensors", "not a safetensors file"),
            ("random.safetensors", "not a safetensors file"),
            ("truncated.safetensors", "truncated"),
            ("folder.safetensors", "not a regular file")]


def test_bad_files_are_one_line_errors(tmp_path, model_dir):
    for name, words in bad_files(tmp_path, model_dir):
        assert_one_error_line(generate(tmp_path / name), name, words)


def test_convert_cache_gives_the_same_errors(tmp_path, model_dir):
    for name, words in bad_files(tmp_path, model_dir):
        with pytest.raises(cache_file.CacheFileError, match=words):
            cache_file.load_cache_file(tmp_path / name)
        r = subprocess.run([sys.executable, "-m", "mlx_lm_turbo.convert-cache", "--info",
                            str(tmp_path / name)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("shape,words", [
    (dict(layers=10), "the cache has 10 layers, the model 30"),
    (dict(dim=32), "layer 0 holds 3 KV heads of dim 32, the model has 3 KV heads of dim 64"),
    (dict(heads=2), "layer 0 holds 2 KV heads of dim 64"),
])
def test_a_file_of_another_shape_is_refused(tmp_path, model_dir, shape, words):
    path = write_cache(tmp_path / "other.safetensors", model_dir, **shape)
    assert_one_error_line(generate(path), "does not match the model", words)


@pytest.mark.parametrize("written,flags,words", [
    (dict(), ["--kv-fp16-window", "16"], "written with --kv-fp16-window 0 --kv-center-keys"),
    (dict(fp16_window=16), ["--kv-fp16-window", "64"], "ask for --kv-fp16-window 64"),
    (dict(), ["--no-kv-center-keys"], "ask for --kv-fp16-window 0 --no-kv-center-keys"),
    (dict(scale_keys=False), [], "written with --kv-fp16-window 0 --kv-center-keys "
                                 "--no-kv-scale-keys"),
])
def test_window_and_centring_that_differ_from_the_file_are_refused(tmp_path, model_dir,
                                                                  written, flags, words):
    path = write_cache(tmp_path / "doc.safetensors", model_dir, **written)
    r = generate(path, "--kv-method", "turboquant_mse", "--kv-bits", "4", *flags)
    assert_one_error_line(r, words)


def test_window_or_centring_without_a_method_is_refused(tmp_path, model_dir):
    path = write_cache(tmp_path / "doc.safetensors", model_dir)
    for flags in (["--kv-fp16-window", "16"], ["--kv-center-keys"], ["--no-kv-scale-keys"]):
        r = generate(path, *flags)
        assert r.returncode == 2 and "needs --kv-method" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_file_that_fits_generates(tmp_path, model_dir):
    path = write_cache(tmp_path / "doc.safetensors", model_dir, fp16_window=16)
    r = generate(path, "--kv-method", "turboquant_mse", "--kv-bits", "4",
                 "--kv-fp16-window", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "30/30 layers compressed" in r.stdout, r.stdout[-2000:]


def test_check_loaded_cache_compares_window_and_centring():
    c = TurboKVCache("turboquant_mse", 4, "turboquant_mse", 4, layer=0, fp16_window=8,
                     center_keys=True, scale_keys=True)
    c.update_and_fetch(mx.ones((1, 1, 2, 64)), mx.ones((1, 1, 2, 64)))
    patch.check_loaded_cache([c], TurboConfig("turboquant_mse", 4, fp16_window=8))
    with pytest.raises(ValueError, match="written with --kv-fp16-window 8"):
        patch.check_loaded_cache([c], TurboConfig("turboquant_mse", 4))
    assert json.loads(c.state[3])["fp16_window"] == 8
