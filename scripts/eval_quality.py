"""Quality report for compressed KV caches (thin wrapper around mlx_lm_turbo.eval).

    python scripts/eval_quality.py --data-dir DATA --configs fp16,affine4g64,mse4,rvq2,k4v2-mse
    python scripts/eval_quality.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm_turbo.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
