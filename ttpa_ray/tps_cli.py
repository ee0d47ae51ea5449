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
    from ttpa_ray.pipeline import init_ray
    from ttpa_ray.rundir import check_not_heldout, read_split
    from ttpa_ray.tps import SampleReport, bfcl_dialogues, read_dialogues, run_sample_stage

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

        def progress(report: SampleReport) -> None:
            rate = report.generated_tokens / max(report.seconds, 1e-9)
            console.print(
                f"   sample: {report.turns_sampled}/{report.turns} turns sampled | "
                f"{report.candidates} candidates | "
                f"{rate:,.0f} generated tok/s | {report.seconds:,.0f} s"
            )

        console.print(f"sample ({cfg.tps.sampler}): {len(found)} dialogues, policy {model}")
        init_ray(cfg)
        report = run_sample_stage(cfg, model, found, run_dir / "tps", progress)
        console.print(
            f"sample: {report.dialogues} dialogues -> {report.turns} turns -> "
            f"{report.candidates} candidates; "
            f"{report.rejected} rejected{_reasons(report.reasons)}; {report.seconds:.0f} s; "
            f"wrote {run_dir / 'tps'}"
        )


def pairs_command(config: ConfigOption = None, overrides: OverridesArg = None) -> None:
    """ESM labels and the pair rule: candidates -> TRL preference pairs (+ rejected turns with reasons)."""
    from ttpa_ray.pairs import run_pairs_stage
    from ttpa_ray.pipeline import init_ray

    cfg = load_or_exit(config, overrides)
    run_dir = cfg.run.work_dir
    with mirrored(cfg.run.remote, run_dir):
        if not (run_dir / "tps" / "turns.parquet").exists():
            console.print(
                f"[red]{run_dir / 'tps' / 'turns.parquet'} not found: run `ttpa sample` first[/red]"
            )
            raise typer.Exit(2)
        init_ray(cfg)
        try:
            report = run_pairs_stage(cfg, run_dir / "tps", run_dir / "pairs")
        except FileNotFoundError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    console.print(
        f"pairs: {report.turns} turns -> {report.pairs} pairs from {report.turns_paired} turns + "
        f"{report.rejected} rejected{_reasons(report.reasons)}; {report.single_field_share:.1%} of pairs "
        f"differ in exactly one field; wrote {report.outputs['pairs']}"
    )
