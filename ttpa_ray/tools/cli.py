"""``ttpa tools list|show|call CATALOGUE ...``: inspect a tool catalogue and call a tool by hand.

CATALOGUE is ``builtin``, ``bfcl`` (or ``bfcl:GorillaFileSystem,TravelAPI``), a folder of tool modules,
or a ToolBench-style JSON file. The main CLI mounts this app with ``app.add_typer(tools_app, name="tools")``.
Exit codes: 0 success, 1 the tool call failed, 2 a bad catalogue, tool or argument text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ttpa_ray.tools.registry import Catalogue, ToolRegistry, load_catalogue
from ttpa_ray.tools.sandbox import SandboxConfig
from ttpa_ray.tools.simulated import SimulatedCache

app = typer.Typer(help="Inspect tool catalogues and call a tool by hand.", no_args_is_help=True)

CatalogueArg = Annotated[
    str,
    typer.Argument(
        help="builtin, bfcl[:Class,...], a folder of tool modules, a ToolBench-style JSON file, or a+b"
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _load(reference: str) -> Catalogue:
    try:
        catalogue = load_catalogue(reference)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    return catalogue  # what was skipped is logged by the loaders, one line per tool


def _first_line(text: str, width: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


@app.command("list")
def list_tools(catalogue: CatalogueArg) -> None:
    """List the tools of a catalogue (name, source, first line of the description)."""
    loaded = _load(catalogue)
    width = max((len(name) for name in loaded.names), default=0)
    for spec in loaded.tools():
        typer.echo(f"{spec.name:<{width}}  {_first_line(spec.description, 100)}")
    skipped = f", {len(loaded.errors)} skipped (see the warnings)" if loaded.errors else ""
    typer.echo(f"{len(loaded)} tools{skipped}", err=True)


@app.command("show")
def show(catalogue: CatalogueArg, tool: Annotated[str, typer.Argument(help="tool name")]) -> None:
    """Print one tool's spec as OpenAI function JSON (what the model sees)."""
    loaded = _load(catalogue)
    if tool not in loaded:
        raise _fail(f"no tool {tool!r} in {catalogue}; see `ttpa tools list {catalogue}`")
    spec = loaded.specs[tool]
    typer.echo(json.dumps({**spec.to_openai(), "source": spec.source}, indent=2, ensure_ascii=False))


@app.command("call")
def call(
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
    """Call one tool and print its ToolResult as JSON (exit code 1 when the call failed)."""
    try:
        arguments: Any = json.loads(args)
    except json.JSONDecodeError as exc:
        raise _fail(f"--args is not valid JSON ({exc})") from None
    loaded = _load(catalogue)
    initial_config: dict[str, Any] = {}
    if bfcl_entry is not None:
        from ttpa_ray.tools.bfcl_envs import find_scenario

        try:
            initial_config = find_scenario(bfcl_entry).initial_config
        except KeyError as exc:
            raise _fail(str(exc.args[0])) from None
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
