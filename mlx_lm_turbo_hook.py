"""Start-up hook of mlx-lm-turbo, run by ``mlx_lm_turbo.pth`` in site-packages.

It installs one tiny ``sys.meta_path`` finder and imports nothing else: no mlx, no mlx_lm, not
even ``mlx_lm_turbo``. Only when a program imports ``mlx_lm`` (any mlx-lm command or
``import mlx_lm``) does the finder, right after the package has finished importing, call
``mlx_lm_turbo.patch.apply()``, so ``mlx_lm.generate --kv-method ...`` and
``mlx_lm.cache_prompt --kv-method ...`` work with no code change. When ``mlx_lm.server``
finishes importing it calls ``mlx_lm_turbo.patch.apply_server()`` if that exists.

Without our flags the patched mlx-lm behaves as before. ``MLX_LM_TURBO_DISABLE=1`` in the
environment turns the hook off (mlx-lm stays pristine). The form ``python -m mlx_lm.generate``
(deprecated by mlx-lm) runs the module's code a second time as ``__main__`` and so cannot be
patched; use the console script ``mlx_lm.generate``, ``python -m mlx_lm generate`` or
``python -m mlx_lm_turbo generate``.
"""

import os
import sys

__all__ = ["disabled", "install", "uninstall"]


def disabled() -> bool:
    return os.environ.get("MLX_LM_TURBO_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _activate(function: str) -> None:
    try:
        from mlx_lm_turbo import patch

        fn = getattr(patch, function, None)
        if fn is not None:
            fn()
    except Exception as e:  # never break mlx-lm itself; say why the flags are missing
        print(f"mlx-lm-turbo: not activated ({type(e).__name__}: {e}); "
              "set MLX_LM_TURBO_DISABLE=1 to silence this", file=sys.stderr)


# module name -> patch function called once that module has finished executing
_TARGETS = {"mlx_lm": "apply", "mlx_lm.server": "apply_server"}


class _Loader:
    """Wraps the real loader; after exec_module it restores it and calls the patch."""

    def __init__(self, loader, function: str):
        self._loader = loader
        self._function = function

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        _activate(self._function)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Answers only for the names in _TARGETS, by asking the other finders and wrapping the loader."""

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TARGETS or self._busy:
            return None
        self._busy = True
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader, _TARGETS[fullname])
        return spec

    def invalidate_caches(self):
        pass


_finder = None


def install() -> None:
    """Install the finder (idempotent). Called on import unless MLX_LM_TURBO_DISABLE is set."""
    global _finder
    if _finder is not None or disabled():
        return
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)
    # imported late (not from the .pth)? patch what is already there
    for name, function in _TARGETS.items():
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
            _activate(function)


def uninstall() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


install()
