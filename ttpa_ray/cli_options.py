"""What every `ttpa` command shares: the console, the --config option, dotted overrides, and loading
a config so that a bad one ends in one clear message (exit 2), never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ttpa_ray.config import ConfigError, TTPAConfig, load_config

console = Console(soft_wrap=True)  # an error stays one line, however narrow the terminal

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults)")
]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. tps.top_k=5")]


def load_or_exit(config: Path | None, overrides: list[str] | None) -> TTPAConfig:
    """Load a config or exit 2 with one line per problem."""
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="print what the stage asks Ray for and where it reads and writes")
]
ClusterOption = Annotated[
    Path | None,
    typer.Option(
        "--cluster", help="with --dry-run: check the asks against this Ray cluster YAML's node types"
    ),
]


def dry_run(cfg: TTPAConfig, stages: list[str] | None, cluster: Path | None) -> None:
    """Print the plan of ``stages`` (None: all); with ``cluster``, exit 2 on a request it cannot host."""
    from ttpa_ray.plan import check_against_cluster, describe, node_types, plan_run

    plans = [p for p in plan_run(cfg) if stages is None or p.stage in stages]
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
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    for error in errors:
        console.print(f"[red]{error}[/red]")
    if errors:
        raise typer.Exit(2)
    console.print(f"[green]every request fits a node type of {cluster}[/green]")
