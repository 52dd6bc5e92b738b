"""python -m mlx_lm_turbo.convert-cache: compress, restore, inspect prompt-cache files."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turbo import __version__, patch
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache
from mlx_lm_turbo.convert_cache import META_PREFIX, load_cache_file, main

from conftest import ROOT, SHARED, needs_shared_data

patch.apply()
TOKENS = 300
TINY_META = {"model": "tiny-llama", "tokenizer_config": json.dumps({"trust_remote_code": False})}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def prefill(model, ids: mx.array, caches: list) -> mx.array:
    for s in range(0, ids.size, 256):
        out = model(ids[None, s:s + 256], cache=caches)
    mx.eval(out)
    return out


@pytest.fixture(scope="module")
def tiny_ids():
    return mx.array(np.random.default_rng(0).integers(0, 256, TOKENS + 1))


@pytest.fixture(scope="module")
def fp_file(tiny_model, tiny_ids, tmp_path_factory) -> Path:
    """What mlx_lm.cache_prompt writes: plain KVCache layers (the model's dtype, fp32)."""
    caches = [mlx_cache.KVCache() for _ in tiny_model.layers]
    prefill(tiny_model, tiny_ids[:TOKENS], caches)
    path = tmp_path_factory.mktemp("in") / "prompt.safetensors"
    mlx_cache.save_prompt_cache(str(path), caches, TINY_META)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}))
    return d


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(capsys, *argv) -> tuple[int, str, str]:
    """main() in-process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, *needles: str) -> None:
    assert rc not in (0, None), err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def next_logits(model, caches, token: mx.array) -> mx.array:
    return model(token[None, None], cache=caches)


# ------------------------------------------------------------------ conversions
def test_compress_loads_in_patched_mlx_lm_and_continues(tiny_model, tiny_ids, fp_file,
                                                         tmp_path, capsys):
    before = digest(fp_file)
    out = tmp_path / "c.safetensors"
    rc, stdout, err = cli(capsys, fp_file, out, "--kv-method", "turboquant_mse", "--kv-bits",
                          "3", "--kv-seed", "5")
    assert rc == 0, err
    assert digest(fp_file) == before  # IN never modified
    assert "bits/element" in stdout and "smaller than fp16" in stdout
    assert len(stdout.strip().splitlines()) == 1
    loaded, meta = mlx_cache.load_prompt_cache(str(out), return_metadata=True)
    assert all(isinstance(c, TurboKVCache) and c.offset == TOKENS for c in loaded)
    assert meta["model"] == TINY_META["model"]
    assert meta["tokenizer_config"] == TINY_META["tokenizer_config"]
    assert meta[META_PREFIX + "method"] == "turboquant_mse"
    assert meta[META_PREFIX + "bits"] == "K4/V2" and meta[META_PREFIX + "seed"] == "5"
    assert meta[META_PREFIX + "version"] == __version__
    # Same logits as compressing the same fp16 cache in memory.
    ref = mlx_cache.load_prompt_cache(str(fp_file))
    direct = [TurboKVCache.from_kv_cache(c, TurboConfig("turboquant_mse", 4, value_bits=2,
                                                        seed=5), i)   # --kv-bits 3
              for i, c in enumerate(ref)]
    tok = tiny_ids[TOKENS]
    a, b = next_logits(tiny_model, loaded, tok), next_logits(tiny_model, direct, tok)
    assert mx.array_equal(a, b)
    # ... and close to the uncompressed continuation at 8 bits.
    out8 = tmp_path / "c8.safetensors"
    assert cli(capsys, fp_file, out8, "--kv-method", "mse", "--kv-bits", "8")[0] == 0
    c8 = mlx_cache.load_prompt_cache(str(out8))
    x, y = next_logits(tiny_model, c8, tok), next_logits(tiny_model, ref, tok)
    assert float(mx.abs(x - y).max()) < 0.05 * float(mx.abs(y).max())


def test_mixed_methods_and_info(fp_file, tmp_path, capsys):
    out = tmp_path / "mixed.safetensors"
    rc, _, err = cli(capsys, fp_file, out, "--kv-method", "turboquant_prod", "--kv-key-bits",
                     "4", "--kv-value-method", "rvq", "--kv-value-bits", "2")
    assert rc == 0, err
    rc, stdout, err = cli(capsys, "--info", out)
    assert rc == 0, err
    assert "model: tiny-llama" in stdout and f"tokens: {TOKENS}" in stdout
    assert "layers: 2" in stdout and "tokenizer_config" in stdout
    assert "K turboquant_prod 4-bit / V turboquant_rvq 2-bit" in stdout
    assert stdout.count("TurboKVCache") == 2 and "bits/element" in stdout
    assert f"mlx_lm_turbo {__version__}" in stdout
    rc, stdout, _ = cli(capsys, "--info", fp_file)
    assert rc == 0 and stdout.count("KVCache ") == 2 and "float32" in stdout
    total = [ln for ln in stdout.splitlines() if ln.startswith("total:")][0]
    # mlx-lm stores its whole buffer (256-token steps): 512 fp32 slots for 300 tokens;
    # bits/element counts the bytes stored over the elements held.
    assert f"{32 * 512 / TOKENS:.3f} bits/element" in total


def test_to_fp16_loads_in_unpatched_mlx_lm(tiny_model, tiny_ids, fp_file, tmp_path, capsys):
    turbo = tmp_path / "t.safetensors"
    assert cli(capsys, fp_file, turbo, "--kv-method", "polar", "--kv-bits", "4")[0] == 0
    before = digest(turbo)
    plain = tmp_path / "plain.safetensors"
    rc, stdout, err = cli(capsys, turbo, plain, "--to", "fp16")
    assert rc == 0, err
    assert digest(turbo) == before
    script = ("import sys, mlx.core as mx\n"
              "from mlx_lm.models import cache as C\n"
              "assert not hasattr(C, 'TurboKVCache')\n"
              "c, m = C.load_prompt_cache(sys.argv[1], return_metadata=True)\n"
              "print(sorted({type(x).__name__ for x in c}), c[0].offset, c[0].keys.dtype,"
              " sorted(m))\n")
    e = dict(os.environ)
    e.pop("PYTHONPATH", None)
    e["MLX_LM_TURBO_DISABLE"] = "1"  # the installed start-up hook would patch mlx-lm
    r = subprocess.run([sys.executable, "-c", script, str(plain)], capture_output=True,
                       text=True, env=e, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"['KVCache'] {TOKENS} mlx.core.float16" in r.stdout
    assert "mlx_lm_turbo_method" not in r.stdout and "'model'" in r.stdout
    # The restored cache continues like the compressed one.
    tok = tiny_ids[TOKENS]
    a = next_logits(tiny_model, mlx_cache.load_prompt_cache(str(turbo)), tok)
    b = next_logits(tiny_model, mlx_cache.load_prompt_cache(str(plain)), tok)
    assert float(mx.abs(a - b).max()) < 1e-2 * float(mx.abs(a).max())


def test_fp32_to_fp16_cast(fp_file, tmp_path, capsys):
    out = tmp_path / "h.safetensors"
    assert cli(capsys, fp_file, out, "--to", "fp16")[0] == 0
    src, dst = mlx_cache.load_prompt_cache(str(fp_file)), mlx_cache.load_prompt_cache(str(out))
    for s, d in zip(src, dst):
        assert d.keys.dtype == mx.float16 and d.keys.shape[2] == TOKENS  # no padding
        assert mx.array_equal(d.keys, s.keys[:, :, :TOKENS].astype(mx.float16))
    assert out.stat().st_size < fp_file.stat().st_size / 2


def test_quantized_input(fp_file, tmp_path, capsys):
    q = [c.to_quantized(group_size=32, bits=8) for c in mlx_cache.load_prompt_cache(str(fp_file))]
    qfile = tmp_path / "q.safetensors"
    mlx_cache.save_prompt_cache(str(qfile), q, TINY_META)
    out = tmp_path / "q2t.safetensors"
    rc, _, err = cli(capsys, qfile, out, "--kv-method", "mse", "--kv-bits", "8")
    assert rc == 0, err
    t = mlx_cache.load_prompt_cache(str(out))
    ref = mlx_cache.load_prompt_cache(str(fp_file))
    for c, r in zip(t, ref):
        kv = c.to_fp16()
        err_k = mx.abs(kv.keys[:, :, :TOKENS] - r.keys[:, :, :TOKENS]).max()
        assert float(err_k) < 0.05 * float(mx.abs(r.keys).max())
    assert "affine 8-bit" in cli(capsys, "--info", qfile)[1]


def test_turbo_input_kept_or_reencoded(fp_file, tmp_path, capsys):
    a = tmp_path / "a.safetensors"
    assert cli(capsys, fp_file, a, "--kv-method", "rvq", "--kv-bits", "2")[0] == 0
    same = tmp_path / "same.safetensors"
    rc, stdout, _ = cli(capsys, a, same, "--kv-method", "rvq", "--kv-bits", "2")
    assert rc == 0 and "2 layers kept" in stdout
    x, y = mx.load(str(a)), mx.load(str(same))
    assert x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]) for k in x)
    other = tmp_path / "other.safetensors"
    assert cli(capsys, a, other, "--kv-method", "mse", "--kv-bits", "4")[0] == 0
    c = load_cache_file(other).layers[0]
    assert (c.key_method, c.key_bits, c.value_bits) == ("turboquant_mse", 5, 3)


def test_out_without_suffix_gets_safetensors(fp_file, tmp_path, capsys):
    rc, _, err = cli(capsys, fp_file, tmp_path / "noext", "--kv-method", "mse", "--kv-bits", "4")
    assert rc == 0, err
    assert (tmp_path / "noext.safetensors").exists()


class ByteTokenizer:
    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))


def test_ratequant_target(fp_file, tmp_path, tiny_model, tiny_model_dir, capsys, monkeypatch):
    from mlx_lm_turbo import convert_cache

    out = tmp_path / "r.safetensors"
    rc, _, err = cli(capsys, fp_file, out, "--kv-method", "mse", "--ratequant-target", "3")
    assert_one_error_line(rc, err, "need --model")
    monkeypatch.setattr(convert_cache, "_load_model", lambda path: (tiny_model, ByteTokenizer()))
    rc, stdout, err = cli(capsys, fp_file, out, "--kv-method", "mse", "--ratequant-target",
                          "3", "--model", tiny_model_dir)
    try:
        from mlx_lm_turbo import ratequant  # noqa: F401
        available = hasattr(ratequant, "resolve")
    except ImportError:
        available = False
    if not available:
        assert_one_error_line(rc, err, "not available yet")
        assert not out.exists()
        return
    assert rc == 0, err
    assert "RateQuant per-layer bits" in stdout
    layers = load_cache_file(out).layers
    assert all(isinstance(c, TurboKVCache) and c.offset == TOKENS for c in layers)
    assert mlx_cache.load_prompt_cache(str(out), return_metadata=True)[1][META_PREFIX + "bits"]


def test_model_check_passes(fp_file, tmp_path, tiny_model_dir, capsys):
    rc, _, err = cli(capsys, fp_file, tmp_path / "m.safetensors", "--kv-method", "mse",
                     "--kv-bits", "3", "--model", tiny_model_dir)
    assert rc == 0, err


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change,needle", [
    ({"num_hidden_layers": 3}, "2 layers, the model 3"),
    ({"num_key_value_heads": 4}, "2 KV heads of dim 32, the model has 4 KV heads"),
    ({"head_dim": 64}, "the model has 2 KV heads of dim 64"),
])
def test_model_mismatch(fp_file, tmp_path, tiny_model_dir, capsys, change, needle):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(change)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.safetensors"
    rc, _, err = cli(capsys, fp_file, out, "--kv-method", "mse", "--kv-bits", "3", "--model", d)
    assert_one_error_line(rc, err, "does not match --model", needle)
    assert not out.exists()
    rc, _, err = cli(capsys, fp_file, out, "--kv-method", "mse", "--model", tmp_path / "none")
    assert_one_error_line(rc, err, "no config.json")


@pytest.mark.parametrize("flags,needle", [
    (["--kv-method", "turbo"], "invalid choice"),
    (["--kv-method", "mse", "--kv-bits", "0"], "out of range"),
    (["--kv-method", "mse", "--kv-bits", "9"], "out of range"),
    (["--kv-method", "rvq", "--kv-bits", "5"], "out of range for turboquant_rvq"),
    (["--kv-method", "mse", "--kv-value-method", "qjl"], "key-only"),
    (["--kv-bits", "3"], "--kv-method is required"),
    (["--to", "fp16", "--kv-method", "mse"], "--to fp16 takes no --kv-method"),
])
def test_bad_flags(fp_file, tmp_path, capsys, flags, needle):
    out = tmp_path / "o.safetensors"
    rc, _, err = cli(capsys, fp_file, out, *flags)
    assert rc == 2
    assert_one_error_line(rc, err, needle)
    assert not out.exists()


def test_missing_input(tmp_path, capsys):
    rc, _, err = cli(capsys, tmp_path / "nope.safetensors", tmp_path / "o.safetensors",
                     "--kv-method", "mse")
    assert_one_error_line(rc, err, "no such file")
    assert_one_error_line(*cli(capsys, "--info", tmp_path / "nope")[::2], "no such file")


def test_truncated_at_random_offsets(fp_file, tmp_path, capsys):
    data = fp_file.read_bytes()
    rng = np.random.default_rng(9)
    cuts = sorted({0, 5, *rng.integers(8, len(data) - 1, 8).tolist()})[:10]
    assert len(cuts) == 10
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        out = tmp_path / f"out{cut}.safetensors"
        rc, _, err = cli(capsys, bad, out, "--kv-method", "mse", "--kv-bits", "3")
        assert_one_error_line(rc, err, str(bad))
        assert "truncated" in err or "not a safetensors" in err, err
        assert not out.exists() and bad.read_bytes() == data[:cut]
        rc, _, err = cli(capsys, "--info", bad)
        assert_one_error_line(rc, err)


def test_not_a_prompt_cache(tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(weights), {"model.w": mx.ones((4, 4))}, {"format": "mlx"})
    text = tmp_path / "text.safetensors"
    text.write_text("hello, this is not a safetensors file at all\n" * 10)
    nometa = tmp_path / "nometa.safetensors"
    mx.save_safetensors(str(nometa), {"0.0": mx.ones((1, 2, 3, 4))})
    for bad, needle in ((weights, "not an mlx-lm prompt-cache file"),
                        (text, "not a safetensors file"),
                        (nometa, "not an mlx-lm prompt-cache file")):
        rc, _, err = cli(capsys, bad, tmp_path / "o.safetensors", "--kv-method", "mse")
        assert_one_error_line(rc, err, needle)
    assert not (tmp_path / "o.safetensors").exists()


def test_newer_turbo_version_refused(fp_file, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert cli(capsys, fp_file, out, "--kv-method", "mse", "--kv-bits", "4")[0] == 0
    arrays, meta = mx.load(str(out), return_metadata=True)
    meta[f"0.{META_PREFIX}version"] = "99.0.0"
    newer = tmp_path / "newer.safetensors"
    mx.save_safetensors(str(newer), arrays, meta)
    rc, _, err = cli(capsys, newer, tmp_path / "o.safetensors", "--to", "fp16")
    assert_one_error_line(rc, err, "written by mlx_lm_turbo 99.0.0")
    # A layer whose own state names another format.
    arrays, meta = mx.load(str(out), return_metadata=True)
    layer_meta = "".join(chr(i) for i in arrays["0.3"].tolist())
    assert '"format": "mlx_lm_turbo"' in layer_meta
    arrays["0.3"] = mx.array([ord(ch) for ch in layer_meta.replace(
        '"format": "mlx_lm_turbo"', '"format": "other"')])
    fake = tmp_path / "fake.safetensors"
    mx.save_safetensors(str(fake), arrays, meta)
    rc, _, err = cli(capsys, fake, tmp_path / "o.safetensors", "--to", "fp16")
    assert_one_error_line(rc, err, "layer 0: format 'other'")


def test_refuses_overwrite_and_same_file(fp_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    rc, _, err = cli(capsys, fp_file, out, "--kv-method", "mse", "--kv-bits", "3")
    assert_one_error_line(rc, err, "exists; pass --force")
    assert out.read_bytes() == b"precious"
    rc, _, err = cli(capsys, fp_file, out, "--kv-method", "mse", "--kv-bits", "3", "--force")
    assert rc == 0, err
    assert load_cache_file(out).layers[0].key_bits == 4   # --kv-bits 3: K4/V2
    before = digest(fp_file)
    for flags in ([], ["--force"]):
        rc, _, err = cli(capsys, fp_file, fp_file, "--kv-method", "mse", *flags)
        assert_one_error_line(rc, err, "OUT is IN")
    link = tmp_path / "link.safetensors"
    link.symlink_to(fp_file)
    rc, _, err = cli(capsys, fp_file, link, "--kv-method", "mse", "--force")
    assert_one_error_line(rc, err, "OUT is IN")
    assert digest(fp_file) == before


# ------------------------------------------------------------------ the real CLI
# convert-cache whose write pauses 60 s with the temp file written (its fsync delayed),
# so that a test can interrupt it there.
SLOW_WRITE = """import sys, time
from mlx_lm_turbo import convert_cache
fsync = convert_cache.fsync
def slow(path):
    time.sleep(60)
    fsync(path)
convert_cache.fsync = slow
sys.exit(convert_cache.main(sys.argv[1:]))
"""


def run_convert(*argv, slow_write: bool = False, **kw) -> subprocess.Popen:
    command = ["-c", SLOW_WRITE] if slow_write else ["-m", "mlx_lm_turbo.convert-cache"]
    return subprocess.Popen([sys.executable, *command, *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, **kw)


def test_module_with_hyphen_runs(fp_file, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlx_lm_turbo.convert-cache", "--help"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert r.returncode == 0 and "--kv-method" in r.stdout and "--info" in r.stdout
    p = run_convert(tmp_path / "missing.safetensors", tmp_path / "o.safetensors",
                    "--kv-method", "mse", env=env())
    _, err = p.communicate(timeout=300)
    assert_one_error_line(p.returncode, err, "no such file")


def wait_for_temp(out: Path, p: subprocess.Popen, timeout: float = 240) -> list:
    t0 = time.time()
    while time.time() - t0 < timeout:
        temps = list(out.parent.glob(f".{out.name}.tmp-*"))
        if temps:
            return temps
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    raise AssertionError("no temp file appeared")


def test_kill_9_mid_write_leaves_no_out(fp_file, tmp_path):
    out = tmp_path / "killed.safetensors"
    p = run_convert(fp_file, out, "--kv-method", "mse", "--kv-bits", "3",
                    env=env(), slow_write=True)
    temps = wait_for_temp(out, p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(t.exists() for t in temps)  # a dead process cannot clean up ...
    not_ours = tmp_path / ".notes.tmp-draft.safetensors"
    not_ours.write_text("x")
    # ... the next run into that folder does, whatever OUT it writes
    rc = main([str(fp_file), str(tmp_path / "other.safetensors"), "--kv-method", "mse",
               "--kv-bits", "3"])
    assert rc == 0 and not any(t.exists() for t in temps)
    assert not_ours.exists()
    rc = main([str(fp_file), str(out), "--kv-method", "mse", "--kv-bits", "3"])
    assert rc == 0 and out.exists()
    assert not list(tmp_path.glob(f".{out.name}.tmp-*"))


def test_sigterm_mid_write_cleans_up(fp_file, tmp_path):
    out = tmp_path / "term.safetensors"
    p = run_convert(fp_file, out, "--kv-method", "mse", "--kv-bits", "3",
                    env=env(), slow_write=True)
    wait_for_temp(out, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert_one_error_line(p.returncode, err, "interrupted")
    assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))


# ------------------------------------------------------------------ real model
def run_ok(cmd: list, timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=timeout, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.mark.slow
def test_real_model_round_trip(tmp_path, model_dir):
    """cache_prompt ~1k tokens of Alice (the 4k run was done by hand; see the report) ->
    fp16 file -> 3-bit file (>= 4.5x smaller than the fp16 file) -> generate continues
    from it -> --to fp16 loads in an unpatched mlx-lm."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    alice = SHARED / "data" / "book_alice_in_wonderland.txt"
    needs_shared_data(alice)  # the answer is checked for the story's names
    tok = load_tokenizer(model_dir)
    book = alice.read_text()
    start = book.find("Alice was beginning")
    excerpt = tok.decode(tok.encode(book[start:start + 8000])[:1000])
    py = sys.executable
    e = env()
    # The same weights dequantized to fp32 (as the real_model fixture does): mlx's 4-bit
    # matmuls are ~5x slower on a CPU (1k-token prefill: 144 s vs 26 s on 2 busy cores).
    model = tmp_path / "smollm2-fp32"
    run_ok([py, "-m", "mlx_lm", "convert", "--hf-path", model_dir, "--mlx-path", model,
            "-d"], env=e, cwd=ROOT)
    raw = tmp_path / "alice.safetensors"  # the model's dtype (fp32 for this folder)
    t0 = time.time()
    run_ok([py, "-m", "mlx_lm", "cache_prompt", "--model", model, "--prompt", "-",
            "--prompt-cache-file", raw], input=excerpt, env=e, cwd=ROOT)
    t_prefill = time.time() - t0
    fp16 = tmp_path / "alice-fp16.safetensors"
    run_ok([py, "-m", "mlx_lm_turbo.convert-cache", raw, fp16, "--to", "fp16",
            "--model", model], env=e, cwd=ROOT)
    small = tmp_path / "alice-3bit.safetensors"
    r = run_ok([py, "-m", "mlx_lm_turbo.convert-cache", fp16, small, "--kv-method",
                "turboquant_mse", "--kv-bits", "3", "--model", model_dir], env=e, cwd=ROOT)
    s16, s3 = fp16.stat().st_size, small.stat().st_size
    print(f"\nprefill {t_prefill:.1f}s; {raw.stat().st_size} bytes as cached ({raw.name}), "
          f"{s16} bytes fp16, {s3} bytes 3-bit: {s16 / s3:.2f}x\n{r.stdout}")
    assert s16 / s3 >= 4.5, (s16, s3)
    info = run_ok([py, "-m", "mlx_lm_turbo.convert-cache", "--info", small], env=e, cwd=ROOT)
    assert "K turboquant_mse 4-bit / V turboquant_mse 2-bit" in info.stdout   # --kv-bits 3
    assert "layers: 30" in info.stdout
    g = run_ok([py, "-m", "mlx_lm_turbo", "generate", "--prompt-cache-file", small,
                "--prompt", "\n\nWho is the girl in this story, and what animal did she follow?",
                "--max-tokens", "40", "--temp", "0"], env=e, cwd=ROOT)
    answer = g.stdout.split("==========")[1]
    print(answer)
    assert "Alice" in answer or "Rabbit" in answer or "rabbit" in answer, answer
    assert "30/30 layers compressed" in g.stdout
    back = tmp_path / "alice-back.safetensors"
    run_ok([py, "-m", "mlx_lm_turbo.convert-cache", small, back, "--to", "fp16"], env=e, cwd=ROOT)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain["MLX_LM_TURBO_DISABLE"] = "1"  # the installed start-up hook would patch mlx-lm
    r = run_ok([py, "-c", "import sys\nfrom mlx_lm.models import cache as C\n"
                "assert not hasattr(C, 'TurboKVCache')\n"
                "c = C.load_prompt_cache(sys.argv[1])\n"
                "print(len(c), {type(x).__name__ for x in c}, c[0].offset)", back],
               env=plain, cwd="/")
    assert r.stdout.startswith("30 {'KVCache'}"), r.stdout
