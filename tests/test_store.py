"""The run dir in an object store (ttpa_ray/store.py), against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ttpa_ray import store
from ttpa_ray.config import ConfigError, load_config


def _bucket() -> str:
    from conftest import make_bucket

    return make_bucket(f"t-{uuid.uuid4().hex[:12]}")


def test_a_working_copy_is_pulled_and_pushed_file_by_file(s3_server: str, tmp_path: Path) -> None:
    remote = _bucket() + "/run"
    first = store.Mirror(remote, tmp_path / "a")
    (first.local / "dialogues").mkdir(parents=True)
    (first.local / "dialogues" / "train.parquet").write_bytes(b"PAR1 pretend")
    (first.local / "pipeline.json").write_text('{"stages_run": []}')
    (first.local / "half.tmp").write_text("never uploaded")
    uploaded: list[str] = []
    real_copy = store.pafs.copy_files

    def recording_copy(source: str, destination: str, **kwargs: object) -> None:
        uploaded.append(Path(source).name)
        real_copy(source, destination, **kwargs)  # type: ignore[arg-type]

    store.pafs.copy_files = recording_copy  # type: ignore[assignment]
    try:
        assert first.push() == 2
    finally:
        store.pafs.copy_files = real_copy  # type: ignore[assignment]
    assert uploaded[-1] == "pipeline.json"  # last: whoever sees a stage finished finds its outputs
    assert first.push() == 0  # nothing changed since
    (first.local / "pipeline.json").write_text('{"stages_run": ["reverse"]}')
    assert first.push() == 1
    assert store.read_text(remote + "/pipeline.json") == '{"stages_run": ["reverse"]}'
    assert not store.exists(remote + "/half.tmp")

    # another machine's working copy starts from the store; Ray Train's storage stays there
    store.write_text(remote + "/train/dpo/ray/run/checkpoint_000001/weights", "big")
    second = store.Mirror(remote, tmp_path / "b")
    assert second.pull() == 2
    assert (second.local / "dialogues" / "train.parquet").read_bytes() == b"PAR1 pretend"
    assert not (second.local / "train").exists()
    assert second.push() == 0  # what was pulled is in sync
    store.write_text(remote + "/pipeline.json", '{"stages_run": ["sft!!!!"]}')  # same size, newer
    second.pull()
    assert (second.local / "pipeline.json").read_text() == '{"stages_run": ["sft!!!!"]}'

    assert second.uri(second.local / "eval" / "report.json") == remote + "/eval/report.json"


def test_a_model_folder_in_the_store_is_fetched_once_per_version(s3_server: str, tmp_path: Path) -> None:
    folder = _bucket() + "/run/train/sft/policy"
    store.write_text(folder + "/config.json", json.dumps({"a": 1}))
    store.write_text(folder + "/weights.bin", "v1")
    local = Path(store.local_copy(folder))
    assert (local / "weights.bin").read_text() == "v1" and (local / "config.json").is_file()
    assert store.local_copy(folder) == str(local)  # cached
    store.write_text(folder + "/weights.bin", "v2-retrained")
    again = Path(store.local_copy(folder))
    assert again != local and (again / "weights.bin").read_text() == "v2-retrained"
    with pytest.raises(FileNotFoundError, match="no model folder"):
        store.local_copy(folder + "-missing")
    assert store.local_copy(str(tmp_path)) == str(tmp_path)  # a local path is itself


def test_shared_gives_the_uri_of_a_working_copy_path_and_uploads_it(s3_server: str, tmp_path: Path) -> None:
    remote = _bucket() + "/run"
    model = tmp_path / "wc" / "train" / "sft" / "policy"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    outside = tmp_path / "models" / "tiny"
    assert store.shared(model) == str(model)  # no run in a store: paths stay paths
    with store.mirrored(remote, tmp_path / "wc"):
        assert store.shared(model) == remote + "/train/sft/policy"
        assert store.exists(remote + "/train/sft/policy/config.json")
        assert store.shared(outside) == str(outside)  # not the run's: stays a path
    assert store.active() is None


def test_a_run_dir_uri_is_checked_and_resolves_a_working_copy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.run_dir=ftp://x/run: unsupported scheme 'ftp'"):
        load_config(None, ["run.run_dir=ftp://x/run"])
    config = load_config(None, ["run.run_dir=s3://bucket/runs/a/"]).run
    assert config.remote == "s3://bucket/runs/a"
    assert config.work_dir == store.CACHE / "runs" / "s3" / "bucket" / "runs" / "a"
    mine = load_config(None, ["run.run_dir=s3://bucket/runs/a", f"run.local_dir={tmp_path}"])
    assert mine.run.work_dir == tmp_path
    local = load_config(None, ["run.run_dir=runs/x"])
    assert local.run.remote is None and local.run.work_dir == Path("runs/x")
    # where the working copy is does not change what the run computes: it resumes
    from ttpa_ray.pipeline import RUN_PLACE

    other = load_config(None, ["run.run_dir=s3://bucket/runs/a", "run.local_dir=/elsewhere"])
    assert mine.digest(without=RUN_PLACE) == other.digest(without=RUN_PLACE)
    assert mine.digest() != other.digest()


def test_the_dry_run_says_where_a_bucket_run_reads_and_writes() -> None:
    from typer.testing import CliRunner

    from ttpa_ray.cli import app

    result = CliRunner().invoke(app, ["run", "--dry-run", "run.run_dir=s3://bucket/runs/a"])
    assert result.exit_code == 0, result.output
    assert "run dir s3://bucket/runs/a: the driver works in" in result.output
    assert "writes s3://bucket/runs/a/reverse/shards, s3://bucket/runs/a/dialogues" in result.output
    assert "s3://bucket/runs/a/train/dpo/ray" in result.output  # Ray Train's checkpoints


@pytest.mark.parametrize("where", ["bucket", "local"])
def test_the_newest_checkpoint_is_found_in_a_bucket_as_on_disk(
    s3_server: str, tmp_path: Path, where: str
) -> None:
    """A killed training stage resumes from its storage's newest complete checkpoint (every rank's
    upload done), wherever that storage is; a finished run's final checkpoint wins."""
    from ttpa_ray.train.ray_trainer import COMPLETE, HF_CHECKPOINT, POLICY, latest_checkpoint

    storage = _bucket() + "/train/dpo/ray" if where == "bucket" else str(tmp_path / "ray")
    assert latest_checkpoint(storage, "run-dpo") is None
    for step, complete in ((1, True), (2, True), (3, False)):  # 3's upload was cut short by the kill
        folder = store.join(storage, "run-dpo", f"checkpoint_00000{step}")
        store.write_text(store.join(folder, HF_CHECKPOINT, "trainer_state.json"), "{}")
        if complete:
            store.write_text(store.join(folder, COMPLETE), "")
    assert latest_checkpoint(storage, "run-dpo") == store.join(storage, "run-dpo", "checkpoint_000002")
    store.write_text(store.join(storage, "run-dpo", "final_policy", POLICY, "config.json"), "{}")
    assert latest_checkpoint(storage, "run-dpo") == store.join(storage, "run-dpo", "checkpoint_000002")
    store.write_text(store.join(storage, "run-dpo", "final_policy", COMPLETE), "")
    assert latest_checkpoint(storage, "run-dpo") == store.join(storage, "run-dpo", "final_policy")


def test_a_bucket_that_is_not_there_is_one_line_naming_the_run_dir(s3_server: str, tmp_path: Path) -> None:
    with pytest.raises(store.StoreError) as caught, store.mirrored("s3://no-such-bucket/run", tmp_path):
        pass
    message = str(caught.value)
    assert message.startswith("run.run_dir=s3://no-such-bucket/run: cannot read and write there (")
    assert "\n" not in message and "bucket does not exist" in message


def test_ttpa_run_on_a_missing_bucket_stops_with_that_line(s3_server: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ttpa_ray.cli",
            "run",
            "model.policy=tiny",
            "run.run_dir=s3://no-such-bucket/run",
            f"run.local_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "run.run_dir=s3://no-such-bucket/run: cannot read and write there" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
