"""The evaluation scores as BFCL does (issue 16): on a fixed answers file, each category's exact match
equals what BFCL's own code gives (its Qwen/Hermes decoder, its ast_checker, its irrelevance rule)."""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ttpa_ray.bfcl import IRRELEVANCE_CATEGORIES, data_dir, load_ast_checker, load_entries
from ttpa_ray.esm import ESMWeights
from ttpa_ray.evaluate import (
    HELDOUT_CATEGORY,
    Answer,
    EntryResult,
    bfcl_items,
    bootstrap_interval,
    comparisons,
    score_answers,
    summarize,
    write_report,
)

ANSWERS = Path(__file__).parent / "fixtures" / "bfcl_answers.jsonl"


def bfcl_function(relative: str, name: str, **globals_: Any) -> Any:
    """A function of BFCL's source, compiled alone: its modules import packages not installed here
    (tree_sitter, overrides), the functions themselves need only ``re``/``json``."""
    path = data_dir().parent / relative
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    namespace: dict[str, Any] = dict(globals_)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def bfcl_verdicts(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """BFCL's pass/fail of each answer, by BFCL's code alone."""
    from bfcl_eval.constants.enums import Language

    extract = bfcl_function(
        "model_handler/local_inference/qwen_fc.py", "_extract_tool_calls", re=re, json=json
    )
    is_format = bfcl_function("utils.py", "is_function_calling_format_output")
    is_empty = bfcl_function("utils.py", "is_empty_output", is_function_calling_format_output=is_format)
    checker = load_ast_checker()
    entries = {e.id: e for cat in {r["category"] for r in rows} for e in load_entries(cat)}
    verdicts = {}
    for row in rows:
        entry = entries[row["id"]]
        calls = extract(row["completion"])  # QwenFCHandler.decode_ast, as BFCL runs it
        decoded = [{c["name"]: dict(c["arguments"])} for c in calls]
        if entry.category in IRRELEVANCE_CATEGORIES:  # eval_runner: success = no call decoded
            verdicts[row["id"]] = is_empty(decoded)
        elif not is_format(decoded) or not decoded:
            verdicts[row["id"]] = False
        else:
            result = checker(
                entry.functions, decoded, entry.ground_truth, Language.PYTHON, entry.category, "ttpa-esm"
            )
            verdicts[row["id"]] = bool(result["valid"])
    return verdicts


def test_exact_match_per_category_equals_bfcls_own_checker() -> None:
    rows = [json.loads(line) for line in ANSWERS.read_text().splitlines()]
    entries = {e.id: e for cat in {r["category"] for r in rows} for e in load_entries(cat)}
    items = bfcl_items([entries[r["id"]] for r in rows])
    results, rejected = score_answers(items, {r["id"]: Answer(r["completion"]) for r in rows}, ESMWeights())
    assert rejected == []
    ours = {r.id: r.exact_match for r in results}
    theirs = bfcl_verdicts(rows)
    assert ours == theirs
    by_category: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(theirs[row["id"]])
    summary = summarize(results)
    for category, verdicts in by_category.items():
        assert summary[category].exact_match == sum(verdicts) / len(verdicts), category
        assert 0 < sum(verdicts) < len(verdicts), f"{category}: the file should hold passes and failures"
    irrelevant = {r.id: r for r in results if r.category == "irrelevance"}
    assert {tuple(r.esm_errors) for r in irrelevant.values()} == {("unwanted_call",), ()}


def _result(i: int, category: str, score: float, *, infra: str = "") -> EntryResult:
    return EntryResult(
        f"q{i}", category, "", score, [] if score == 1 else ["value_mismatch"], score == 1, infra
    )


def test_infra_errors_are_counted_apart_and_in_no_rate() -> None:
    items = bfcl_items(load_entries("simple_python")[:3])
    right = json.loads(ANSWERS.read_text().splitlines()[0])["completion"]  # simple_python_0, correct
    answers = {items[0].id: Answer(right), items[1].id: Answer("", "error: engine died")}
    results, _ = score_answers(items, answers, ESMWeights())  # items[2]: no row came back at all
    assert [bool(r.infra_error) for r in results] == [False, True, True]
    assert results[1].infra_error == "error: engine died"
    summary = summarize(results)["simple_python"]
    assert (summary.n, summary.infra_errors) == (1, 2)
    assert summary.exact_match == 1.0 and summary.error_rates["parse"] == 0.0


def test_bootstrap_intervals_and_paired_comparisons() -> None:
    assert bootstrap_interval(np.ones(20), samples=500, seed=0) == (1.0, 1.0)
    low, high = bootstrap_interval(np.array([0.0, 1.0] * 50), samples=2000, seed=0)
    assert 0.38 < low < 0.5 < high < 0.62  # the mean 0.5 +- ~1.96 * 0.05
    base = [_result(i, HELDOUT_CATEGORY, 0.5) for i in range(30)]
    sft = [_result(i, HELDOUT_CATEGORY, 0.5 + (0.5 if i % 3 else 0.0)) for i in range(30)]
    ttpa = [_result(i, HELDOUT_CATEGORY, s.esm_score if i != 0 else 1.0) for i, s in enumerate(sft)]
    ttpa.append(_result(99, HELDOUT_CATEGORY, 0.0, infra="error: lost"))  # not a shared question
    found = {
        (c.row, c.baseline, c.category, c.metric): c
        for c in comparisons({"base": base, "sft": sft, "ttpa": ttpa})
    }
    sft_vs_base = found[("sft", "base", HELDOUT_CATEGORY, "mean_esm")]
    assert sft_vs_base.n == 30 and sft_vs_base.excludes_zero and sft_vs_base.difference > 0
    assert "sft is better: the interval excludes zero" in sft_vs_base.sentence()
    ttpa_vs_sft = found[("ttpa", "sft", HELDOUT_CATEGORY, "mean_esm")]
    assert ttpa_vs_sft.n == 30 and not ttpa_vs_sft.excludes_zero  # one question of 30 differs
    assert "no difference shown: the interval includes zero" in ttpa_vs_sft.sentence()
    assert ("ttpa", "sequence", HELDOUT_CATEGORY, "mean_esm") not in found  # no sequence row evaluated


def test_report_has_intervals_sentences_and_plots(tmp_path: Path) -> None:
    results = {
        "base": [_result(i, "simple_python", 0.5) for i in range(10)],
        "sft": [_result(i, "simple_python", 1.0 if i % 2 else 0.5) for i in range(10)],
    }
    summaries = {label: summarize(rows) for label, rows in results.items()}
    paths = write_report(tmp_path, summaries, results, comparisons(results))
    markdown = paths["markdown"].read_text()
    assert "| sft | simple_python | 10 | 0 | 0.750 [" in markdown
    assert "- sft - base, mean_esm on all (n=10): +0.250 [" in markdown
    report = json.loads(paths["json"].read_text())
    assert report["sft"]["all"]["mean_esm_ci"][0] < 0.75 < report["sft"]["all"]["mean_esm_ci"][1]
    assert report["comparisons"][0]["sentence"].startswith("sft - base")
    for name in ("exact_match", "error_categories", "esm_histogram"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
