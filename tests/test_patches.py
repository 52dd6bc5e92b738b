"""patches/mlx-lm-0.32.2-turbo.diff applies to a pristine mlx-lm 0.32.2 and its hooks work.

Offline: the pristine copy is the mlx_lm package installed in this interpreter.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIFF = ROOT / "patches" / "mlx-lm-0.32.2-turbo.diff"
VERSION = "0.32.2"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A copy of the installed mlx_lm package: tmp/mlx_lm/... (the diff's -p1 layout)."""
    if importlib.metadata.version("mlx-lm") != VERSION:
        pytest.skip(f"the diff is for mlx-lm {VERSION}; installed: "
                    f"{importlib.metadata.version('mlx-lm')}")
    if shutil.which("patch") is None:
        pytest.skip("no `patch` program")
    origin = Path(importlib.util.find_spec("mlx_lm").origin).parent
    if "_mlx_lm_turbo_hook" in (origin / "__init__.py").read_text():
        pytest.skip(f"the installed mlx-lm at {origin} is already patched, not pristine")
    dest = tmp_path_factory.mktemp("mlx_lm_fork")
    shutil.copytree(origin, dest / "mlx_lm", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _patch(cwd, *flags):
    with open(DIFF, "rb") as f:
        return subprocess.run(["patch", "-p1", "--batch", *flags], stdin=f,
                              cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def patched(pristine):
    r = _patch(pristine, "--forward", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout and "fuzz" not in r.stdout and "offset" not in r.stdout, r.stdout
    r = _patch(pristine, "--forward")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(pristine.rglob("*.rej")) and not list(pristine.rglob("*.orig"))
    return pristine


def test_diff_touches_only_mlx_lm_files():
    heads = [ln for ln in DIFF.read_text().splitlines() if ln.startswith(("--- ", "+++ "))]
    assert heads and all(ln[4:].startswith(("a/mlx_lm/", "b/mlx_lm/")) for ln in heads), heads
    removed = [ln for ln in DIFF.read_text().splitlines()
               if ln.startswith("-") and not ln.startswith("--- ")]
    assert removed == []  # hooks are added; nothing of mlx-lm is changed or dropped


def test_patched_files_compile_and_have_hooks(patched):
    for name in ("__init__.py", "server.py"):
        src = (patched / "mlx_lm" / name).read_text()
        compile(src, name, "exec")
        assert "_mlx_lm_turbo_hook()" in src
    assert "mlx_lm_turbo.patch import apply\n" in (patched / "mlx_lm" / "__init__.py").read_text()


def _run(fork, code, **env):
    """Fresh interpreter importing the patched copy; the .pth hook (if installed) is removed
    first so that only the diff's hooks can patch."""
    prog = ("import sys\ntry:\n    import mlx_lm_turbo_hook; mlx_lm_turbo_hook.uninstall()\n"
            "except ImportError:\n    pass\n" + code)
    e = {k: v for k, v in os.environ.items() if k not in ("MLX_LM_TURBO_DISABLE", "PYTHONPATH")}
    e.update(PYTHONPATH=os.pathsep.join([str(fork), str(ROOT)]), HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          env=e, cwd=fork, timeout=300)


CHECK = """
import mlx_lm, mlx_lm.models.base as base
assert mlx_lm.__file__.startswith(%r), mlx_lm.__file__
print(getattr(base, "_mlx_lm_turbo_patched", False))
import mlx_lm.server
sys.argv = ["mlx_lm.generate", "--help"]
from mlx_lm.generate import main
main()
"""
HAS_SERVER = "def apply_server(" in (ROOT / "mlx_lm_turbo" / "patch.py").read_text()


def test_patched_mlx_lm_has_our_flags(patched):
    r = _run(patched, CHECK % str(patched))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "True"
    assert "--kv-method" in r.stdout


@pytest.mark.parametrize("disable", ["0", "1"])
def test_patched_server_hook(patched, disable):
    if not HAS_SERVER:
        pytest.skip("mlx_lm_turbo.patch has no apply_server() yet")
    r = _run(patched, "sys.argv = ['mlx_lm.server', '--help']\n"
             "import mlx_lm.server\nassert mlx_lm.server.__file__.startswith(%r)\n"
             "mlx_lm.server.main()" % str(patched), MLX_LM_TURBO_DISABLE=disable)
    assert r.returncode == 0, r.stderr
    assert "--model" in r.stdout and ("--kv-method" in r.stdout) == (disable == "0")


def test_patched_mlx_lm_disabled_is_pristine(patched):
    r = _run(patched, CHECK % str(patched), MLX_LM_TURBO_DISABLE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
    assert "--kv-method" not in r.stdout and "--kv-bits" in r.stdout


def test_patched_mlx_lm_without_mlx_lm_turbo(patched, tmp_path):
    """Without the mlx_lm_turbo package the hooks are silent no-ops."""
    e = {k: v for k, v in os.environ.items() if k not in ("MLX_LM_TURBO_DISABLE", "PYTHONPATH")}
    # hide mlx_lm_turbo (a meta-path blocker) but keep mlx, mlx-lm's dependencies
    prog = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('mlx_lm_turbo', 'mlx_lm_turbo_hook'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "for f in [f for f in sys.meta_path if type(f).__name__ == '_Finder']:\n"
            "    sys.meta_path.remove(f)\n" + CHECK % str(patched))
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                       env={**e, "PYTHONPATH": str(patched), "HF_HUB_OFFLINE": "1"},
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
    assert "--kv-method" not in r.stdout


def test_reverse_applies(patched):
    r = _patch(patched, "-R", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr


def test_kv_bits_spends_one_more_bit_on_keys():
    """--kv-bits b with turboquant_mse: keys b+1, values b-1 (2 <= b <= 7); explicit key
    or value bits, other methods and the ends of the range take b as it is."""
    import argparse

    from mlx_lm_turbo.config import add_arguments, config_from_args

    def bits(*argv):
        p = argparse.ArgumentParser()
        p.add_argument("--kv-bits", type=int, default=None)
        add_arguments(p)
        c = config_from_args(p.parse_args(list(argv)))
        return c.key_bits, c.value_bits

    assert bits("--kv-method", "turboquant_mse") == (5, 3)
    assert bits("--kv-method", "mse", "--kv-bits", "3") == (4, 2)
    assert bits("--kv-method", "mse", "--kv-bits", "2") == (3, 1)
    assert bits("--kv-method", "mse", "--kv-bits", "8") == (8, 8)
    assert bits("--kv-method", "mse", "--kv-bits", "4", "--kv-key-bits", "4") == (4, 4)
    assert bits("--kv-method", "mse", "--kv-value-bits", "2") == (4, 2)
    assert bits("--kv-method", "rvq", "--kv-bits", "2") == (2, 2)
    assert bits("--kv-method", "polar", "--kv-bits", "3") == (3, 3)
