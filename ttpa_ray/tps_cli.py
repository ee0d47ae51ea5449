"""`ttpa sample` and `ttpa pairs`: typer command functions over :mod:`ttpa_ray.tps` and :mod:`ttpa_ray.pairs`.

Register them with ``app.command("sample")(sample_command)`` and ``app.command("pairs")(pairs_command)``.
They read and write the run dir of the config: the train part of the split
(``<run_dir>/dialogues/train.parquet``, :mod:`ttpa_ray.rundir`) -> ``<run_dir>/tps`` (turns,
candidates, rejected) -> ``<run_dir>/pairs`` (pairs, scored, rejected). Held-out dialogues and
evaluated BFCL entries are refused as input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ttpa_ray.cli_options import (
    ClusterOption,
    ConfigOption,
    DryRunOption,
    OverridesArg,
    console,
    dry_run,
    load_or_exit,
)
from ttpa_ray.store import mirrored


def _reasons(reasons: dict[str, int]) -> str:
    return " (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""


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
    """Token-level preference sampling (or the sequence baseline, tps.sampler): dialogues -> candidates."""
    from ttpa_ray.config import TTPAConfig
    from ttpa_ray.models import ModelNotFoundError, resolve_model
    from ttpa_ray.pipeline import RunContext, sample_turns
    from ttpa_ray.rundir import check_not_heldout, read_split
    from ttpa_ray.tps import bfcl_dialogues, read_dialogues

    cfg = load_or_exit(config, overrides)
    if dry:
        return dry_run(cfg, ["tps"], cluster)
    run_dir = cfg.run.work_dir
    with mirrored(cfg.run.remote, run_dir):
        try:
            model = resolve_model(cfg.model.policy)
            if bfcl:
                # the config's own check refuses entries the evaluation asks (tps.bfcl_offset)
                tps = {**cfg.tps.model_dump(), "bfcl_category": bfcl, "bfcl_limit": limit or 1_000_000}
                cfg = TTPAConfig.model_validate({**cfg.model_dump(), "tps": tps})
                found = bfcl_dialogues(bfcl, limit, start=cfg.tps.bfcl_offset)
            elif dialogues is not None:
                found = read_dialogues(dialogues)[:limit]
                check_not_heldout(run_dir, found)
            else:
                found = read_split(run_dir, "train")[:limit]
        except (ModelNotFoundError, FileNotFoundError, ValueError) as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None

        console.print(f"sample ({cfg.tps.sampler}): {len(found)} dialogues, policy {model}")
        # the pipeline's own stage code, on the dialogues picked here; the policy is model.policy
        ctx = RunContext(config=cfg, run_dir=run_dir, console=console, models={"policy": model})
        report = sample_turns(ctx, cfg, run_dir / "tps", "sample", dialogues=found)
        notes = report.notes
        console.print(
            f"sample: {len(found)} dialogues -> {notes['turns']} turns -> {notes['candidates']} "
            f"candidates; {report.records_rejected} rejected{_reasons(notes['reasons'])}; "
            f"wrote {run_dir / 'tps'}"
        )


def pairs_command(config: ConfigOption = None, overrides: OverridesArg = None) -> None:
    """ESM labels and the pair rule: candidates -> TRL preference pairs (+ rejected turns with reasons)."""
    from ttpa_ray.pipeline import RunContext, stage_pairs

    cfg = load_or_exit(config, overrides)
    run_dir = cfg.run.work_dir
    with mirrored(cfg.run.remote, run_dir):
        if not (run_dir / "tps" / "turns.parquet").exists():
            console.print(
                f"[red]{run_dir / 'tps' / 'turns.parquet'} not found: run `ttpa sample` first[/red]"
            )
            raise typer.Exit(2)
        try:
            report = stage_pairs(RunContext(config=cfg, run_dir=run_dir, console=console))
        except FileNotFoundError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    notes = report.notes
    console.print(
        f"pairs: {report.records_in} sampled turns and dialogues -> {notes['pairs']} pairs from "
        f"{report.records_out} turns + "
        f"{report.records_rejected} rejected{_reasons(notes['reasons'])}; "
        f"{notes['single_field_share']:.1%} of pairs differ in exactly one field; "
        f"wrote {report.outputs['pairs']}"
    )
