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
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ttpa_ray import store
from ttpa_ray.config import TTPAConfig
from ttpa_ray.progress import StageBar
from ttpa_ray.records import Dialogue

if TYPE_CHECKING:
    import ray

    from ttpa_ray.store import Mirror


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
    """Resolve the policy and teacher: an embedded model is prepared (converted once), a folder checked."""
    from ttpa_ray.models import resolve_dtype, resolve_model

    wanted = {"policy": ctx.config.model.policy, "teacher": ctx.config.model.teacher_or_policy}
    endpoint = ctx.config.teacher_endpoint
    if ctx.config.model.teacher_is_endpoint:  # the teacher is served: its tokenizer renders the prompts
        from ttpa_ray.endpoint import api_key, check_endpoint

        served = check_endpoint(endpoint, api_key(endpoint))
        length = f", {served.max_model_len} tokens" if served.max_model_len else ""
        ctx.console.print(f"   teacher endpoint: {endpoint.base_url} serves {served.name}{length}")
        wanted["teacher"] = endpoint.tokenizer or str(endpoint.model)
    for role, model in wanted.items():
        served_teacher = role == "teacher" and ctx.config.model.teacher_is_endpoint
        key = "teacher_endpoint.tokenizer" if served_teacher else f"model.{role}"
        ctx.models[role] = resolve_model(model, key=key, log=ctx.console.print)
        ctx.console.print(f"   {role}{' tokenizer' if served_teacher else ''}: {model} -> {ctx.models[role]}")
    dtype = ctx.config.model.dtype
    if ctx.config.ray.address is None:  # local: the replicas and workers run on this machine
        ctx.console.print(f"   dtype: {dtype} -> {resolve_dtype(dtype)} on this machine")
    return StageReport("prepare-models", len(wanted), len(wanted), 0, outputs=dict(ctx.models))


def init_ray(config: TTPAConfig) -> None:
    """Join the configured cluster, or start a local one (no dashboard: it costs a core on a laptop).

    Joining: the address must answer within ``ray.connect_timeout_s``, else one line names it.
    Local: the local cluster's processes die with this driver, even when it is killed.
    Worker output reaches the console (training prints a line per step), with vLLM's INFO chatter off.
    """
    import os

    import ray

    from ttpa_ray.reaper import watch_this_process

    quiet = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not ray.is_initialized():
        if config.ray.address:
            check_reachable(config.ray.address, config.ray.connect_timeout_s)
            ray.init(address=config.ray.address, runtime_env={"env_vars": quiet})
        else:
            watch_this_process()
            ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, runtime_env={"env_vars": quiet})
    ray.data.DataContext.get_current().enable_progress_bars = config.ray.progress_bars


class ClusterUnreachable(ConnectionError):
    """The configured Ray cluster did not answer."""


def check_reachable(address: str, timeout_s: float) -> None:
    """Raise :class:`ClusterUnreachable` naming ``address`` unless its GCS (or client server) accepts
    a TCP connection within ``timeout_s`` (retrying while it comes up)."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    target: str | None = address.removeprefix("ray://")
    if target == "auto":  # the cluster `ray start` recorded on this machine
        try:
            target = canonicalize_bootstrap_address(target)
        except (ConnectionError, ValueError) as err:
            raise ClusterUnreachable(f"ray.address={address}: {err}") from None
    if target is None:
        raise ClusterUnreachable(f"ray.address={address}: no running Ray cluster found on this machine")
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(1.0, timeout_s / 10)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ClusterUnreachable(
                    f"ray.address={address}: no Ray cluster answers at {target} "
                    f"after {timeout_s:g} s ({err.strerror or err})"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


class ShardProgress:
    """Drives a stage bar from finished reverse shards: seeds done, dialogues/rejected, tokens/s."""

    def __init__(self, bar: StageBar) -> None:
        self.bar = bar
        self.start = time.perf_counter()

    def __call__(self, row: dict[str, Any], totals: dict[str, int], shards: int) -> None:
        elapsed = time.perf_counter() - self.start
        self.bar.update(
            totals["dialogues"] + totals["rejected"],
            detail=f"dialogues {totals['dialogues']} rejected {totals['rejected']} | "
            f"{totals['tokens'] / max(elapsed, 1e-9):,.0f} tok/s",
        )


def show_dialogue(console: Console, dialogue: Dialogue) -> None:
    """Print one whole dialogue, turn by turn (tool results cut to a line)."""
    console.print(f"   example dialogue {dialogue.dialogue_id} (scenario: {dialogue.scenario})")
    for message in dialogue.messages:
        if message.tool_calls:
            text = " ; ".join(
                f"{c.name}({json.dumps(c.arguments, ensure_ascii=False)})" for c in message.tool_calls
            )
        else:
            text = (message.content or "").replace("\n", " ")
        limit = 100 if message.role == "system" else 300
        console.print(
            f"     {message.role:>9}: {text[:limit]}{'...' if len(text) > limit else ''}", markup=False
        )


def print_endpoint_figures(console: Console, base_url: Any, figures: dict[str, Any]) -> None:
    """The served teacher's line: requests, retries, failures, tokens, mean latency."""
    answered = figures.get("answered", 0)
    console.print(
        f"   teacher endpoint {base_url}: {figures.get('requests', 0)} requests, "
        f"{figures.get('retries', 0)} retries, {figures.get('failures', 0)} failed after their retries, "
        f"{figures.get('prompt_tokens', 0)} prompt + {figures.get('completion_tokens', 0)} completion "
        f"tokens, {figures.get('latency_s', 0.0) / max(answered, 1):.2f} s a request"
    )


def stage_reverse(ctx: RunContext) -> StageReport:
    """Reversed construction: seeds -> dialogues + rejected rows (Parquet shards + manifest)."""
    from ttpa_ray.reverse import SIMULATED_KEYS, dialogue_dataset, run_reverse
    from ttpa_ray.rundir import first_dialogue, write_split

    init_ray(ctx.config)
    out_dir = ctx.run_dir / "reverse"
    with StageBar(ctx.console, "reverse", ctx.config.reverse.num_seeds) as bar:
        report = run_reverse(ctx.config, ctx.models["teacher"], out_dir, ShardProgress(bar))
    share = report.dialogues / max(report.seeds, 1)
    ctx.console.print(
        f"   {report.seeds} seeds -> {report.dialogues} dialogues ({share:.0%}); rejected by reason: "
        f"{dict(sorted(report.reasons.items(), key=lambda kv: -kv[1]))}"
    )
    quality = report.quality
    if quality.get("dialogues"):
        ctx.console.print(
            f"   data quality: degenerate {quality['degenerate_share']:.0%} of seeds, duplicates "
            f"{quality['duplicate_share']:.0%}, distinct question 2-grams "
            f"{quality['question_distinct_2grams']:.0%}, {quality['calls_per_dialogue']:.1f} calls and "
            f"{quality['tools_per_dialogue']:.1f} tools a dialogue, "
            f"{quality['catalogue_tools_used']:.0%} of the catalogue's tools used"
        )
    if report.simulated:
        sim = report.simulated
        calls = sum(sim.get(k, 0) for k in SIMULATED_KEYS)
        ctx.console.print(
            f"   simulated tools: {calls} calls, {sim.get('cached', 0)} answered from the cache "
            f"({sim.get('cached', 0) / max(calls, 1):.0%}), {sim.get('written', 0)} written by the teacher, "
            f"{sim.get('invalid', 0)} written invalid (tool errors); {sim['cache_size']} responses cached"
        )
    if report.endpoint:
        print_endpoint_figures(ctx.console, ctx.config.teacher_endpoint.base_url, report.endpoint)
    if report.mcp:
        mcp = report.mcp
        ctx.console.print(
            f"   MCP tools: {mcp.get('calls', 0)} calls, {mcp.get('tool_errors', 0)} came back as tool "
            f"errors, {mcp.get('starts', 0)} server processes started"
        )
    for error in report.catalogue_errors[:5]:
        ctx.console.print(f"   [yellow]not in the catalogue: {error}[/yellow]", highlight=False)
    ev = ctx.config.eval
    split = write_split(
        ctx.run_dir,
        dialogue_dataset(out_dir),
        ev.heldout_fraction,
        ctx.config.run.seed,
        ev.validation_fraction,
    )
    example = first_dialogue(ctx.run_dir)
    if example is not None:
        show_dialogue(ctx.console, example)
    ctx.console.print(
        f"   {split.counts['train']} dialogues for TPS and SFT, {split.counts['validation']} for validation,"
        f" {split.counts['heldout']} held out for the evaluation ({split.paths['heldout']})"
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
            "simulated": report.simulated,
            "quality": report.quality,
            "train_dialogues": split.counts["train"],
            "validation_dialogues": split.counts["validation"],
            "heldout_dialogues": split.counts["heldout"],
        },
    )


def sample_turns(
    ctx: RunContext,
    config: TTPAConfig,
    out_dir: Path,
    label: str,
    dialogues: ray.data.Dataset | list[Dialogue] | None = None,
) -> StageReport:
    """Sample candidates of the training turns (or of ``dialogues``, as `ttpa sample` picks them) from
    the policy being aligned, with ``config.tps``. The split's train part is read by the cluster."""
    import ray

    from ttpa_ray.records import to_table
    from ttpa_ray.rundir import part_size, split_path
    from ttpa_ray.tps import bfcl_dialogues, run_sample_stage

    init_ray(config)
    tps = config.tps
    if dialogues is None:
        part_size(ctx.run_dir, "train")  # the held-out ones never reach TPS; no split is one line
        dialogues = store.dataset(split_path(ctx.run_dir, "train"))
        if tps.bfcl_limit:
            bfcl = bfcl_dialogues(tps.bfcl_category, tps.bfcl_limit, start=tps.bfcl_offset)
            dialogues = dialogues.union(ray.data.from_arrow(to_table(bfcl, Dialogue)))
    if tps.bfcl_limit and tps.allow_evaluated_bfcl:
        ctx.console.print(
            f"   [yellow]tps.allow_evaluated_bfcl: BFCL {tps.bfcl_category} entries from "
            f"{tps.bfcl_offset} may also be evaluated; their results are not held out[/]"
        )
    # TPS samples the policy being aligned: the SFT'd one when SFT ran (DPO starts from it too)
    policy = ctx.models.get("sft", ctx.models["policy"])
    with StageBar(ctx.console, label, None) as bar:

        def progress(r: Any) -> None:
            bar.update(
                r.turns_sampled,
                total=r.turns,
                detail=f"candidates {r.candidates} | {r.generated_tokens / max(r.seconds, 1e-9):,.0f} tok/s",
            )

        report = run_sample_stage(config, policy, dialogues, out_dir, progress)
        bar.update(report.turns, total=report.turns, detail=f"candidates {report.candidates}")
    ctx.console.print(
        f"   {report.dialogues} dialogues -> {report.turns} tool-call turns ({tps.sampler} sampler): "
        f"{report.turns_sampled} sampled, {report.candidates} candidates; rejected {report.reasons}"
    )
    return StageReport(
        label,
        records_in=report.turns + report.without_turns,
        records_out=report.turns_sampled,
        records_rejected=report.rejected,
        outputs=report.outputs,
        notes={
            "turns": report.turns,
            "candidates": report.candidates,
            "generated_tokens": report.generated_tokens,
            "reasons": report.reasons,
        },
    )


def stage_tps(ctx: RunContext) -> StageReport:
    """Token-level preference sampling: dialogues -> turns -> candidates from the policy."""
    return sample_turns(ctx, ctx.config, ctx.run_dir / "tps", "tps")


def _pairs(ctx: RunContext, config: TTPAConfig, sample_dir: Path, out_dir: Path, label: str) -> StageReport:
    from ttpa_ray.pairs import run_pairs_stage

    init_ray(config)
    report = run_pairs_stage(config, sample_dir, out_dir)
    ctx.console.print(
        f"   {report.pairs} pairs from {report.turns_paired} turns; rejected by reason {report.reasons}"
    )
    return StageReport(
        label,
        records_in=report.turns + report.without_turns,
        records_out=report.turns_paired,
        records_rejected=report.rejected,
        outputs=report.outputs,
        notes={
            "pairs": report.pairs,
            "single_field_share": round(report.single_field_share, 3),
            "reasons": report.reasons,
        },
    )


def stage_pairs(ctx: RunContext) -> StageReport:
    """ESM scoring (stateless Ray scorer actors) and the pair rule: candidates -> preference pairs."""
    return _pairs(ctx, ctx.config, ctx.run_dir / "tps", ctx.run_dir / "pairs", "pairs")


def train_policy(
    ctx: RunContext, stage: str, label: str, input_path: Path | None = None, out_dir: Path | None = None
) -> StageReport:
    """Train ``stage`` (sft or dpo); the exported policy becomes ``ctx.models[label]``."""
    from ttpa_ray.train.run import run_stage

    init_ray(ctx.config)
    steps = (ctx.config.train.sft if stage == "sft" else ctx.config.train.dpo).max_steps
    name = stage if label in ("sft", "ttpa") else f"{stage} ({label})"
    with StageBar(ctx.console, name, steps if steps > 0 else None) as bar:

        def progress(entry: dict[str, Any]) -> None:
            metrics = [f"loss {entry['loss']:.3f}"]
            if "rewards/accuracies" in entry:
                metrics.append(f"reward acc {entry['rewards/accuracies']:.2f}")
            if "tokens_per_s" in entry:
                metrics.append(f"{entry['tokens_per_s']:,.0f} tok/s")
            bar.update(entry["step"], total=entry.get("max_steps"), detail=" | ".join(metrics))

        outcome = run_stage(
            stage,  # type: ignore[arg-type]
            ctx.config.train,
            policy=ctx.models["policy"],
            run_dir=ctx.run_dir,
            seed=ctx.config.run.seed,
            run_name=ctx.config.run.name,
            dtype=ctx.config.model.dtype,
            progress=progress,
            input_path=input_path,
            out_dir=out_dir,
            vllm=ctx.config.vllm,
        )
    final = outcome.result.metrics
    ctx.console.print(
        f"   {outcome.rows_used} rows passed the checks "
        f"({outcome.rows_rejected} rejected: {outcome.reject_counts}), "
        f"{final.get('step', '?')} steps, train loss {final.get('train_loss', float('nan')):.4f}"
    )
    held = {k: v for k, v in final.items() if k.startswith("heldback_")}
    if held:
        ctx.console.print(
            f"   {held['heldback_pairs']:.0f} held-back pairs (never trained on): loss "
            f"{held.get('heldback_loss', float('nan')):.4f}, implicit reward accuracy "
            f"{held.get('heldback_reward_accuracy', float('nan')):.2f}"
        )
    ctx.models[label] = str(outcome.result.policy_dir)
    return StageReport(
        stage,
        records_in=outcome.rows_used + outcome.rows_rejected,
        records_out=outcome.rows_used,
        records_rejected=outcome.rows_rejected,
        outputs={"policy": str(outcome.result.policy_dir)},
        notes={"rejected_by_reason": outcome.reject_counts, "train_loss": final.get("train_loss"), **held},
    )


def stage_sft(ctx: RunContext) -> StageReport:
    """SFT warm start on the reversed dialogues (Ray Train + DeepSpeed); skipped when there are none."""
    if not ctx.config.train.sft.enabled:
        ctx.console.print("   train.sft.enabled is false: skipped")
        return StageReport("sft", 0, 0, 0, notes={"skipped": "disabled"})
    from ttpa_ray.rundir import part_size

    # Unless train.dialogues names other data, SFT reads the split's train part (no held-out dialogue).
    if ctx.config.train.dialogues is None and not part_size(ctx.run_dir, "train"):
        ctx.console.print("   no reversed dialogue passed the filters: nothing to fine-tune on, skipped")
        return StageReport("sft", 0, 0, 0, notes={"skipped": "no dialogues"})
    return train_policy(ctx, "sft", "sft")


def stage_dpo(ctx: RunContext) -> StageReport:
    """DPO on the TPS pairs (Ray Train + DeepSpeed ZeRO); the exported policy is then evaluated."""
    if not ctx.config.train.dpo.enabled:
        ctx.console.print("   train.dpo.enabled is false: skipped")
        return StageReport("dpo", 0, 0, 0, notes={"skipped": "disabled"})
    pairs = Path(ctx.config.train.pairs or ctx.run_dir / "pairs")
    if (pairs / "pairs.parquet").exists():
        pairs = pairs / "pairs.parquet"
    if store.count_rows(pairs) == 0:
        ctx.console.print("   no preference pair: nothing to align on, skipped")
        return StageReport("dpo", 0, 0, 0, notes={"skipped": "no pairs"})
    return train_policy(ctx, "dpo", "ttpa")


def stage_sequence(ctx: RunContext) -> StageReport:
    """The paper's baseline: sequence-level pairs (n whole samples per turn, ESM-labelled), capped at
    the TTPA pair count, and DPO on them with the same steps; its policy is evaluated beside TTPA's."""
    from ttpa_ray.records import PreferencePair, to_table
    from ttpa_ray.rundir import keep_lowest

    if not ctx.config.eval.sequence_baseline:
        ctx.console.print("   eval.sequence_baseline is false: skipped")
        return StageReport("sequence", 0, 0, 0, notes={"skipped": "disabled"})
    wanted = store.count_rows(ctx.run_dir / "pairs" / "pairs.parquet")
    if not ctx.config.train.dpo.enabled or wanted == 0:
        ctx.console.print("   no TTPA pairs to match (or DPO disabled): skipped")
        return StageReport("sequence", 0, 0, 0, notes={"skipped": "no ttpa pairs"})
    config = ctx.config.model_copy(update={"tps": ctx.config.tps.model_copy(update={"sampler": "sequence"})})
    sampled = sample_turns(ctx, config, ctx.run_dir / "tps-sequence", "sequence sampling")
    report = _pairs(ctx, config, ctx.run_dir / "tps-sequence", ctx.run_dir / "pairs-sequence", "sequence")
    pairs_file = ctx.run_dir / "pairs-sequence" / "pairs.parquet"
    if report.notes["pairs"] > wanted:  # the same number of pairs as TTPA, drawn by the run's seed
        capped = ctx.run_dir / "pairs-sequence" / "pairs-for-dpo.parquet"
        empty = to_table([], PreferencePair)
        keep_lowest(store.dataset(pairs_file), "pair_id", wanted, ctx.config.run.seed, capped, empty)
        pairs_file = capped
    count = store.count_rows(pairs_file)
    ctx.console.print(f"   {count} sequence-level pairs for DPO (TTPA has {wanted})")
    report.notes.update(pairs_for_dpo=count, ttpa_pairs=wanted, candidates=sampled.notes["candidates"])
    if count == 0:
        ctx.console.print("   no sequence-level pair: no DPO to run")
        return report
    trained = train_policy(
        ctx, "dpo", "sequence", input_path=pairs_file, out_dir=ctx.run_dir / "train" / "dpo-sequence"
    )
    report.outputs.update(trained.outputs)
    return report


def reverse_quality(run_dir: Path) -> dict[str, Any] | None:
    """The run's data-quality summary (the reverse stage's manifest), if the run built its dialogues."""
    manifest = run_dir / "reverse" / "manifest.json"
    if not manifest.is_file():
        return None
    quality: dict[str, Any] | None = json.loads(manifest.read_text())["report"].get("quality")
    return quality


def stage_evaluate(ctx: RunContext) -> StageReport:
    """Evaluate the policy (and the aligned one) on BFCL's AST categories and the held-out dialogues."""
    from ttpa_ray.evaluate import run_evaluation

    init_ray(ctx.config)
    models = {"base": ctx.models["policy"]}
    models.update({label: ctx.models[label] for label in ("sft", "ttpa", "sequence") if label in ctx.models})
    ctx.console.print(f"   evaluating {', '.join(f'{k} ({v})' for k, v in models.items())}")
    with StageBar(ctx.console, "evaluate", None) as bar:
        run = run_evaluation(
            ctx.config,
            models,
            ctx.run_dir / "eval",
            lambda label, answers: bar.update(answers, detail=f"{label} done"),
            data_quality=reverse_quality(ctx.run_dir),
        )
        bar.update(run.entries * len(models), total=run.entries * len(models), detail="all models")
    ctx.console.print(
        f"   {run.entries - run.heldout_turns} BFCL entries and {run.heldout_turns} turns of held-out"
        " reversed dialogues per model"
    )
    overall = {label: round(s["all"].mean_esm, 4) for label, s in run.summaries.items()}
    for label, summary in run.summaries.items():
        every, held = summary["all"], summary.get("reversed_heldout")
        ctx.console.print(
            f"   {label:>8}: mean ESM {every.mean_esm:.3f} "
            f"[{every.mean_esm_ci[0]:.2f}, {every.mean_esm_ci[1]:.2f}], exact match {every.exact_match:.3f}"
            + (
                f" | held-out turns: ESM {held.mean_esm:.3f} [{held.mean_esm_ci[0]:.2f}, "
                f"{held.mean_esm_ci[1]:.2f}] (n={held.n})"
                if held
                else ""
            )
        )
    for comparison in run.comparisons:
        if comparison.metric == "mean_esm":
            ctx.console.print(f"   {comparison.sentence()}")
    if run.infra_errors:  # the machinery's failures: in no rate, but never silent
        ctx.console.print(
            f"   [yellow]{run.infra_errors} answers failed in the machinery (infra_error), not scored;"
            f" see {run.paths['answers']}[/yellow]"
        )
    return StageReport(
        "evaluate",
        records_in=run.entries * len(models),
        records_out=run.answers_scored,
        records_rejected=run.answers_rejected,
        outputs={k: str(v) for k, v in run.paths.items()},
        notes={"mean_esm": overall},
    )


# The method's stages in order (docs/design.md, "Stages").
STAGES: list[tuple[str, str, StageFn]] = [
    (
        "prepare-models",
        "resolve policy and teacher; convert the embedded model once",
        stage_prepare_models,
    ),
    ("reverse", "reversed construction: tools -> executed calls -> answer -> question", stage_reverse),
    ("sft", "SFT warm start on the reversed dialogues (Ray Train + DeepSpeed)", stage_sft),
    ("tps", "token-level preference sampling of alternative calls from the SFT'd policy", stage_tps),
    ("pairs", "ESM scoring of the candidates, chosen/rejected pairs in TRL's format", stage_pairs),
    ("dpo", "DPO on the pairs (Ray Train + DeepSpeed ZeRO)", stage_dpo),
    ("sequence", "baseline: sequence-level pairs, as many, and DPO with the same steps", stage_sequence),
    ("evaluate", "ESM, errors and exact match on BFCL and held-out dialogues", stage_evaluate),
]


# Where a run runs (which Ray cluster, where its driver keeps its working copy) does not change what it
# computes: a run resumed elsewhere resumes.
RUN_PLACE = ("ray", "run.local_dir")


def _write_summary(run_dir: Path, config: TTPAConfig, reports: list[StageReport]) -> None:
    summary = {
        "config_digest": config.digest(),
        "resume_digest": config.digest(without=RUN_PLACE),
        "stages_run": [asdict(r) for r in reports],
        "stages_pending": [name for name, _, _ in STAGES[len(reports) :]],
    }
    (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


# Which model a finished stage's output is, for the stages after it (a resumed run restores them).
STAGE_MODELS = {"sft": "sft", "dpo": "ttpa", "sequence": "sequence"}


def finished_stages(run_dir: Path, config: TTPAConfig) -> list[StageReport]:
    """The stages a previous run of this same config finished (``pipeline.json``), in order."""
    path = run_dir / "pipeline.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text(encoding="utf-8"))
    if summary.get("resume_digest") != config.digest(without=RUN_PLACE):
        return []  # another config: nothing of that run is this run's
    return [StageReport(**report) for report in summary.get("stages_run", [])]


def run_pipeline(config: TTPAConfig, console: Console | None = None) -> list[StageReport]:
    """Run every stage in order and write ``pipeline.json`` to the run dir.

    A run of the same config that stopped part way (killed, failed) is resumed: the stages it
    finished are skipped, the others run (reverse also skips its finished shards, training resumes
    from its last checkpoint)."""
    from ttpa_ray.store import mirrored

    console = console or Console()
    run_dir = config.run.work_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with mirrored(config.run.remote, run_dir) as mirror:
        if mirror is not None:
            console.print(f"run dir {mirror.remote}: working copy {run_dir}, synced after every stage")
        return _run_stages(config, run_dir, console, mirror)


def _run_stages(
    config: TTPAConfig, run_dir: Path, console: Console, mirror: Mirror | None
) -> list[StageReport]:
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    ctx = RunContext(config=config, run_dir=run_dir, console=console)
    done = {report.name: report for report in finished_stages(run_dir, config)}

    console.print(f"[bold]ttpa run[/bold] {config.run.name} -> {config.run.run_dir}")
    console.print("stages: " + " -> ".join(name for name, _, _ in STAGES))

    reports: list[StageReport] = []
    for number, (name, description, fn) in enumerate(STAGES, start=1):
        if name in done and len(reports) == list(done).index(name):
            report = done[name]
            console.print(
                f"[bold cyan]>> [{number}/{len(STAGES)}] {name}[/bold cyan]: done by an earlier run, skipped"
            )
            if name == "prepare-models":
                ctx.models.update(report.outputs)
            elif name in STAGE_MODELS and "policy" in report.outputs:
                ctx.models[STAGE_MODELS[name]] = report.outputs["policy"]
            reports.append(report)
            continue
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
        if mirror is not None:
            mirror.push()  # a later run, anywhere, resumes after this stage

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
