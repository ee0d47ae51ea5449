"""Reversed dataset construction as a Ray job.

ray job submit --working-dir . -- python -m jobs.reverse --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import main

if __name__ == "__main__":
    main(["reverse", *sys.argv[1:]], "python -m jobs.reverse")
