"""Installs mlx_lm_turbo.pth into site-packages, for regular and editable installs.

The .pth file runs ``import mlx_lm_turbo_hook`` at interpreter start-up: a tiny import hook that
patches mlx-lm only when mlx-lm is imported (see mlx_lm_turbo_hook.py). Everything else is in
pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).resolve().parent / "mlx_lm_turbo.pth"


class build_py_with_pth(build_py):
    """Regular wheels: put the .pth at the root of the wheel (installed into site-packages)."""

    def run(self):
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib, PTH.name)), preserve_mode=False)

    def get_outputs(self, *args, **kwargs):
        return [*super().get_outputs(*args, **kwargs), str(Path(self.build_lib, PTH.name))]


cmdclass = {"build_py": build_py_with_pth}

try:  # PEP 660 editable installs (setuptools >= 64): the wheel holds only link files
    from setuptools.command.editable_wheel import editable_wheel

    class _StrategyWithPth:
        def __init__(self, strategy):
            self._strategy = strategy

        def __call__(self, wheel, *args, **kwargs):
            self._strategy(wheel, *args, **kwargs)
            wheel.writestr(PTH.name, PTH.read_bytes())

        def __enter__(self):
            self._strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self._strategy.__exit__(*exc)

    class editable_wheel_with_pth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = editable_wheel_with_pth
except ImportError:
    pass

setup(cmdclass=cmdclass)
