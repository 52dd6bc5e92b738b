"""The start-up hook (mlx_lm_turbo.pth -> mlx_lm_turbo_hook) in fresh interpreters.

Most tests process the repository's .pth the way ``site`` does at start-up
(``site.addsitedir`` on a folder holding a copy of it), so they test this checkout whether or not
the package is installed. ``test_installed_console_script`` uses the real console script when this
interpreter has the package installed; the slow tests install the package into throwaway venvs
(regular and editable) and check the .pth lands in site-packages and works.
"""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = ROOT / "mlx_lm_turbo.pth"
FLAG = "--kv-method"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLX_LM_TURBO_DISABLE", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def _run_with_pth(tmp_path, code, **env):
    """Run ``code`` in a fresh interpreter after processing a copy of our .pth like site does."""
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    shutil.copy(PTH, site_dir / PTH.name)
    prog = f"import site; site.addsitedir({str(site_dir)!r})\n{code}"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          env=_env(**env), cwd=tmp_path, timeout=300)


def _help_code(command):
    return (f"import sys; sys.argv = ['mlx_lm.{command}', '--help']\n"
            f"from mlx_lm.{command} import main\nmain()")


def test_pth_is_one_import_line():
    lines = [ln for ln in PTH.read_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("import ")  # site only executes such lines
    assert "mlx_lm_turbo_hook" in lines[0]


def test_importing_json_does_not_import_mlx(tmp_path):
    r = _run_with_pth(tmp_path, "import json\nimport sys\n"
                      "print('mlx' in sys.modules, 'mlx_lm' in sys.modules, "
                      "'mlx_lm_turbo' in sys.modules, 'mlx_lm_turbo_hook' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False", "True"]


def test_importing_our_modules_first_still_patches(tmp_path):
    """A program that imports one of our modules before mlx_lm (scripts, tests): mlx_lm
    finishes importing inside our package's import, and the hook's patch must still apply
    (it used to fail on a half-initialised mlx_lm_turbo.cache and print 'not activated')."""
    r = _run_with_pth(tmp_path, "import mlx_lm_turbo.cache\n"
                      "import mlx_lm.models.base as base\n"
                      "print(getattr(base, '_mlx_lm_turbo_patched', False))")
    assert r.returncode == 0, r.stderr
    assert "not activated" not in r.stderr, r.stderr
    assert r.stdout.split() == ["True"]


HAS_SERVER = "def apply_server(" in (ROOT / "mlx_lm_turbo" / "patch.py").read_text()


@pytest.mark.parametrize("command", ["generate", "cache_prompt", "server"])
def test_help_has_our_flags(tmp_path, command):
    if command == "server" and not HAS_SERVER:
        pytest.skip("mlx_lm_turbo.patch has no apply_server() yet")
    r = _run_with_pth(tmp_path, _help_code(command))
    assert r.returncode == 0, r.stderr
    assert FLAG in r.stdout and "--kv-seed" in r.stdout
    assert "not activated" not in r.stderr


@pytest.mark.parametrize("command", ["generate", "server"])
def test_disable_env_var(tmp_path, command):
    r = _run_with_pth(tmp_path, _help_code(command), MLX_LM_TURBO_DISABLE="1")
    assert r.returncode == 0, r.stderr
    assert "--model" in r.stdout and FLAG not in r.stdout


def test_import_mlx_lm_patches_and_keeps_loader(tmp_path):
    r = _run_with_pth(tmp_path, """
import importlib.machinery, inspect, sys
import mlx_lm
import mlx_lm.models.base as base
from mlx_lm.models import cache
assert getattr(base, "_mlx_lm_turbo_patched", False)
assert base.scaled_dot_product_attention.__module__ == "mlx_lm_turbo.patch"
assert hasattr(cache, "TurboKVCache")
assert isinstance(mlx_lm.__loader__, importlib.machinery.SourceFileLoader)
assert isinstance(mlx_lm.__spec__.loader, importlib.machinery.SourceFileLoader)
assert "import" in inspect.getsource(mlx_lm)
from mlx_lm_turbo import patch
patch.apply()  # idempotent after the hook
print("ok")
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_failing_patch_warns_and_leaves_mlx_lm_usable(tmp_path):
    """E.g. an unsupported mlx-lm version: apply() raises; mlx-lm still imports, one warning."""
    r = _run_with_pth(tmp_path, """
import sys, types
fake = types.ModuleType("mlx_lm_turbo.patch")
def apply():
    raise RuntimeError("mlx_lm_turbo supports mlx-lm >= X")
fake.apply = apply
sys.modules["mlx_lm_turbo.patch"] = fake
import mlx_lm.generate
print(sys.modules["mlx_lm.generate"].generate.__module__)
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "mlx_lm.generate"
    assert r.stderr.count("mlx-lm-turbo: not activated (RuntimeError: mlx_lm_turbo supports") == 1


def test_python_m_mlx_lm_cli(tmp_path):
    r = _run_with_pth(tmp_path, "import sys, runpy; sys.argv = ['mlx_lm', 'generate', '--help']\n"
                      "runpy.run_module('mlx_lm', run_name='__main__')")
    assert r.returncode == 0, r.stderr
    assert FLAG in r.stdout


def _installed_pth():
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return next((Path(d) / PTH.name for d in dirs if (Path(d) / PTH.name).exists()), None)


def test_installed_console_script():
    if _installed_pth() is None:
        pytest.skip("mlx-lm-turbo is not installed in this interpreter (pip install -e .)")
    script = Path(sysconfig.get_path("scripts")) / "mlx_lm.generate"
    cmd = [str(script), "--help"] if script.exists() else \
        [sys.executable, "-c", _help_code("generate")]
    env = {k: v for k, v in os.environ.items() if k != "MLX_LM_TURBO_DISABLE"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert FLAG in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**env, "MLX_LM_TURBO_DISABLE": "1"})
    assert r.returncode == 0, r.stderr
    assert FLAG not in r.stdout


# ------------------------------------------------ real installs into throwaway venvs
def _project_copy(tmp_path):
    src = tmp_path / "project"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "tests", "reports", "scripts", "patches",
        ".venv", ".pytest_cache", ".whl", ".gpu"))
    return src


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_pip_install_puts_pth_in_site_packages(tmp_path, editable):
    """pip install [-e] (PEP 517/660, latest setuptools from PyPI) installs a working hook."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    venv_site = Path(subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.strip())
    # mlx, mlx-lm and friends come from this interpreter's site-packages folders (path lines,
    # so those folders' own .pth files, ours included if installed, are not processed)
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (venv_site / "zz_deps.pth").write_text("".join(p + "\n" for p in deps))
    src = _project_copy(tmp_path)
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q",
                        *(["-e"] if editable else []), str(src)],
                       capture_output=True, text=True, timeout=600, env=_env(PYTHONPATH=""))
    if r.returncode != 0 and ("setuptools" in r.stderr and "No matching distribution" in r.stderr
                              or "Could not find a version" in r.stderr):
        pytest.skip(f"cannot fetch build requirements from PyPI: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (venv_site / PTH.name).read_text() == PTH.read_text()
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    run = lambda code, **e: subprocess.run([str(py), "-c", code], capture_output=True,
                                           text=True, env={**env, **e}, timeout=300, cwd=tmp_path)
    r = run("import json, sys; print('mlx' in sys.modules, 'mlx_lm_turbo_hook' in sys.modules)")
    assert r.stdout.split() == ["False", "True"], r.stderr
    r = run(_help_code("generate"))
    assert r.returncode == 0 and FLAG in r.stdout, r.stderr
    r = run(_help_code("generate"), MLX_LM_TURBO_DISABLE="1")
    assert r.returncode == 0 and FLAG not in r.stdout, r.stderr
    r = run("import mlx_lm_turbo; print(mlx_lm_turbo.__file__)")
    assert Path(r.stdout.strip()).resolve().is_relative_to(
        (src if editable else venv_site).resolve()), r.stdout + r.stderr
