"""The sample stage as a Ray job (see ttpa_ray/tps_cli.py).

ray job submit --working-dir . -- python -m jobs.sample --config configs/local.yaml [key=value ...]
"""

from __future__ import annotations

import typer

from ttpa_ray.tps_cli import sample_command

if __name__ == "__main__":
    typer.run(sample_command)
