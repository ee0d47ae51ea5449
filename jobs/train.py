"""SFT or DPO on Ray Train + DeepSpeed as a Ray job.

    ray job submit --working-dir . -- python -m jobs.train --config configs/local.yaml --stage dpo \
        [train.deepspeed=zero3 train.dpo.reference=live ...]
"""

from __future__ import annotations

import argparse
import sys

from ttpa_ray.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, start or join Ray, run the stage and print where the policy is."""
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/local.yaml")
    parser.add_argument("--stage", required=True, choices=["sft", "dpo"])
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.deepspeed=zero3")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    from ttpa_ray.models import ModelNotFoundError, resolve_model
    from ttpa_ray.pipeline import ClusterUnreachable, init_ray
    from ttpa_ray.store import mirrored
    from ttpa_ray.train.run import TrainInputError, run_stage

    try:
        policy = resolve_model(config.model.policy)
    except ModelNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        init_ray(config)
    except ClusterUnreachable as err:
        print(err, file=sys.stderr)
        return 2
    try:
        with mirrored(config.run.remote, config.run.work_dir):
            outcome = run_stage(
                args.stage,
                config.train,
                policy=policy,
                run_dir=config.run.work_dir,
                seed=config.run.seed,
                run_name=config.run.name,
                dtype=config.model.dtype,
                vllm=config.vllm,
            )
    except (TrainInputError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 2
    print(
        f"{args.stage}: {outcome.rows_used} rows trained, {outcome.rows_rejected} rejected "
        f"{outcome.reject_counts}; policy: {outcome.result.policy_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
