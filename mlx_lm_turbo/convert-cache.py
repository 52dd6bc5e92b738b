import sys
from mlx_lm_turbo.convert_cache import main
sys.exit(main())
