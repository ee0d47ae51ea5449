"""Evaluation as a Ray job: ESM, error categories and BFCL exact match, base against aligned.

    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/local.yaml \
        --model base=./models/tiny --model aligned=runs/local/policy
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import app

if __name__ == "__main__":
    app(args=["eval", *sys.argv[1:]], prog_name="python -m jobs.evaluate")
