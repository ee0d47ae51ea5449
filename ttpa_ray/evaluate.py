"""Fine-grained evaluation (DESIGN.md stage 5) on BFCL v4's AST categories and held-out dialogues.

A model (base or aligned) answers each item through vLLM replicas in Ray Data, with the item's tools
and structured outputs constraining the answer to a list of calls of those tools. Items are BFCL
entries (scored with ESM against BFCL's possible answers, exact match by BFCL's own ``ast_checker``)
and the tool-call turns of the reversed dialogues held out of TPS and SFT (category
``reversed_heldout``: ESM against the executed calls, exact match = ESM 1.0). The report gives, per
category and model: mean ESM and its histogram, the rate of each error category, and exact-match
accuracy; as JSON, Markdown and PNG.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ttpa_ray.bfcl import BfclEntry, ast_check, load_entries
from ttpa_ray.codec import ToolCall, parse_any
from ttpa_ray.config import TTPAConfig
from ttpa_ray.engine import tool_call_schema
from ttpa_ray.esm import CATEGORIES, ESMWeights, prepare_reference, prepare_tools, score_calls
from ttpa_ray.records import Dialogue, RejectedRow, read_parquet, reject, write_parquet
from ttpa_ray.reverse import split_paths
from ttpa_ray.tps import turns_from_dialogue

MAX_CALLS_PER_TURN = 4
HISTOGRAM_BINS = 10
HELDOUT_CATEGORY = "reversed_heldout"  # turns of the held-out reversed dialogues


def answer_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Structured output of one turn: a list of 1..4 calls to the given tools."""
    return {"type": "array", "items": tool_call_schema(tools), "minItems": 1, "maxItems": MAX_CALLS_PER_TURN}


def select_entries(categories: Sequence[str], limit: int | None) -> list[BfclEntry]:
    """The first ``limit`` entries of each category (all when None), in BFCL's order."""
    entries: list[BfclEntry] = []
    for category in categories:
        rows = load_entries(category)
        entries.extend(rows if limit is None else rows[:limit])
    return entries


@dataclass(frozen=True)
class EvalItem:
    """One question put to the model: a BFCL entry, or one tool-call turn of a held-out dialogue.

    BFCL: ESM against the entry's possible answers (alternatives), exact match by BFCL's ast_checker.
    Held-out turn: ESM against the dialogue's executed call(s), exact match = ESM 1.0 (every call
    matched with the same name, keys, types and values; there are no alternatives to consult).
    """

    id: str
    category: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    entry: BfclEntry | None = None
    reference: tuple[ToolCall, ...] = ()


def bfcl_items(entries: Sequence[BfclEntry]) -> list[EvalItem]:
    """Single-turn BFCL entries: the first (only) question turn's messages, the entry's functions."""
    return [EvalItem(e.id, e.category, list(e.question[0]), e.tools, entry=e) for e in entries]


def heldout_items(dialogues: Sequence[Dialogue]) -> list[EvalItem]:
    """Every assistant tool-call turn of the held-out dialogues, with the conversation before it."""
    items = []
    for dialogue in dialogues:
        for turn in turns_from_dialogue(dialogue):
            items.append(
                EvalItem(
                    turn.turn_id,
                    HELDOUT_CATEGORY,
                    [m.to_openai() for m in turn.context],
                    [t.to_openai() for t in turn.tools],
                    reference=turn.reference_calls,
                )
            )
    return items


def prompt_rows(items: Sequence[EvalItem], *, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """Prompt rows for :func:`ttpa_ray.replica.generate_dataset` (greedy: evaluation is deterministic)."""
    return [
        {
            "row_id": item.id,
            "messages": json.dumps(item.messages, ensure_ascii=False),
            "tools": json.dumps(item.tools, ensure_ascii=False),
            "json_schema": json.dumps(answer_schema(item.tools), ensure_ascii=False),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": seed,
        }
        for item in items
    ]


@dataclass
class EntryResult:
    """One scored answer."""

    id: str
    category: str
    completion: str
    esm_score: float
    esm_errors: list[str]
    exact_match: bool


def score_answers(
    items: Sequence[EvalItem], completions: dict[str, str], weights: ESMWeights
) -> tuple[list[EntryResult], list[RejectedRow]]:
    """ESM and exact match of each item's completion; an item with no completion scores 0.

    An item whose own reference is unusable (BFCL lists no acceptable value for a required
    argument in a few live entries) becomes a rejected row with the reason, not a crash.
    """
    results = []
    rejected = []
    for item in items:
        text = completions.get(item.id, "")
        try:
            index = prepare_tools(item.tools)
            if item.entry is not None:
                reference = item.entry.reference(index)
            else:
                reference = prepare_reference([c.to_dict() for c in item.reference], tools=index)
        except ValueError as err:
            reason = "invalid_ground_truth" if item.entry is not None else "invalid_reference"
            rejected.append(reject(item.id, "evaluate", reason, str(err), {"completion": text}))
            continue
        esm = score_calls(text, reference, index, weights)
        if item.entry is not None:
            parsed = parse_any(text)
            exact = bool(parsed.ok and ast_check(item.entry, parsed.calls).get("valid", False))
        else:
            exact = esm.score == 1.0
        results.append(EntryResult(item.id, item.category, text, esm.score, list(esm.errors), exact))
    return results, rejected


@dataclass
class CategorySummary:
    """Aggregates of one (model, category)."""

    n: int
    mean_esm: float
    exact_match: float
    esm_histogram: list[int]
    error_rates: dict[str, float] = field(default_factory=dict)


def summarize(results: Sequence[EntryResult]) -> dict[str, CategorySummary]:
    """Per-category summaries plus an ``all`` row (BFCL entries and held-out turns together)."""
    groups: dict[str, list[EntryResult]] = {}
    for result in results:
        groups.setdefault(result.category, []).append(result)
        groups.setdefault("all", []).append(result)
    summaries = {}
    for category, rows in groups.items():
        n = len(rows)
        histogram = [0] * HISTOGRAM_BINS
        for row in rows:
            histogram[min(int(row.esm_score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        errors = Counter(e for row in rows for e in set(row.esm_errors))
        summaries[category] = CategorySummary(
            n=n,
            mean_esm=sum(r.esm_score for r in rows) / n,
            exact_match=sum(r.exact_match for r in rows) / n,
            esm_histogram=histogram,
            error_rates={c: errors.get(c, 0) / n for c in CATEGORIES},
        )
    return summaries


def evaluate_model(
    config: TTPAConfig, model: str, items: Sequence[EvalItem], *, max_tokens: int
) -> tuple[list[EntryResult], list[RejectedRow]]:
    """Generate answers with vLLM replicas on Ray Data and score them."""
    import ray

    from ttpa_ray.replica import generate_dataset

    rows = prompt_rows(items, max_tokens=max_tokens, seed=config.run.seed)
    ds = generate_dataset(ray.data.from_items(rows), model, config)
    completions = {
        row["row_id"]: row["completion"] for row in ds.select_columns(["row_id", "completion"]).take_all()
    }
    return score_answers(items, completions, ESMWeights.from_config(config.esm.weights))


@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` did: items asked, answers scored, summaries, report files."""

    entries: int
    answers_scored: int
    answers_rejected: int
    summaries: dict[str, dict[str, CategorySummary]]
    paths: dict[str, Path]
    heldout_turns: int = 0


def heldout_source(config: TTPAConfig) -> Path | None:
    """The held-out dialogues to evaluate: ``eval.heldout_dialogues``, else the run's own split."""
    if config.eval.heldout_dialogues is not None:
        path = Path(config.eval.heldout_dialogues)
        if not path.is_file():
            raise FileNotFoundError(f"eval.heldout_dialogues: {path} is not a file")
        return path
    own = split_paths(Path(config.run.run_dir))["heldout"]
    return own if own.is_file() else None


def run_evaluation(
    config: TTPAConfig,
    models: dict[str, str],
    out_dir: Path,
    progress: Callable[[str, int], None] | None = None,
) -> EvaluationRun:
    """Evaluate each labelled model on the BFCL entries and the held-out turns; write the report.

    ``progress(label, answers_so_far)`` is called as each model is done."""
    items = bfcl_items(select_entries(config.eval.categories, config.eval.limit_per_category))
    source = heldout_source(config)
    heldout = heldout_items(read_parquet(Dialogue, source)) if source is not None else []
    items += heldout
    results: dict[str, list[EntryResult]] = {}
    rejected: list[RejectedRow] = []
    for label, model in models.items():
        results[label], model_rejected = evaluate_model(
            config, model, items, max_tokens=config.eval.max_tokens
        )
        rejected += model_rejected
        if progress is not None:
            progress(label, sum(len(rows) for rows in results.values()) + len(rejected))
    summaries = {label: summarize(rows) for label, rows in results.items()}
    paths = write_report(out_dir, summaries, results)
    paths["rejected"] = out_dir / "rejected.parquet"
    write_parquet(rejected, paths["rejected"], RejectedRow)
    return EvaluationRun(
        len(items),
        sum(len(rows) for rows in results.values()),
        len(rejected),
        summaries,
        paths,
        heldout_turns=len(heldout),
    )


def write_report(
    out_dir: Path, summaries: dict[str, dict[str, CategorySummary]], results: dict[str, list[EntryResult]]
) -> dict[str, Path]:
    """Write report.json, report.md, per-answer results.jsonl and PNG plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {model: {cat: asdict(s) for cat, s in cats.items()} for model, cats in summaries.items()}
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "answers": out_dir / "answers.jsonl",
    }
    paths["json"].write_text(json.dumps(report, indent=2), encoding="utf-8")
    with paths["answers"].open("w", encoding="utf-8") as handle:
        for model, rows in results.items():
            for row in rows:
                handle.write(json.dumps({"model": model, **asdict(row)}, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(render_markdown(summaries), encoding="utf-8")
    paths.update(plot_report(out_dir, summaries))
    return paths


def render_markdown(summaries: dict[str, dict[str, CategorySummary]]) -> str:
    """The report's tables: one row per (model, category); error categories as rates."""
    lines = [
        "# Evaluation report",
        "",
        "ESM (mean), exact match (BFCL: ast_checker; held-out turns: ESM = 1) and error-category rates.",
        "",
    ]
    header = ["model", "category", "n", "mean ESM", "exact match", *CATEGORIES]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for model, cats in summaries.items():
        for category, s in sorted(cats.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            cells = [model, category, str(s.n), f"{s.mean_esm:.3f}", f"{s.exact_match:.3f}"]
            cells += [f"{s.error_rates.get(c, 0.0):.2f}" for c in CATEGORIES]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![ESM histogram](esm_histogram.png)", "", "![Error categories](error_categories.png)", ""]
    return "\n".join(lines)


def plot_report(out_dir: Path, summaries: dict[str, dict[str, CategorySummary]]) -> dict[str, Path]:
    """ESM histogram and error-category bars, one series per model (base against aligned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summaries)
    width = 0.8 / max(len(models), 1)
    paths = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, model in enumerate(models):
        hist = summaries[model]["all"].esm_histogram
        ax.bar([b + i * width for b in range(HISTOGRAM_BINS)], hist, width=width, label=model)
    ax.set_xticks(range(HISTOGRAM_BINS), [f"{b / HISTOGRAM_BINS:.1f}" for b in range(HISTOGRAM_BINS)])
    ax.set_xlabel("ESM score (bin start)")
    ax.set_ylabel("answers")
    ax.set_title("ESM distribution")
    ax.legend()
    fig.tight_layout()
    paths["esm_histogram"] = out_dir / "esm_histogram.png"
    fig.savefig(paths["esm_histogram"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, model in enumerate(models):
        rates = [summaries[model]["all"].error_rates.get(c, 0.0) for c in CATEGORIES]
        ax.bar([x + i * width for x in range(len(CATEGORIES))], rates, width=width, label=model)
    ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=30, ha="right")
    ax.set_ylabel("share of answers")
    ax.set_ylim(0, 1)
    ax.set_title("Error categories")
    ax.legend()
    fig.tight_layout()
    paths["error_categories"] = out_dir / "error_categories.png"
    fig.savefig(paths["error_categories"], dpi=100)
    plt.close(fig)
    return paths
