"""SFT or DPO on Ray Train + DeepSpeed as a Ray job (the same command as `ttpa train`).

    ray job submit --working-dir . -- python -m jobs.train dpo --config configs/local.yaml \
        [train.deepspeed=zero3 train.dpo.reference=live ...]
"""

from __future__ import annotations

import sys

from ttpa_ray.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], "python -m jobs.train")
