"""mlx-lm's own cache, generation and model tests pass with ``mlx_lm_turbo.patch.apply()``.

The test files come from the sdist of the installed mlx-lm (``pip download`` from PyPI into a
cache folder; skipped with the reason if that fails; nothing of mlx-lm is vendored here). Each
file runs in a subprocess of pytest with a tiny plugin that applies the patch before the files
are imported (so they import the patched ``make_prompt_cache`` etc.) and checks it is in force.

Offline adjustments, each one checked to fail identically on pristine mlx-lm (patch not applied):

- test_prompt_cache.py / test_generate.py load ``mlx-community/Qwen1.5-0.5B-Chat-4bit`` from the
  HF hub in ``setUpClass``; offline that is the real SmolLM2-135M in ``models/smollm2-135m`` (the
  plugin maps the hub name to it; fetched if missing). Tests that expect Qwen1.5 outputs are deselected
  (MODEL_SPECIFIC).
- Metal-only kernels (bitnet, gated delta) are deselected where Metal is unavailable.
- Three batch-generation tests that take 20-105 s each on 2 CPU cores are deselected unless
  pytest runs with ``--full-mlx-lm-suite`` (SLOW).

Run time: about 1.5 min on 2 CPU cores after the one-off sdist download.
"""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_MODEL = os.environ.get("MLX_LM_SUITE_MODEL")  # default: conftest's SmolLM2
HUB_MODEL = "mlx-community/Qwen1.5-0.5B-Chat-4bit"
VERSION = importlib.metadata.version("mlx-lm")

FILES = {  # file -> needs the (substituted) hub model
    "test_prompt_cache.py": True,
    "test_generate.py": True,
    "test_models.py": False,
}
_G = "test_generate.py::TestGenerate::"
MODEL_SPECIFIC = {  # expectations of Qwen1.5-0.5B; fail the same on pristine mlx-lm + SmolLM2
    _G + "test_generate_with_logit_bias": "expects token 0 of Qwen's vocabulary ('!')",
    _G + "test_stream_generate_input_embeddings": "expects Qwen's output 'TEST'",
    _G + "test_stream_generate_input_embeddings_prefill": "expects Qwen's output 'TEST'",
    _G + "test_batch_max_kv_size_creates_rotating_cache": "KVCache, not Rotating, with SmolLM2",
    _G + "test_batch_sliding_window": "batch vs single logprobs beyond 1e-4 with SmolLM2",
}
SLOW = {  # seconds measured on 2 shared CPU cores
    _G + "test_batch_continued_generation": 105,
    _G + "test_batch_unique_max_toks": 24,
    _G + "test_many_batches": 23,
}
_M = "test_models.py::TestModels::"
METAL_ONLY = [_M + "test_bitnet", _M + "test_gated_delta", _M + "test_gated_delta_masked"]

PLUGIN = '''
import os

HUB_MODEL = {hub!r}
LOCAL_MODEL = os.environ.get("MLX_LM_SUITE_LOCAL_MODEL")


def pytest_configure(config):
    from mlx_lm_turbo import patch
    import mlx_lm.models.base as base
    import mlx_lm.models.cache as cache

    patch.apply()
    assert base._mlx_lm_turbo_patched and hasattr(cache, "TurboKVCache")
    assert base.scaled_dot_product_attention is patch.scaled_dot_product_attention
    assert patch.get_config() is None
    if LOCAL_MODEL:
        import mlx_lm.utils

        load = mlx_lm.utils.load

        def load_offline(path_or_hf_repo, *args, **kwargs):
            if path_or_hf_repo == HUB_MODEL:
                path_or_hf_repo = LOCAL_MODEL
            return load(path_or_hf_repo, *args, **kwargs)

        mlx_lm.utils.load = load_offline


def pytest_terminal_summary(terminalreporter):
    import mlx_lm.models.base as base

    terminalreporter.write_line(
        "mlx_lm_turbo patch in force: %s" % getattr(base, "_mlx_lm_turbo_patched", False))
'''


def _sdist() -> Path:
    cache = Path(os.environ.get("MLX_LM_SDIST_DIR",
                                Path(tempfile.gettempdir()) / "mlx_lm_turbo_sdist"))
    found = [p for p in cache.glob("*.tar.gz")
             if p.name in (f"mlx_lm-{VERSION}.tar.gz", f"mlx-lm-{VERSION}.tar.gz")]
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"mlx-lm=={VERSION}", "-d", str(cache)],
                       capture_output=True, text=True, timeout=600)
    found = [p for p in cache.glob("*.tar.gz")
             if p.name in (f"mlx_lm-{VERSION}.tar.gz", f"mlx-lm-{VERSION}.tar.gz")]
    if r.returncode != 0 or not found:
        pytest.skip(f"cannot download the mlx-lm {VERSION} sdist from PyPI: "
                    f"{(r.stdout + r.stderr)[-500:]}")
    return found[0]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    """tmp/tests/<mlx-lm's test files>, tmp/turbo_suite_plugin.py, tmp/pytest.ini."""
    sdist = _sdist()
    dest = tmp_path_factory.mktemp("mlx_lm_suite")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) >= 3 and parts[1] == "tests" and m.isfile():
                m.name = str(Path(*parts[1:]))
                members.append(m)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)
    missing = [f for f in FILES if not (dest / "tests" / f).exists()]
    assert not missing, f"the mlx-lm {VERSION} sdist has no tests/{missing}"
    (dest / "turbo_suite_plugin.py").write_text(PLUGIN.format(hub=HUB_MODEL))
    (dest / "pytest.ini").write_text("[pytest]\n")
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FILES))
def test_mlx_lm_suite_with_patch(suite_dir, name, request):
    import mlx.core as mx

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLX_LM_TURBO_DISABLE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(suite_dir), str(ROOT)]))
    deselect = []
    if FILES[name]:
        from conftest import smollm2_path

        env["MLX_LM_SUITE_LOCAL_MODEL"] = str(LOCAL_MODEL or smollm2_path())
        deselect += MODEL_SPECIFIC
        if not request.config.getoption("full_mlx_lm_suite"):
            deselect += SLOW
    if not mx.metal.is_available():
        deselect += METAL_ONLY
    deselect = [d for d in deselect if d.startswith(name + "::")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "turbo_suite_plugin",
           "-p", "no:cacheprovider", "-c", str(suite_dir / "pytest.ini"),
           "--rootdir", str(suite_dir), f"tests/{name}",
           *(f"--deselect=tests/{d}" for d in deselect)]
    r = subprocess.run(cmd, cwd=suite_dir, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert "mlx_lm_turbo patch in force: True" in r.stdout, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
