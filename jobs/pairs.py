"""The pairs stage as a Ray job (the same command as `ttpa pairs`).

ray job submit --working-dir . -- python -m jobs.pairs --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import main

if __name__ == "__main__":
    main(["pairs", *sys.argv[1:]], "python -m jobs.pairs")
