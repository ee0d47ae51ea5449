"""Reversed dataset construction as a Ray job.

ray job submit --working-dir . -- python -m jobs.reverse --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import app

if __name__ == "__main__":
    app(args=["reverse", *sys.argv[1:]], prog_name="python -m jobs.reverse")
