"""The sample stage as a Ray job (the same command as `ttpa sample`).

ray job submit --working-dir . -- python -m jobs.sample --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import main

if __name__ == "__main__":
    main(["sample", *sys.argv[1:]], "python -m jobs.sample")
