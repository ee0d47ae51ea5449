"""The whole pipeline as one Ray job (the same command as `ttpa run`).

ray job submit --working-dir . -- python -m jobs.pipeline --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]], "python -m jobs.pipeline")
