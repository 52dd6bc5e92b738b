import os
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL_DIR = SHARED / "models" / "smollm2-135m-instruct-4bit"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random llama (GQA 4:2, head_dim 32): fast structural tests."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2,
                           intermediate_size=256, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=256, num_key_value_heads=2)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M from ../shared, weights dequantized to fp32 (fast on a CPU)."""
    if not MODEL_DIR.exists():
        pytest.fail(f"real model missing: {MODEL_DIR} (CI has ../shared beside the checkout)")
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(MODEL_DIR))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model, tokenizer


@pytest.fixture(scope="session")
def wikitext():
    return (SHARED / "data" / "wikitext2_test.raw").read_text()


@pytest.fixture(autouse=True)
def _no_leftover_config():
    yield
    from mlx_lm_turbo import patch

    patch.set_config(None)
