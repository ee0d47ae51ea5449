"""The held-out split of the reversed dialogues and their turn-by-turn evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from ttpa_ray.esm import ESMWeights
from ttpa_ray.evaluate import HELDOUT_CATEGORY, Answer, heldout_items, score_answers, summarize
from ttpa_ray.records import Dialogue, Message, read_parquet, write_parquet
from ttpa_ray.reverse import split_dialogues


def test_split_is_deterministic_and_keeps_training_data() -> None:
    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", "q"),)) for i in range(20)]
    train, heldout = split_dialogues(dialogues, 0.1, seed=0)
    assert len(heldout) == 2 and len(train) == 18
    assert {d.dialogue_id for d in train}.isdisjoint(d.dialogue_id for d in heldout)
    _, again = split_dialogues(list(reversed(dialogues)), 0.1, seed=0)
    assert {d.dialogue_id for d in again} == {d.dialogue_id for d in heldout}  # the order does not matter
    picks = {frozenset(d.dialogue_id for d in split_dialogues(dialogues, 0.1, seed=s)[1]) for s in range(5)}
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)  # the run's seed draws the held-out set
    assert split_dialogues(dialogues, 0.0, seed=0) == (dialogues, [])
    assert split_dialogues(dialogues[:1], 0.5, seed=0) == (
        dialogues[:1],
        [],
    )  # one dialogue: kept for training
    assert len(split_dialogues(dialogues[:2], 0.9, seed=0)[0]) == 1  # at least one stays for training


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


def test_sft_trains_on_the_train_split_not_the_heldout_one(tmp_path: Path) -> None:
    from ttpa_ray.train.run import default_source

    assert default_source("sft", tmp_path) == tmp_path / "reverse"  # before any split exists
    dialogues = [Dialogue(f"dlg-{i}", f"seed-{i}", (Message("user", "q"),)) for i in range(10)]
    train, heldout = split_dialogues(dialogues, 0.2, seed=0)
    write_parquet(train, tmp_path / "dialogues" / "train.parquet", Dialogue)
    write_parquet(heldout, tmp_path / "dialogues" / "heldout.parquet", Dialogue)
    source = default_source("sft", tmp_path)
    assert source == tmp_path / "dialogues" / "train.parquet"
    ids = {d.dialogue_id for d in read_parquet(Dialogue, source)}
    assert len(ids) == 8 and ids.isdisjoint(d.dialogue_id for d in heldout)
    assert default_source("dpo", tmp_path) == tmp_path / "pairs"
