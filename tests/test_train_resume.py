"""Fault tolerance: a worker killed mid-run resumes from the last Ray Train checkpoint, with nothing
skipped or repeated, under DeepSpeed ZeRO-3 with a LIVE reference model (sharded like the policy).

Two runs on the same data and config: an uninterrupted one, and one whose rank 1 exits (``os._exit``)
right after step 3, once (a marker file disarms the crash). Checkpoints are every 2 steps, so the
second run restarts its workers from step 2 and redoes step 3. Each step records the sample indices
every rank trained on; the final run must have all configured steps with the same data order as the
uninterrupted run, each sample once, and the same final weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ttpa_ray.config import TrainConfig
from ttpa_ray.records import write_parquet
from ttpa_ray.train.data import bfcl_preference_pairs
from ttpa_ray.train.metrics import read_sample_log
from ttpa_ray.train.ray_trainer import CrashOnce
from ttpa_ray.train.run import StageOutcome, run_stage

MAX_STEPS = 5
CRASH_STEP = 3


def _run(tmp: Path, pairs_file: Path, policy: Path, crash: CrashOnce | None) -> StageOutcome:
    train = TrainConfig(
        num_workers=2,
        deepspeed="zero3",
        save_steps=2,
        keep_checkpoints=2,
        max_failures=2,
        dpo={
            "reference": "live",
            "shared_prefix": True,  # the default; both forwards (policy, sharded reference) pack each pair
            "learning_rate": 1e-3,
            "max_steps": MAX_STEPS,
            "per_device_batch_size": 2,
            "max_length": 512,
            "init_from_sft": False,
        },
    )
    return run_stage(
        "dpo", train, policy=str(policy), run_dir=tmp, run_name=tmp.name, input_path=pairs_file, crash=crash
    )


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(str(folder)).state_dict())


@pytest.mark.slow
def test_killed_worker_resumes_without_skipping_or_repeating(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs_file = write_parquet(bfcl_preference_pairs("simple_python")[:40], tmp_path / "pairs.parquet")
    clean = _run(tmp_path / "clean", pairs_file, tiny_model_dir, None)
    marker = tmp_path / "crashed.marker"
    crashed = _run(tmp_path / "crashed", pairs_file, tiny_model_dir, CrashOnce(CRASH_STEP, 1, str(marker)))

    assert marker.exists(), "the fault was never injected"
    assert int(crashed.result.metrics["step"]) == int(clean.result.metrics["step"]) == MAX_STEPS

    clean_log = read_sample_log(clean.out_dir / "samples")
    crashed_log = read_sample_log(crashed.out_dir / "samples")
    assert crashed_log == clean_log  # same data order, step by step, rank by rank
    seen = [i for rank in crashed_log.values() for step in sorted(rank) for i in rank[step]]
    assert len(seen) == len(set(seen)) == MAX_STEPS * 2 * 2  # 2 ranks x 2 pairs per step, none repeated
    assert set(crashed_log[0]) == set(range(1, MAX_STEPS + 1))

    # the redone step shows in the raw log of rank 0: it trained step 3 before and after the restart
    raw = (crashed.out_dir / "samples" / "samples-rank0.jsonl").read_text().splitlines()
    assert len(raw) > MAX_STEPS

    # checkpoints went to the Ray run folder (last N kept) and the final weights match the clean run
    ray_run = Path(crashed.result.run_path)
    kept = sorted(p.name for p in ray_run.glob("checkpoint_0*"))
    assert kept[-1] == f"checkpoint_{MAX_STEPS:06d}" and len(kept) <= 2  # HF also saves the last step
    assert (ray_run / "final_policy" / "policy" / "config.json").is_file()
    before, after = _state(clean.result.policy_dir), _state(crashed.result.policy_dir)  # type: ignore[arg-type]
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_killed_job_is_resumed_by_running_it_again(
    ray_cluster: Any, s3_server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A job that dies (no retries left) and is started again continues from its last checkpoint in
    its storage, here a bucket; run once more, it trains nothing."""
    from conftest import make_bucket

    write_parquet(bfcl_preference_pairs("simple_python")[:24], tmp_path / "pairs" / "part-0.parquet")
    train = TrainConfig(
        num_workers=2,
        deepspeed="zero2",
        save_steps=2,
        max_failures=0,
        storage_path=make_bucket("killed-job") + "/ray",
        dpo={"max_steps": 4, "per_device_batch_size": 2, "max_length": 512, "init_from_sft": False},
    )
    marker = tmp_path / "crashed.marker"

    def run(crash: CrashOnce | None) -> StageOutcome:
        return run_stage(
            "dpo", train, policy=str(tiny_model_dir), run_dir=tmp_path, run_name="job", crash=crash
        )

    with pytest.raises(Exception) as died:
        run(CrashOnce(3, 0, str(marker)))
    assert not isinstance(died.value, FileNotFoundError | ValueError)
    assert marker.exists()
    outcome = run(None)

    assert int(outcome.result.metrics["step"]) == 4
    raw = (outcome.out_dir / "samples" / "samples-rank0.jsonl").read_text().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in raw]
    # rank 0 died inside step 3 (before logging it); the second job went on from the step-2 checkpoint:
    # a restart from scratch would log [1, 2, 1, 2, 3, 4]
    assert steps == [1, 2, 3, 4]
    assert set(read_sample_log(outcome.out_dir / "samples")[0]) == {1, 2, 3, 4}
    assert "killed-job/ray/" in outcome.result.run_path  # Ray Train's run folder, in the bucket

    again = run(None)  # a finished run: its final checkpoint is the result, no step is trained again
    assert int(again.result.metrics["step"]) == 4
    assert (outcome.out_dir / "samples" / "samples-rank0.jsonl").read_text().splitlines() == raw
    assert again.result.policy_dir is not None and (again.result.policy_dir / "config.json").is_file()
