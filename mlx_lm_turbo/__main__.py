"""``python -m mlx_lm_turbo generate|cache_prompt ...``: mlx-lm's commands, patched."""

import importlib
import sys

COMMANDS = ("generate", "cache_prompt", "server")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m mlx_lm_turbo {{{','.join(COMMANDS)}}} [mlx-lm flags] "
              "[--kv-method M --kv-bits B ...]", file=sys.stderr)
        sys.exit(2)
    from . import patch

    patch.apply()
    command = sys.argv.pop(1)
    if command == "server":
        patch.apply_server()
    sys.argv[0] = f"mlx_lm.{command}"
    importlib.import_module(f"mlx_lm.{command}").main()


if __name__ == "__main__":
    main()
