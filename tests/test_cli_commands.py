"""The README's commands as a user types them: --kv-method compresses from the first token
(mlx-lm's --quantized-kv-start default of 5000 applies only when that flag is given or
--kv-method is not), and every example's verbose line shows all layers compressed."""

import importlib
import subprocess
import sys

import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turbo import patch
from mlx_lm_turbo.cache import TurboKVCache
from mlx_lm_turbo.cache_file import layer_shape

from conftest import ROOT

DOCUMENT = (ROOT / "mlx_lm_turbo" / "calibration.txt").read_text()


def turbo(*args: str, stdin: str = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_lm_turbo", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.parametrize("command", ["generate", "cache_prompt"])
def test_kv_method_compresses_from_the_first_token_unless_told(command):
    patch.apply()
    parser = importlib.import_module(f"mlx_lm.{command}").setup_arg_parser()
    base = ["--model", "m", "--prompt", "x", "--prompt-cache-file", "f.safetensors"]
    cases = [([], 5000, False),                                  # mlx-lm as before
             (["--kv-bits", "4"], 5000, False),                  # mlx-lm's affine cache
             (["--kv-method", "mse"], 0, True),
             (["--ratequant-target", "3", "--kv-method", "mse"], 0, True),
             (["--kv-method", "mse", "--quantized-kv-start", "300"], 300, True),
             (["--quantized-kv-start", "0", "--kv-bits", "4"], 0, False)]
    for flags, start, ours in cases:
        args = parser.parse_args(base + flags)
        assert args.quantized_kv_start == start, flags
        config = patch.get_config()
        assert (config is not None) == ours, flags
        if ours:
            assert config.quantized_kv_start == start, flags


@pytest.mark.slow
def test_cache_prompt_example_writes_a_compressed_file(tmp_path, fp32_model_dir):
    """README: mlx_lm.cache_prompt --kv-method turboquant_mse --kv-bits 3 ... < doc.txt on a
    ~2k-token document, no other flag: at most 25% of what the fp16 file holds; then
    generate --prompt-cache-file continues with all layers compressed."""
    doc = "\n\n".join([DOCUMENT] * 4)
    path = tmp_path / "doc.safetensors"
    r = turbo("cache_prompt", "--model", str(fp32_model_dir), "--kv-method", "turboquant_mse",
              "--kv-bits", "3", "--prompt", "-", "--prompt-cache-file", str(path), stdin=doc)
    assert r.returncode == 0, r.stderr[-2000:]
    caches = mlx_cache.load_prompt_cache(str(path))
    assert all(isinstance(c, TurboKVCache) and (c.key_bits, c.value_bits) == (4, 2)
               for c in caches)   # --kv-bits 3: keys one bit more, values one less
    tokens = caches[0].offset
    assert 1800 <= tokens <= 2600, tokens
    shapes = [layer_shape(c) for c in caches]  # (batch, kv heads, tokens, k dim, v dim)
    fp16 = sum(2 * b * h * n * (dk + dv) for b, h, n, dk, dv in shapes)
    size = path.stat().st_size
    print(f"{tokens} tokens: {size} bytes vs {fp16} bytes of fp16 KV ({size / fp16:.1%})")
    assert size <= 0.25 * fp16, (size, fp16)
    r = turbo("generate", "--prompt-cache-file", str(path), "--prompt",
              "Summarize the document.", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "30/30 layers compressed" in r.stdout, r.stdout[-2000:]


@pytest.mark.slow
def test_key_value_bits_example_compresses_every_layer(model_dir):
    r = turbo("generate", "--model", str(model_dir), "--kv-method", "turboquant_mse",
              "--kv-key-bits", "4", "--kv-value-bits", "2", "--prompt",
              "The capital of France is", "--ignore-chat-template", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("KV cache: "))
    assert "K turboquant_mse 4-bit / V turboquant_mse 2-bit" in line
    assert "30/30 layers compressed" in line, line


@pytest.mark.slow
def test_ratequant_example_compresses_every_layer(tmp_path, fp32_model_dir):
    alloc = tmp_path / "alloc.json"
    r = turbo("generate", "--model", str(fp32_model_dir), "--kv-method", "turboquant_mse",
              "--ratequant-target", "2.5", "--ratequant-save", str(alloc), "--prompt",
              "The capital of France is", "--ignore-chat-template", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert alloc.is_file()
    assert "30/30 layers compressed" in r.stdout, r.stdout[-2000:]


def test_readme_examples_rely_on_the_default():
    """The README's examples need no --quantized-kv-start to compress."""
    text = (ROOT / "README.md").read_text()
    examples = [ln for ln in text.splitlines() if "--kv-method" in ln and ln.startswith(
        ("mlx_lm.", "python -m mlx_lm_turbo", "pip install"))]
    assert examples and not [ln for ln in examples if "--quantized-kv-start" in ln]
