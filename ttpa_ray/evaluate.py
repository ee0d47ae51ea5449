"""Fine-grained evaluation (docs/design.md section 7), as BFCL evaluates: free generation, parsed afterwards.

Each model answers each item through vLLM replicas in Ray Data: greedy, in the model's own tool-call
format (its chat template renders the tools), no grammar, its own stop tokens. What comes back is
parsed by the codec (Hermes ``<tool_call>`` blocks, fenced or bare JSON calls); what does not parse
is the model's ``parse`` error. A request the machinery failed (an engine error, a lost row) is an
``infra_error``, counted apart and left out of every rate.

Items: BFCL entries (ESM against BFCL's possible answers, exact match by BFCL's own ``ast_checker``),
BFCL's irrelevance entries (right answer: no call; a call is an ``unwanted_call``), and the
tool-call turns of the reversed dialogues held out of SFT, TPS and DPO (category ``reversed_heldout``:
ESM against the executed calls, exact match = ESM 1.0). The report gives, per model and category,
mean ESM, exact match and each error category's rate, each with a 95% bootstrap interval over the
questions, and one sentence per comparison of models saying whether the interval of the paired
difference excludes zero; as JSON, Markdown and PNG.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttpa_ray.bfcl import IRRELEVANCE_CATEGORIES, BfclEntry, ast_check, load_entries
from ttpa_ray.codec import ToolCall, parse_any
from ttpa_ray.config import TTPAConfig
from ttpa_ray.esm import CATEGORIES, ESMWeights, prepare_reference, prepare_tools, score
from ttpa_ray.records import Dialogue, RejectedRow, read_parquet, reject, write_parquet
from ttpa_ray.replica import PROMPT_TOO_LONG
from ttpa_ray.rundir import split_path
from ttpa_ray.tps import turns_from_dialogue

HISTOGRAM_BINS = 10
HELDOUT_CATEGORY = "reversed_heldout"  # turns of the held-out reversed dialogues
UNWANTED_CALL = "unwanted_call"  # a call where none was right (BFCL irrelevance)
ERRORS = (*CATEGORIES, UNWANTED_CALL)  # the report's error columns
# The paper's comparisons, (row, against): each gets a sentence when both rows were evaluated.
COMPARISONS = (("ttpa", "sft"), ("ttpa", "sequence"), ("sft", "base"))


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
    """Prompt rows for :func:`ttpa_ray.replica.generate_dataset`: greedy (deterministic), no grammar."""
    return [
        {
            "row_id": item.id,
            "messages": json.dumps(item.messages, ensure_ascii=False),
            "tools": json.dumps(item.tools, ensure_ascii=False),
            "json_schema": "",
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": seed,
        }
        for item in items
    ]


@dataclass(frozen=True)
class Answer:
    """What a replica returned for one item."""

    text: str
    finish_reason: str = "stop"

    @property
    def infra_error(self) -> bool:
        """The machinery failed the request (the replica's row says ``error: ...``)."""
        return self.finish_reason.startswith("error")


@dataclass
class EntryResult:
    """One scored answer; an ``infra_error`` answer has no score and counts in no rate."""

    id: str
    category: str
    completion: str
    esm_score: float
    esm_errors: list[str]
    exact_match: bool
    infra_error: str = ""  # why the machinery failed, "" when the model answered


def _reference(item: EvalItem) -> tuple[Any, Any]:
    """The item's tool index and ESM reference; ValueError when the item's own reference is unusable."""
    index = prepare_tools(item.tools)
    if item.category in IRRELEVANCE_CATEGORIES:
        return index, ()
    if item.entry is not None:
        return index, item.entry.reference(index)
    return index, prepare_reference([c.to_dict() for c in item.reference], tools=index)


def _score_one(
    item: EvalItem, text: str, index: Any, reference: Any, weights: ESMWeights
) -> tuple[float, list[str], bool]:
    if item.category in IRRELEVANCE_CATEGORIES:  # BFCL: correct when no call decodes
        parsed = parse_any(text)
        called = parsed.ok and bool(parsed.calls)
        return (0.0, [UNWANTED_CALL], False) if called else (1.0, [], True)
    esm = score(text, reference, index, weights)
    if item.entry is not None:
        parsed = parse_any(text)
        exact = bool(parsed.ok and ast_check(item.entry, parsed.calls).get("valid", False))
    else:
        exact = esm.score == 1.0
    return esm.score, list(esm.errors), exact


def score_answers(
    items: Sequence[EvalItem], answers: Mapping[str, Answer], weights: ESMWeights
) -> tuple[list[EntryResult], list[RejectedRow]]:
    """ESM and exact match of each item's answer.

    An item with no answer, or whose request failed, is an ``infra_error`` result (never a model
    error). An item whose own reference is unusable (BFCL lists no acceptable value for a required
    argument in a few live entries) becomes a rejected row with the reason, not a crash.
    """
    results = []
    rejected = []
    for item in items:
        answer = answers.get(item.id, Answer("", "error: no answer came back for this item"))
        try:
            index, reference = _reference(item)
        except ValueError as err:
            reason = "invalid_ground_truth" if item.entry is not None else "invalid_reference"
            rejected.append(reject(item.id, "evaluate", reason, str(err), {"completion": answer.text}))
            continue
        if answer.finish_reason.startswith(PROMPT_TOO_LONG):  # nothing was asked: not the model's error
            detail = answer.finish_reason.partition(": ")[2]
            rejected.append(reject(item.id, "evaluate", PROMPT_TOO_LONG, detail, {"category": item.category}))
            continue
        if answer.infra_error:
            results.append(EntryResult(item.id, item.category, "", 0.0, [], False, answer.finish_reason))
            continue
        esm_score, errors, exact = _score_one(item, answer.text, index, reference, weights)
        results.append(EntryResult(item.id, item.category, answer.text, esm_score, errors, exact))
    return results, rejected


Interval = tuple[float, float]


@dataclass
class CategorySummary:
    """Aggregates of one (model, category), each rate with its 95% bootstrap interval."""

    n: int  # answers scored (infra errors excluded)
    infra_errors: int
    mean_esm: float
    mean_esm_ci: Interval
    exact_match: float
    exact_match_ci: Interval
    esm_histogram: list[int]
    error_rates: dict[str, float] = field(default_factory=dict)
    error_rates_ci: dict[str, Interval] = field(default_factory=dict)


def _columns(rows: Sequence[EntryResult]) -> dict[str, np.ndarray]:
    """Per-answer values whose means the report gives: ESM, exact match, one 0/1 column per error."""
    columns = {
        "mean_esm": np.array([r.esm_score for r in rows], dtype=float),
        "exact_match": np.array([r.exact_match for r in rows], dtype=float),
    }
    for error in ERRORS:
        columns[error] = np.array([error in r.esm_errors for r in rows], dtype=float)
    return columns


def bootstrap_interval(values: np.ndarray, *, samples: int, seed: int, confidence: float = 0.95) -> Interval:
    """Percentile interval of the mean of ``values`` over ``samples`` resamplings of the questions."""
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def summarize(
    results: Sequence[EntryResult], *, samples: int = 1000, seed: int = 0
) -> dict[str, CategorySummary]:
    """Per-category summaries plus an ``all`` row (BFCL entries and held-out turns together)."""
    groups: dict[str, list[EntryResult]] = {}
    for result in results:
        groups.setdefault(result.category, []).append(result)
        groups.setdefault("all", []).append(result)
    summaries = {}
    for category, rows in groups.items():
        scored = [r for r in rows if not r.infra_error]
        histogram = [0] * HISTOGRAM_BINS
        for row in scored:
            histogram[min(int(row.esm_score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        columns = _columns(scored)
        mean = {k: float(v.mean()) if v.size else float("nan") for k, v in columns.items()}
        ci = {k: bootstrap_interval(v, samples=samples, seed=seed) for k, v in columns.items()}
        summaries[category] = CategorySummary(
            n=len(scored),
            infra_errors=len(rows) - len(scored),
            mean_esm=mean["mean_esm"],
            mean_esm_ci=ci["mean_esm"],
            exact_match=mean["exact_match"],
            exact_match_ci=ci["exact_match"],
            esm_histogram=histogram,
            error_rates={e: mean[e] for e in ERRORS},
            error_rates_ci={e: ci[e] for e in ERRORS},
        )
    return summaries


@dataclass
class Comparison:
    """Row minus baseline on the questions both answered, with the paired bootstrap interval."""

    row: str
    baseline: str
    category: str
    metric: str
    n: int
    difference: float
    interval: Interval

    @property
    def excludes_zero(self) -> bool:
        return self.interval[0] > 0 or self.interval[1] < 0

    def sentence(self) -> str:
        low, high = self.interval
        verdict = (
            f"{self.row} is {'better' if self.difference > 0 else 'worse'}: the interval excludes zero"
            if self.excludes_zero
            else "no difference shown: the interval includes zero"
        )
        return (
            f"{self.row} - {self.baseline}, {self.metric} on {self.category} (n={self.n}): "
            f"{self.difference:+.3f} [{low:+.3f}, {high:+.3f}]; {verdict}."
        )


def compare(
    results: Mapping[str, Sequence[EntryResult]],
    row: str,
    baseline: str,
    category: str,
    metric: str = "mean_esm",
    *,
    samples: int = 1000,
    seed: int = 0,
) -> Comparison | None:
    """Paired comparison of two models on one category (None when they share no scored question)."""

    def scored(label: str) -> dict[str, EntryResult]:
        return {
            r.id: r
            for r in results[label]
            if not r.infra_error and (category == "all" or r.category == category)
        }

    mine, theirs = scored(row), scored(baseline)
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        return None
    a = _columns([mine[i] for i in shared])[metric]
    b = _columns([theirs[i] for i in shared])[metric]
    interval = bootstrap_interval(a - b, samples=samples, seed=seed)
    return Comparison(row, baseline, category, metric, len(shared), float((a - b).mean()), interval)


def comparisons(
    results: Mapping[str, Sequence[EntryResult]], *, samples: int = 1000, seed: int = 0
) -> list[Comparison]:
    """The paper's comparisons (:data:`COMPARISONS`) on the held-out turns and on everything."""
    found = []
    for row, baseline in COMPARISONS:
        if row not in results or baseline not in results:
            continue
        for category in (HELDOUT_CATEGORY, "all"):
            for metric in ("mean_esm", "exact_match"):
                comparison = compare(results, row, baseline, category, metric, samples=samples, seed=seed)
                if comparison is not None:
                    found.append(comparison)
    return found


def evaluate_model(
    config: TTPAConfig, model: str, items: Sequence[EvalItem], *, max_tokens: int
) -> tuple[list[EntryResult], list[RejectedRow]]:
    """Generate answers with vLLM replicas on Ray Data and score them."""
    import ray

    from ttpa_ray.replica import generate_dataset

    rows = prompt_rows(items, max_tokens=max_tokens, seed=config.run.seed)
    ds = generate_dataset(ray.data.from_items(rows), model, config)
    answers = {
        row["row_id"]: Answer(row["completion"], row["finish_reason"] or "stop")
        for row in ds.select_columns(["row_id", "completion", "finish_reason"]).take_all()
    }
    return score_answers(items, answers, ESMWeights.from_config(config.esm.weights))


@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` did: items asked, answers scored, summaries, report files."""

    entries: int
    answers_scored: int
    answers_rejected: int
    summaries: dict[str, dict[str, CategorySummary]]
    paths: dict[str, Path]
    heldout_turns: int = 0
    infra_errors: int = 0
    comparisons: list[Comparison] = field(default_factory=list)


def heldout_source(config: TTPAConfig) -> Path | None:
    """The held-out dialogues to evaluate: ``eval.heldout_dialogues``, else the run's own split."""
    if config.eval.heldout_dialogues is not None:
        path = Path(config.eval.heldout_dialogues)
        if not path.exists():
            raise FileNotFoundError(f"eval.heldout_dialogues: {path} does not exist")
        return path
    own = split_path(config.run.work_dir, "heldout")
    return own if own.exists() else None


def run_evaluation(
    config: TTPAConfig,
    models: dict[str, str],
    out_dir: Path,
    progress: Callable[[str, int], None] | None = None,
    data_quality: dict[str, Any] | None = None,
) -> EvaluationRun:
    """Evaluate each labelled model on the same BFCL entries and held-out turns; write the report.

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
    samples, seed = config.eval.bootstrap_samples, config.run.seed
    summaries = {label: summarize(rows, samples=samples, seed=seed) for label, rows in results.items()}
    found = comparisons(results, samples=samples, seed=seed)
    paths = write_report(out_dir, summaries, results, found, data_quality)
    paths["rejected"] = out_dir / "rejected.parquet"
    write_parquet(rejected, paths["rejected"], RejectedRow)
    return EvaluationRun(
        len(items),
        sum(len(rows) for rows in results.values()),
        len(rejected),
        summaries,
        paths,
        heldout_turns=len(heldout),
        infra_errors=sum(r.infra_error != "" for rows in results.values() for r in rows),
        comparisons=found,
    )


def write_report(
    out_dir: Path,
    summaries: dict[str, dict[str, CategorySummary]],
    results: dict[str, list[EntryResult]],
    found: Sequence[Comparison] = (),
    data_quality: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, per-answer answers.jsonl and PNG plots; return their paths.
    ``data_quality``: the reverse stage's quality summary (reverse.quality_summary), reported too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        model: {cat: asdict(s) for cat, s in cats.items()} for model, cats in summaries.items()
    }
    report["comparisons"] = [{**asdict(c), "sentence": c.sentence()} for c in found]
    if data_quality:
        report["data_quality"] = data_quality
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
    markdown = render_markdown(summaries, found) + render_data_quality(data_quality)
    paths["markdown"].write_text(markdown, encoding="utf-8")
    paths.update(plot_report(out_dir, summaries))
    return paths


def render_data_quality(quality: dict[str, Any] | None) -> str:
    """The report's data-quality section: what reversed construction admitted and why it rejected."""
    if not quality:
        return ""

    def share(key: str) -> str:
        value = quality.get(key)
        return "-" if value is None else f"{value:.1%}"

    def number(key: str) -> str:
        value = quality.get(key)
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "",
        "## Data quality (reversed construction)",
        "",
        "Yield: dialogues admitted over seeds. Degenerate: seeds rejected by the text gates (repetition, "
        "length, a question copying the answer or scenario, the builder's prompt text). Duplicates: later "
        "copies of a question over the dialogues made. Distinct 2-grams: over all the questions' 2-grams.",
        "",
        "| seeds | dialogues | yield | degenerate | duplicates | distinct 2-grams | calls / dialogue "
        "| tools / dialogue | catalogue tools used | simulated responses invalid |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {quality.get('seeds', '-')} | {quality.get('dialogues', '-')} | {share('yield')} "
        f"| {share('degenerate_share')} | {share('duplicate_share')} | {share('question_distinct_2grams')} "
        f"| {number('calls_per_dialogue')} | {number('tools_per_dialogue')} "
        f"| {share('catalogue_tools_used')} | {share('simulated_invalid_share')} |",
        "",
        "Rejected by reason: "
        + (", ".join(f"{k} {v}" for k, v in quality.get("reasons", {}).items()) or "none"),
        "",
    ]
    return "\n".join(lines)


def _cell(value: float, interval: Interval) -> str:
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def render_markdown(
    summaries: dict[str, dict[str, CategorySummary]], found: Sequence[Comparison] = ()
) -> str:
    """The report: one row per (model, category), every figure with its 95% bootstrap interval."""
    lines = [
        "# Evaluation report",
        "",
        "Mean ESM, exact match (BFCL: ast_checker; irrelevance: no call; held-out turns: ESM = 1) and",
        "error-category rates, each with its 95% bootstrap interval over the questions. `infra` counts",
        "requests the machinery failed; they are in no rate.",
        "",
    ]
    header = ["model", "category", "n", "infra", "mean ESM", "exact match", *ERRORS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for model, cats in summaries.items():
        for category, s in sorted(cats.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            cells = [model, category, str(s.n), str(s.infra_errors)]
            cells += [_cell(s.mean_esm, s.mean_esm_ci), _cell(s.exact_match, s.exact_match_ci)]
            cells += [_cell(s.error_rates[e], s.error_rates_ci[e]) for e in ERRORS]
            lines.append("| " + " | ".join(cells) + " |")
    if found:
        lines += ["", "## Comparisons (paired bootstrap over the shared questions)", ""]
        lines += [f"- {c.sentence()}" for c in found]
    lines += ["", "![Exact match](exact_match.png)", "", "![Error categories](error_categories.png)"]
    lines += ["", "![ESM histogram](esm_histogram.png)", ""]
    return "\n".join(lines)


def _error_bars(values: Sequence[float], intervals: Sequence[Interval]) -> np.ndarray:
    low = [max(v - lo, 0.0) for v, (lo, _hi) in zip(values, intervals, strict=True)]
    high = [max(hi - v, 0.0) for v, (_lo, hi) in zip(values, intervals, strict=True)]
    return np.nan_to_num(np.array([low, high]))


def plot_report(out_dir: Path, summaries: dict[str, dict[str, CategorySummary]]) -> dict[str, Path]:
    """Exact match per category and error rates per category (one bar per model, 95% intervals as
    error bars), and the ESM histogram of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summaries)
    categories = sorted({c for cats in summaries.values() for c in cats}, key=lambda c: (c == "all", c))
    width = 0.8 / max(len(models), 1)
    paths = {}

    def bars(ax: Any, value: Callable[[CategorySummary], tuple[float, Interval]]) -> None:
        for i, model in enumerate(models):
            points = [
                value(summaries[model][c]) if c in summaries[model] else (0.0, (0.0, 0.0)) for c in categories
            ]
            heights = [p[0] for p in points]
            ax.bar(
                [x + i * width for x in range(len(categories))],
                heights,
                width=width,
                yerr=_error_bars(heights, [p[1] for p in points]),
                capsize=2,
                label=model,
            )
        ax.set_xticks(
            [x + width * (len(models) - 1) / 2 for x in range(len(categories))],
            categories,
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_ylim(0, 1)

    fig, ax = plt.subplots(figsize=(9, 4))
    bars(ax, lambda s: (s.exact_match, s.exact_match_ci))
    ax.set_ylabel("exact match")
    ax.set_title("Exact match per category (95% bootstrap intervals)")
    ax.legend()
    fig.tight_layout()
    paths["exact_match"] = out_dir / "exact_match.png"
    fig.savefig(paths["exact_match"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, (len(ERRORS) + 1) // 2, figsize=(16, 7), sharey=True)
    for ax, error in zip(axes.flat, ERRORS, strict=False):
        bars(ax, lambda s, e=error: (s.error_rates[e], s.error_rates_ci[e]))  # type: ignore[misc]
        ax.set_title(error, fontsize=9)
    for ax in list(axes.flat)[len(ERRORS) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Share of answers with each error, per category (95% bootstrap intervals)")
    fig.tight_layout()
    paths["error_categories"] = out_dir / "error_categories.png"
    fig.savefig(paths["error_categories"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(3.5 * len(models), 3), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        ax.bar(range(HISTOGRAM_BINS), summaries[model]["all"].esm_histogram, width=0.9)
        ax.set_xticks(
            range(0, HISTOGRAM_BINS, 2), [f"{b / HISTOGRAM_BINS:.1f}" for b in range(0, HISTOGRAM_BINS, 2)]
        )
        ax.set_title(model)
        ax.set_xlabel("ESM (bin start)")
    axes[0][0].set_ylabel("answers")
    fig.tight_layout()
    paths["esm_histogram"] = out_dir / "esm_histogram.png"
    fig.savefig(paths["esm_histogram"], dpi=100)
    plt.close(fig)
    return paths
