"""The held-out split of the reversed dialogues and their turn-by-turn evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ttpa_ray.config import load_config
from ttpa_ray.esm import ESMWeights
from ttpa_ray.evaluate import HELDOUT_CATEGORY, Answer, heldout_items, score_answers, summarize
from ttpa_ray.records import Dialogue, Message, read_parquet, write_parquet
from ttpa_ray.rundir import (
    SplitMissing,
    check_not_heldout,
    first_dialogue,
    part_size,
    read_split,
    split_dialogues,
    write_split,
)


def _two_way(dialogues: list[Dialogue], fraction: float, seed: int) -> tuple[list[Dialogue], list[Dialogue]]:
    parts = split_dialogues(dialogues, fraction, seed)
    assert parts["validation"] == []
    return parts["train"], parts["heldout"]


def test_split_is_deterministic_and_keeps_training_data() -> None:
    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", "q"),)) for i in range(20)]
    train, heldout = _two_way(dialogues, 0.1, seed=0)
    assert len(heldout) == 2 and len(train) == 18
    assert {d.dialogue_id for d in train}.isdisjoint(d.dialogue_id for d in heldout)
    _, again = _two_way(list(reversed(dialogues)), 0.1, seed=0)
    assert {d.dialogue_id for d in again} == {d.dialogue_id for d in heldout}  # the order does not matter
    picks = {frozenset(d.dialogue_id for d in _two_way(dialogues, 0.1, seed=s)[1]) for s in range(5)}
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)  # the run's seed draws the held-out set
    assert _two_way(dialogues, 0.0, seed=0) == (dialogues, [])
    assert _two_way(dialogues[:1], 0.5, seed=0) == (dialogues[:1], [])  # one dialogue: kept for training
    assert len(_two_way(dialogues[:2], 0.9, seed=0)[0]) == 1  # at least one stays for training


def test_validation_part_is_disjoint_and_the_heldout_one_does_not_move() -> None:
    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", "q"),)) for i in range(20)]
    parts = split_dialogues(dialogues, 0.2, 0, validation_fraction=0.15)
    assert [len(parts[p]) for p in ("train", "validation", "heldout")] == [13, 3, 4]
    ids = [{d.dialogue_id for d in parts[p]} for p in ("train", "validation", "heldout")]
    assert sum(len(i) for i in ids) == 20 and len(set().union(*ids)) == 20
    # adding a validation part takes it from training, never from the held-out dialogues
    assert ids[2] == {d.dialogue_id for d in split_dialogues(dialogues, 0.2, 0)["heldout"]}


def test_the_split_of_a_dataset_is_the_split_of_the_list_written_by_ray_data(
    ray_cluster: Any, tmp_path: Path
) -> None:
    """write_split on a Ray dataset read from Parquet files (as the reverse stage hands it over) puts
    every dialogue where split_dialogues puts it, once; the driver gets keys, not dialogues; a rerun
    writes the split anew; an empty part is an empty folder the readers take."""
    import ray

    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", f"q{i}"),)) for i in range(300)]
    files = [
        write_parquet(dialogues[i : i + 50], tmp_path / "in" / f"{i}.parquet", Dialogue)
        for i in range(0, 300, 50)
    ]
    source = ray.data.read_parquet([str(f) for f in files])
    split = write_split(tmp_path / "run", source, 0.2, 7, validation_fraction=0.1)
    want = split_dialogues(dialogues, 0.2, 7, validation_fraction=0.1)
    assert split.counts == {"train": 210, "validation": 30, "heldout": 60}
    for part, expected in want.items():
        got = read_split(tmp_path / "run", part)
        assert sorted(d.dialogue_id for d in got) == sorted(d.dialogue_id for d in expected), part
        assert part_size(tmp_path / "run", part) == split.counts[part] == len(expected)
    assert sorted(read_split(tmp_path / "run", "train"), key=lambda d: d.dialogue_id)[0].messages[0].content
    example = first_dialogue(tmp_path / "run")
    assert example is not None and example.dialogue_id in {d.dialogue_id for d in want["train"]}
    again = write_split(tmp_path / "run", source, 0.0, 7)  # no held-out part this time: nothing stale left
    assert again.counts == {"train": 300, "validation": 0, "heldout": 0}
    assert read_split(tmp_path / "run", "heldout") == [] and part_size(tmp_path / "run", "validation") == 0
    assert len(read_split(tmp_path / "run", "train")) == 300


def test_heldout_turns_are_scored_against_the_executed_calls(heldout_dialogues_file: Path) -> None:
    items = heldout_items(read_parquet(Dialogue, heldout_dialogues_file))
    assert [i.id for i in items] == ["dlg-0/0", "dlg-0/1", "dlg-1/0", "dlg-1/1"]
    second = items[1]
    assert second.category == HELDOUT_CATEGORY
    # The context of the second turn holds the first call and its real result, not the answer.
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "tool"]
    assert {t["function"]["name"] for t in second.tools} == {"get_weekday", "add_days"}

    exact = json.dumps([{"name": "add_days", "arguments": {"date": "2026-03-14", "days": 10}}])
    wrong_value = json.dumps([{"name": "add_days", "arguments": {"date": "2026-03-14", "days": 11}}])
    wrong_tool = json.dumps([{"name": "get_weekday", "arguments": {"date": "2026-03-14"}}])
    completions = {
        "dlg-0/1": exact,
        "dlg-1/0": wrong_value.replace("add_days", "get_city_info"),
        "dlg-1/1": "",
    }
    completions["dlg-0/0"] = wrong_tool.replace("2026-03-14", "2026-03-15")
    results, rejected = score_answers(items, {k: Answer(v) for k, v in completions.items()}, ESMWeights())
    assert rejected == []
    by_id = {r.id: r for r in results}
    assert by_id["dlg-0/1"].esm_score == 1.0 and by_id["dlg-0/1"].exact_match
    assert 0 < by_id["dlg-0/0"].esm_score < 1 and by_id["dlg-0/0"].esm_errors == ["value_mismatch"]
    assert not by_id["dlg-0/0"].exact_match
    assert by_id["dlg-1/1"].esm_score == 0.0 and by_id["dlg-1/1"].esm_errors == ["parse"]
    assert "unknown_key" in by_id["dlg-1/0"].esm_errors  # get_city_info takes no date/days
    summary = summarize(results)
    assert summary[HELDOUT_CATEGORY].n == 4 and summary[HELDOUT_CATEGORY].exact_match == 0.25


def test_sft_trains_on_the_train_split_not_the_heldout_one(ray_cluster: Any, tmp_path: Path) -> None:
    from ttpa_ray.train.run import default_source

    with pytest.raises(SplitMissing, match=r"dialogues/train\.parquet does not exist"):
        default_source("sft", tmp_path)  # no split yet: an error, never all of reverse/
    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", "q"),)) for i in range(10)]
    split = write_split(tmp_path, dialogues, 0.2, 0, validation_fraction=0.1)
    source = default_source("sft", tmp_path)
    assert source == tmp_path / "dialogues" / "train.parquet"
    ids = {d.dialogue_id for d in read_parquet(Dialogue, source)}
    kept = {
        d.dialogue_id for part in ("validation", "heldout") for d in read_parquet(Dialogue, split.paths[part])
    }
    assert len(ids) == 7 and len(kept) == 3 and ids.isdisjoint(kept)
    assert default_source("dpo", tmp_path) == tmp_path / "pairs"
    check_not_heldout(tmp_path, read_parquet(Dialogue, source))  # the train part passes
    with pytest.raises(ValueError, match="3 of the given dialogues are held out"):
        check_not_heldout(tmp_path, dialogues)


def test_evaluated_bfcl_entries_are_trained_on_only_when_the_config_says_so() -> None:
    common = ["tps.bfcl_limit=10", "tps.bfcl_category=simple_python", "eval.limit_per_category=6"]
    with pytest.raises(ValueError) as refused:
        load_config(None, [*common, "tps.bfcl_offset=2"])
    assert "simple_python entries [2, 6) would be trained on" in str(refused.value)
    assert "raise tps.bfcl_offset to 6, or set tps.allow_evaluated_bfcl=true" in str(refused.value)
    assert load_config(None, [*common, "tps.bfcl_offset=6"]).tps.bfcl_offset == 6  # no overlap
    allowed = load_config(None, [*common, "tps.bfcl_offset=2", "tps.allow_evaluated_bfcl=true"])
    assert allowed.tps.allow_evaluated_bfcl
    not_evaluated = load_config(None, [*common, "tps.bfcl_offset=0", "eval.categories=[multiple]"])
    assert not_evaluated.tps.bfcl_offset == 0


def test_sample_command_refuses_heldout_dialogues_and_evaluated_bfcl_entries(
    ray_cluster: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`ttpa sample` (and jobs.sample) reads the train part; it refuses held-out input before any engine."""
    from typer.testing import CliRunner

    from ttpa_ray.cli import app

    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", "q"),)) for i in range(10)]
    write_split(tmp_path / "run", dialogues, 0.2, 0)
    everything = write_parquet(dialogues, tmp_path / "all.parquet", Dialogue)
    common = [f"run.run_dir={tmp_path / 'run'}", f"model.policy={tiny_model_dir}"]
    runner = CliRunner()
    leaked = runner.invoke(app, ["sample", "--dialogues", str(everything), *common])
    assert leaked.exit_code == 2 and "2 of the given dialogues are held out" in leaked.output
    evaluated = runner.invoke(app, ["sample", "--bfcl", "simple_python", *common, "tps.bfcl_offset=0"])
    assert evaluated.exit_code == 2
    assert (
        "simple_python entries [0, 1000000) would be trained on (tps.bfcl_offset 0, tps.bfcl_limit "
        "1000000) and evaluated (eval.limit_per_category None): set eval.limit_per_category, or set "
        "tps.allow_evaluated_bfcl=true to train on them anyway" in " ".join(evaluated.output.split())
    )
    missing = runner.invoke(
        app, ["sample", f"run.run_dir={tmp_path / 'none'}", f"model.policy={tiny_model_dir}"]
    )
    assert missing.exit_code == 2 and "dialogues/train.parquet does not exist" in missing.output
