"""The `ttpa` command line: what it exposes works, and user errors end in one clear message."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from ttpa_ray.cli import app
from ttpa_ray.tiny_model import folder_digest

runner = CliRunner()
LOCAL = str(Path(__file__).parent.parent / "configs" / "local.yaml")


def test_config_show_applies_overrides() -> None:
    result = runner.invoke(app, ["config", "show", "-c", LOCAL, "tps.top_k=3"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["tps"]["top_k"] == 3


def test_config_validate_names_the_key() -> None:
    ok = runner.invoke(app, ["config", "validate", "-c", LOCAL])
    assert ok.exit_code == 0 and "valid" in ok.output
    bad = runner.invoke(app, ["config", "validate", "-c", LOCAL, "vllm.enforce_eager=maybe"])
    assert bad.exit_code == 2
    assert "vllm.enforce_eager" in bad.output and "Traceback" not in bad.output


def test_make_tiny_model_is_reproducible(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = runner.invoke(app, ["make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert folder_digest(tmp_path / "m") == folder_digest(tiny_model_dir)


def test_doctor_reports_versions_and_vllm() -> None:
    result = runner.invoke(app, ["doctor", "--no-ray"])
    assert result.exit_code == 0, result.output
    for name in ("vllm", "ray", "trl", "deepspeed", "bfcl-eval", "transformers models", "tool sandbox"):
        assert name in result.output
    assert "isolated: no network" in result.output or "not enforced here" in result.output


def test_run_with_missing_model_folder_fails_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "run",
            "-c",
            LOCAL,
            f"run.run_dir={tmp_path}",
            f"model.policy={tmp_path / 'nope'}",
        ],
    )
    # refused at config validation, naming the key and the path; nothing is built in its place
    assert result.exit_code == 2
    assert "model.policy" in result.output and "nope" in result.output
    assert not (tmp_path / "nope").exists()


def test_config_validate_refuses_a_mistyped_model_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", "-c", LOCAL, "model.policy=./modles/tny"])
    assert result.exit_code == 2 and "model.policy" in result.output and "modles/tny" in result.output
    assert "valid" not in result.output.replace("invalid", "")


def test_ttpa_train_refuses_an_unknown_stage_in_one_line() -> None:
    result = runner.invoke(app, ["train", "ppo"])
    assert result.exit_code == 2
    assert "ttpa train: stage must be sft or dpo, got 'ppo'" in result.output
    planned = runner.invoke(app, ["train", "dpo", "--dry-run", "run.run_dir=s3://b/r"])
    assert (
        planned.exit_code == 0
        and "[1/1] dpo:" in planned.output
        and "writes s3://b/r/train/dpo" in planned.output
    )
