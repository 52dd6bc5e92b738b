"""mlx-lm-turbo: compressed KV caches for mlx-lm that hold real packed codes."""

__version__ = "0.1.0"
