"""The whole pipeline as one Ray job.

ray job submit --working-dir . -- python -m jobs.pipeline --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from ttpa_ray.config import ConfigError, load_config
from ttpa_ray.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/local.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tps.top_k=5")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    run_pipeline(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
