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
