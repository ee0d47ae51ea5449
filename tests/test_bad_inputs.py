"""Bad data between stages (issue 17): each is one line naming the file and the record, or a rejected
row, never a traceback from inside Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttpa_ray.cli import app
from ttpa_ray.records import Dialogue, RecordError, read_parquet

runner = CliRunner()


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "missing.parquet", "typed": tmp_path / "typed.parquet"}
    pq.write_table(pa.table({"dialogue_id": ["d-1"], "seed_id": ["s"]}), files["missing"])
    pq.write_table(pa.table({"dialogue_id": [7], "seed_id": ["s"], "messages": ["[]"]}), files["typed"])
    return files


def test_a_parquet_file_with_a_missing_or_mistyped_column_names_file_record_and_field(
    bad_files: dict[str, Path],
) -> None:
    with pytest.raises(RecordError) as missing:
        read_parquet(Dialogue, bad_files["missing"])
    assert str(missing.value) == f"{bad_files['missing']}: Dialogue row 'd-1' field 'messages': is missing"
    with pytest.raises(RecordError) as typed:
        read_parquet(Dialogue, bad_files["typed"])
    assert str(typed.value) == (
        f"{bad_files['typed']}: Dialogue row #0 field 'dialogue_id': expected a string, got int 7"
    )


def test_sample_on_a_broken_dialogue_file_is_one_line(
    bad_files: dict[str, Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    overrides = [f"run.run_dir={tmp_path}", f"model.policy={tiny_model_dir}"]
    result = runner.invoke(app, ["sample", "--dialogues", str(bad_files["missing"]), *overrides])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if str(bad_files["missing"]) in line]
    assert lines == [f"{bad_files['missing']}: Dialogue row 'd-1' field 'messages': is missing"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["empty", "all_broken"])
def test_a_catalogue_without_one_usable_tool_stops_reverse_with_one_line(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    folder = tmp_path / "tools"
    folder.mkdir()
    if kind == "all_broken":  # no docstring, no type hints: no schema can be made for either
        (folder / "broken.py").write_text("def first(x):\n    return x\n\n\ndef second(y):\n    return y\n")
    result = runner.invoke(
        app,
        [
            "reverse",
            f"run.run_dir={tmp_path / 'run'}",
            f"model.policy={tiny_model_dir}",
            f"reverse.catalogue={folder}",
        ],
    )
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if "has no usable tool" in line)
    assert str(folder) in line
    if kind == "all_broken":
        assert "first" in line
    assert "Traceback" not in result.output
