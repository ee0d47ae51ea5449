"""The main job: the method's stages in order, each reading the previous stage's output from the run dir.

Every stage reports records in, out and rejected, and in = out + rejected must hold; ``pipeline.json``
in the run dir is rewritten after each stage, so a run that stops part way shows how far it got.
A stage that finds its output already there (reverse shards, training checkpoints) resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ttpa_ray.config import TTPAConfig
from ttpa_ray.records import Dialogue


@dataclass
class StageReport:
    """What one stage did: counts, seconds, and where it wrote."""

    name: str
    records_in: int
    records_out: int
    records_rejected: int
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.records_in == self.records_out + self.records_rejected


@dataclass
class RunContext:
    """State shared by the stages of one run: the config, the run dir, and resolved model paths."""

    config: TTPAConfig
    run_dir: Path
    console: Console
    models: dict[str, str] = field(default_factory=dict)


StageFn = Callable[[RunContext], StageReport]


def stage_prepare_models(ctx: RunContext) -> StageReport:
    """Resolve the policy and teacher; make the tiny local model when the config allows and it is missing."""
    from ttpa_ray.engine import resolve_model

    wanted = {"policy": ctx.config.model.policy, "teacher": ctx.config.model.teacher_or_policy}
    for role, model in wanted.items():
        ctx.models[role] = resolve_model(model, ctx.config.model)
    return StageReport("prepare-models", len(wanted), len(wanted), 0, outputs=dict(ctx.models))


def init_ray(config: TTPAConfig) -> None:
    """Join the configured cluster, or start a local one (no dashboard: it costs a core on a laptop).

    Worker output reaches the console (training prints a line per step), with vLLM's INFO chatter off.
    """
    import os

    import ray

    quiet = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not ray.is_initialized():
        if config.ray.address:
            ray.init(address=config.ray.address, runtime_env={"env_vars": quiet})
        else:
            ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, runtime_env={"env_vars": quiet})
    ray.data.DataContext.get_current().enable_progress_bars = config.ray.progress_bars


class ShardProgress:
    """One console line per finished shard: done/rejected so far, tokens/s and ETA."""

    def __init__(self, console: Console, stage: str) -> None:
        self.console = console
        self.stage = stage
        self.start = time.perf_counter()

    def __call__(self, row: dict[str, Any], totals: dict[str, int], shards: int) -> None:
        elapsed = time.perf_counter() - self.start
        done = totals["shards"]
        eta = elapsed / done * (shards - done)
        self.console.print(
            f"   {self.stage}: shard {done}/{shards} | dialogues {totals['dialogues']} "
            f"rejected {totals['rejected']} | {totals['tokens'] / max(elapsed, 1e-9):,.0f} tok/s | "
            f"ETA {eta:,.0f} s"
        )


def stage_reverse(ctx: RunContext) -> StageReport:
    """Reversed construction: seeds -> dialogues + rejected rows (Parquet shards + manifest)."""
    from ttpa_ray.reverse import run_reverse, write_split

    init_ray(ctx.config)
    out_dir = ctx.run_dir / "reverse"
    report = run_reverse(ctx.config, ctx.models["teacher"], out_dir, ShardProgress(ctx.console, "reverse"))
    ctx.console.print(f"   rejected by reason: {report.reasons}")
    split = write_split(out_dir, ctx.run_dir, ctx.config.eval.heldout_fraction, ctx.config.run.seed)
    ctx.console.print(
        f"   {split.train} dialogues for TPS and SFT, {split.heldout} held out for the evaluation"
        f" ({split.paths['heldout']})"
    )
    return StageReport(
        "reverse",
        records_in=report.seeds,
        records_out=report.dialogues,
        records_rejected=report.rejected,
        outputs={"manifest": str(out_dir / "manifest.json")},
        notes={
            "reasons": report.reasons,
            "generated_tokens": report.generated_tokens,
            "engine_busy_fraction": round(report.busy_fraction, 3),
            "train_dialogues": split.train,
            "heldout_dialogues": split.heldout,
        },
    )


def stage_tps(ctx: RunContext) -> StageReport:
    """Token-level preference sampling: dialogues -> turns -> candidates from the policy."""
    from ttpa_ray.tps import bfcl_dialogues, run_sample_stage, turns_from_dialogues

    init_ray(ctx.config)
    dialogues = training_dialogues(ctx.run_dir)  # the held-out ones never reach TPS
    tps = ctx.config.tps
    if tps.bfcl_limit:
        dialogues += bfcl_dialogues(tps.bfcl_category, tps.bfcl_limit, start=tps.bfcl_offset)
    turns, without_turns = turns_from_dialogues(dialogues)
    ctx.console.print(f"   {len(dialogues)} dialogues -> {len(turns)} tool-call turns")
    report = run_sample_stage(ctx.config, ctx.models["policy"], dialogues, ctx.run_dir / "tps")
    return StageReport(
        "tps",
        records_in=len(turns) + len(without_turns),
        records_out=report.turns_sampled,
        records_rejected=report.rejected,
        outputs=report.outputs,
        notes={
            "candidates": report.candidates,
            "generated_tokens": report.generated_tokens,
            "reasons": report.reasons,
        },
    )


def training_dialogues(run_dir: Path) -> list[Dialogue]:
    """The reversed dialogues that are not held out (the reverse stage's split)."""
    from ttpa_ray.records import read_parquet
    from ttpa_ray.reverse import split_paths

    path = split_paths(run_dir)["train"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the reverse stage first")
    return read_parquet(Dialogue, path)


def count_sampled_inputs(sample_dir: Path) -> int:
    """Turns written by the sample stage plus the dialogues it rejected before they became turns."""
    import pyarrow.parquet as pq

    turn_ids = set(
        pq.read_table(sample_dir / "turns.parquet", columns=["turn_id"]).column("turn_id").to_pylist()
    )
    rejected = (
        pq.read_table(sample_dir / "rejected.parquet", columns=["input_id"]).column("input_id").to_pylist()
    )
    return len(turn_ids) + sum(1 for input_id in rejected if input_id not in turn_ids)


def stage_pairs(ctx: RunContext) -> StageReport:
    """ESM scoring (stateless Ray scorer actors) and the pair rule: candidates -> preference pairs."""
    from ttpa_ray.pairs import run_pairs_stage

    init_ray(ctx.config)
    report = run_pairs_stage(ctx.config, ctx.run_dir / "tps", ctx.run_dir / "pairs")
    ctx.console.print(
        f"   {report.pairs} pairs from {report.turns_paired} turns; rejected by reason {report.reasons}"
    )
    return StageReport(
        "pairs",
        records_in=count_sampled_inputs(ctx.run_dir / "tps"),
        records_out=report.turns_paired,
        records_rejected=report.rejected,
        outputs=report.outputs,
        notes={"pairs": report.pairs, "single_field_share": round(report.single_field_share, 3)},
    )


def _train(ctx: RunContext, stage: str) -> StageReport:
    from ttpa_ray.train.run import run_stage

    init_ray(ctx.config)
    outcome = run_stage(
        stage,  # type: ignore[arg-type]
        ctx.config.train,
        policy=ctx.models["policy"],
        run_dir=ctx.run_dir,
        seed=ctx.config.run.seed,
        run_name=ctx.config.run.name,
    )
    ctx.models["aligned"] = str(outcome.result.policy_dir)
    return StageReport(
        stage,
        records_in=outcome.rows_used + outcome.rows_rejected,
        records_out=outcome.rows_used,
        records_rejected=outcome.rows_rejected,
        outputs={"policy": str(outcome.result.policy_dir)},
        notes={"rejected_by_reason": outcome.reject_counts},
    )


def stage_sft(ctx: RunContext) -> StageReport:
    """SFT warm start on the reversed dialogues (Ray Train + DeepSpeed); skipped when there are none."""
    if not ctx.config.train.sft.enabled:
        ctx.console.print("   train.sft.enabled is false: skipped")
        return StageReport("sft", 0, 0, 0, notes={"skipped": "disabled"})
    # Unless train.dialogues names other data, SFT reads the split's train part (no held-out dialogue).
    if ctx.config.train.dialogues is None and not training_dialogues(ctx.run_dir):
        ctx.console.print("   no reversed dialogue passed the filters: nothing to fine-tune on, skipped")
        return StageReport("sft", 0, 0, 0, notes={"skipped": "no dialogues"})
    return _train(ctx, "sft")


def stage_dpo(ctx: RunContext) -> StageReport:
    """DPO on the TPS pairs (Ray Train + DeepSpeed ZeRO); the exported policy is then evaluated."""
    import pyarrow.parquet as pq

    if not ctx.config.train.dpo.enabled:
        ctx.console.print("   train.dpo.enabled is false: skipped")
        return StageReport("dpo", 0, 0, 0, notes={"skipped": "disabled"})
    pairs = Path(ctx.config.train.pairs or ctx.run_dir / "pairs")
    if pairs.is_dir():
        pairs = pairs / "pairs.parquet"
    if pq.ParquetFile(pairs).metadata.num_rows == 0:
        ctx.console.print("   no preference pair: nothing to align on, skipped")
        return StageReport("dpo", 0, 0, 0, notes={"skipped": "no pairs"})
    return _train(ctx, "dpo")


def stage_evaluate(ctx: RunContext) -> StageReport:
    """Evaluate the policy (and the aligned one) on BFCL's AST categories and the held-out dialogues."""
    from ttpa_ray.evaluate import run_evaluation

    init_ray(ctx.config)
    models = {"base": ctx.models["policy"]}
    if "aligned" in ctx.models:
        models["aligned"] = ctx.models["aligned"]
    ctx.console.print(f"   evaluating {', '.join(f'{k} ({v})' for k, v in models.items())}")
    run = run_evaluation(ctx.config, models, ctx.run_dir / "eval")
    ctx.console.print(
        f"   {run.entries - run.heldout_turns} BFCL entries and {run.heldout_turns} turns of held-out"
        " reversed dialogues per model"
    )
    overall = {label: round(s["all"].mean_esm, 4) for label, s in run.summaries.items()}
    # An entry the model failed to answer is still scored (0, category parse): none is dropped.
    return StageReport(
        "evaluate",
        records_in=run.entries * len(models),
        records_out=run.answers_scored,
        records_rejected=run.answers_rejected,
        outputs={k: str(v) for k, v in run.paths.items()},
        notes={"mean_esm": overall},
    )


# The method's stages in order (DESIGN.md).
STAGES: list[tuple[str, str, StageFn]] = [
    (
        "prepare-models",
        "resolve policy and teacher; build the tiny local model if missing",
        stage_prepare_models,
    ),
    ("reverse", "reversed construction: tools -> executed calls -> answer -> question", stage_reverse),
    ("tps", "token-level preference sampling of alternative calls from the policy", stage_tps),
    ("pairs", "ESM scoring of the candidates, chosen/rejected pairs in TRL's format", stage_pairs),
    ("sft", "SFT warm start on the reversed dialogues (Ray Train + DeepSpeed)", stage_sft),
    ("dpo", "DPO on the pairs (Ray Train + DeepSpeed ZeRO)", stage_dpo),
    ("evaluate", "ESM, errors and exact match on BFCL and held-out dialogues", stage_evaluate),
]


def _write_summary(run_dir: Path, config: TTPAConfig, reports: list[StageReport]) -> None:
    summary = {
        "config_digest": config.digest(),
        "stages_run": [asdict(r) for r in reports],
        "stages_pending": [name for name, _, _ in STAGES[len(reports) :]],
    }
    (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def run_pipeline(config: TTPAConfig, console: Console | None = None) -> list[StageReport]:
    """Run every stage in order and write ``pipeline.json`` to the run dir."""
    console = console or Console()
    run_dir = Path(config.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    ctx = RunContext(config=config, run_dir=run_dir, console=console)

    console.print(f"[bold]ttpa run[/bold] {config.run.name} -> {run_dir}")
    console.print("stages: " + " -> ".join(name for name, _, _ in STAGES))

    reports: list[StageReport] = []
    for number, (name, description, fn) in enumerate(STAGES, start=1):
        console.print(f"[bold cyan]>> [{number}/{len(STAGES)}] {name}[/bold cyan]: {description}")
        start = time.perf_counter()
        report = fn(ctx)
        report.seconds = time.perf_counter() - start
        if not report.balanced:
            raise RuntimeError(
                f"stage {name} lost records: in {report.records_in} != out {report.records_out} "
                f"+ rejected {report.records_rejected}"
            )
        reports.append(report)
        _write_summary(run_dir, config, reports)

    table = Table(title="stages")
    for column in ("stage", "in", "out", "rejected", "seconds"):
        table.add_column(column)
    for r in reports:
        table.add_row(
            r.name, str(r.records_in), str(r.records_out), str(r.records_rejected), f"{r.seconds:.1f}"
        )
    console.print(table)
    console.print(f"summary: {run_dir / 'pipeline.json'}")
    for report in reports:
        if "markdown" in report.outputs:
            console.print(f"[bold green]report:[/bold green] {report.outputs['markdown']}")
    return reports
