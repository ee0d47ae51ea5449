"""The whole pipeline as one Ray job (the same command as `ttpa run`).

ray job submit --working-dir . -- python -m jobs.pipeline --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import app

if __name__ == "__main__":
    app(args=["run", *sys.argv[1:]], prog_name="python -m jobs.pipeline")
