"""mlx-lm-turbo: compressed KV caches for mlx-lm that hold real packed codes."""

__version__ = "0.1.0"

# mlx_lm first: with the start-up hook installed, mlx_lm finishing its import applies our
# patch, which imports our cache module. Importing it here, before any of our modules,
# makes that happen while only this package (not a half-initialised cache module) is
# being imported, whichever of our modules a program imports first.
import importlib  # noqa: E402

importlib.import_module("mlx_lm")
