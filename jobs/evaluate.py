"""Evaluation as a Ray job: ESM, error categories and BFCL exact match, base against aligned.

    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/local.yaml \
        --model base=./models/tiny --model aligned=runs/local/policy
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]], "python -m jobs.evaluate")
