"""RateQuant allocation: budget, monotonicity, save/load, calibration time."""

import time

import numpy as np
import pytest

from mlx_lm_turbo import ratequant
from mlx_lm_turbo.cache import TurboConfig


def synthetic(n_layers: int = 12, seed: int = 0) -> ratequant.Calibration:
    rng = np.random.default_rng(seed)
    proxy = rng.lognormal(0, 1, (n_layers, 2))
    # Measured curves: sensitivity times the MSE codec's distortion decay.
    decay = {1: 0.36, 2: 0.116, 3: 0.034, 4: 0.0093, 8: 4e-5}
    measured = {b: proxy * d for b, d in decay.items()}
    return ratequant.Calibration(list(range(n_layers)), [(64, 64)] * n_layers, [3] * n_layers,
                                 n_layers, proxy, measured, 0.0)


@pytest.mark.parametrize("solver", ["greedy", "waterfill"])
@pytest.mark.parametrize("target", [1.5, 2.5, 3.5, 5.0])
def test_allocation_spends_the_target(solver, target):
    cal = synthetic()
    bits = ratequant.allocate(cal, "turboquant_mse", target, solver=solver)
    bpe = ratequant.mean_bits_per_element(cal, "turboquant_mse", "turboquant_mse", bits)
    # Integer choices: never above the target, and below it by less than one slot's
    # largest upgrade (4 -> 8 bits) spread over all slots.
    step = 4 / (2 * len(bits))
    assert target - step - 1e-9 <= bpe <= target + 1e-9, bpe


def test_proxy_solver_is_monotone_in_sensitivity():
    cal = synthetic(16, seed=3)
    bits = ratequant.allocate(cal, "turboquant_mse", 2.5, solver="waterfill")
    for kv in (0, 1):
        order = np.argsort(cal.proxy[:, kv])
        allotted = [bits[i][kv] for i in order]
        assert allotted == sorted(allotted), (kv, allotted)


def test_target_outside_choices_is_a_clear_error():
    with pytest.raises(ValueError, match="outside what the bit choices allow"):
        ratequant.allocate(synthetic(), "turboquant_mse", 9.5)
    with pytest.raises(ValueError, match="outside what the bit choices allow"):
        ratequant.allocate(synthetic(), "turboquant_mse", 1.0)


def test_save_load_round_trip_and_mismatch(tmp_path):
    cal = synthetic()
    cfg = TurboConfig("turboquant_mse", 4)
    bits = ratequant.allocate(cal, "turboquant_mse", 2.5)
    path = str(tmp_path / "alloc.json")
    ratequant.save(path, cal, cfg, 2.5, bits)
    sig = ratequant.model_signature(cal.n_cache_layers, cal.layers, cal.kv_heads, cal.head_dims)
    assert ratequant.load(path, sig, cfg) == bits
    other = dict(sig, kv_heads=[4] * len(cal.layers))
    with pytest.raises(ValueError, match="another model"):
        ratequant.load(path, other, cfg)
    with pytest.raises(ValueError, match="made for turboquant_mse"):
        ratequant.load(path, sig, TurboConfig("turboquant_rvq", 2))


@pytest.mark.slow
def test_calibration_on_the_real_model_is_fast(real_model):
    """Calibration costs a few forward passes of its tokens, timed against a plain forward
    pass of the same tokens in the same test: other processes on a shared machine slow
    both alike, so the ratio holds where a fixed number of seconds does not."""
    import mlx.core as mx

    from mlx_lm_turbo import patch

    model, tok = real_model
    ratequant.calibrate(model, tok, "turboquant_mse")  # warm-up: codebooks, kernels
    ids = mx.array(tok.encode(ratequant.CALIBRATION_TEXT.read_text())[:256])[None]
    forward, calibration = [], []
    for _ in range(2):  # interleaved, the faster of each
        t = time.perf_counter()
        mx.eval(model(ids, cache=patch._originals["make_prompt_cache"](model)))
        forward.append(time.perf_counter() - t)
        t = time.perf_counter()
        cal = ratequant.calibrate(model, tok, "turboquant_mse")
        calibration.append(time.perf_counter() - t)
    ratio = min(calibration) / min(forward)
    print(f"calibration: {min(calibration):.2f} s = {ratio:.1f} forward passes")
    # One recorded forward pass plus codec trials on the last 96 queries of every layer
    # (about 3 passes here); 6 leaves room for noise, not for trials on every query.
    assert ratio <= 6.0, (calibration, forward)
    assert cal.measured[1].shape == (30, 2) and np.all(cal.measured[1] > cal.measured[4])
    bits = ratequant.allocate(cal, "turboquant_mse", 2.5)
    assert abs(ratequant.mean_bits_per_element(cal, "turboquant_mse", "turboquant_mse", bits) - 2.5) < 0.02


def test_prompt_cache_file_is_checked_against_the_allocation():
    import mlx.core as mx

    from mlx_lm_turbo import patch
    from mlx_lm_turbo.cache import TurboKVCache

    caches = [TurboKVCache("turboquant_mse", kb, "turboquant_mse", vb, layer=i,
                           center_keys=True, scale_keys=True)   # (the flags' default)
              for i, (kb, vb) in enumerate([(4, 2), (3, 3)])]
    for c in caches:
        c.update_and_fetch(mx.zeros((1, 1, 2, 64)) + 1, mx.zeros((1, 1, 2, 64)) + 1)
    same = TurboConfig("turboquant_mse", 4, layer_bits=((4, 2), (3, 3)))
    patch.check_loaded_cache(caches, same)
    other = TurboConfig("turboquant_mse", 4, layer_bits=((4, 2), (4, 3)))
    with pytest.raises(ValueError, match="layer 1 was compressed with turboquant_mse K3"):
        patch.check_loaded_cache(caches, other)


class ByteTokenizer:
    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))


@pytest.mark.parametrize("target", ["nan", "inf", "-1", "0"])
def test_impossible_targets_are_refused_when_parsing(target):
    import importlib

    from mlx_lm_turbo import patch

    patch.apply()
    parser = importlib.import_module("mlx_lm.generate").setup_arg_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--kv-method", "mse", "--ratequant-target", target])
    assert e.value.code == 2


@pytest.mark.parametrize("target,save,message", [
    (0.5, None, "outside what the bit choices allow"),
    (100, None, "outside what the bit choices allow"),
    (2.5, "/nonexistent-folder/alloc.json", "no such folder"),
    (2.5, ".", "is a folder"),
])
def test_bad_target_or_save_path_is_refused_before_calibrating(tiny_model, monkeypatch,
                                                               target, save, message):
    """Only the 4-token probe of the layers' shapes runs (no codec trials)."""
    calls = []
    calibrate = ratequant.calibrate

    def recording(*args, **kwargs):
        calls.append(kwargs.get("choices", ratequant.DEFAULT_CHOICES))
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(ratequant, "calibrate", recording)
    config = TurboConfig("turboquant_mse", 4, ratequant_target=target, ratequant_save=save)
    with pytest.raises(ValueError, match=message):
        ratequant.resolve(tiny_model, ByteTokenizer(), config, verbose=False)
    assert all(choices == () for choices in calls), calls


def test_cli_refuses_a_target_out_of_reach_before_calibrating(model_dir):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mlx_lm_turbo", "generate", "--model",
                        str(model_dir), "--kv-method", "mse", "--ratequant-target", "100",
                        "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --ratequant-target 100.0 is outside what the bit choices allow"), r.stderr
    # (no "RateQuant calibration" progress bar: the codec trials never started)


def test_server_start_up_line_names_a_loaded_allocation(monkeypatch, capsys, tmp_path):
    import sys

    from mlx_lm import server as mlx_server

    from mlx_lm_turbo import patch

    patch.apply_server()
    monkeypatch.setattr(sys, "argv", ["mlx_lm.server"])
    p = mlx_server.argparse.ArgumentParser()
    p.parse_args(["--kv-method", "mse", "--ratequant-load", str(tmp_path / "alloc.json")])
    err = capsys.readouterr().err
    assert f"RateQuant allocation from {tmp_path / 'alloc.json'}" in err, err
    assert "-1" not in err, err
