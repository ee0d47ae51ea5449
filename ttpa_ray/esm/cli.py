"""``ttpa score FILE --out OUT``: ESM for every row of a JSONL or Parquet file (no Ray needed).

Row format (one object per JSONL line, or Parquet columns):

- ``candidate``: a call object ``{"name": ..., "arguments": {...}}`` (arguments may be JSON text), a
  list of calls, or raw model text (hermes ``<tool_call>`` blocks, bare JSON, Llama-3.1 JSON).
- ``reference``: a call object or a list of calls.
- ``tools``: the list of OpenAI tool specs (or BFCL function docs).
- ``reference_alternatives`` (optional, default ``--alternatives``): true means every argument value
  of the reference is a LIST of acceptable values, ``""`` meaning 'may be left out'; the reference
  may then also be in BFCL's form ``[{"tool": {"param": [values]}}]``. Without it a list value is
  just a list.

OUT gets every input row, in order, with ``esm_score``, ``esm_components`` and ``esm_errors`` added.
A row that cannot be scored (missing field, bad tools, reference not a call, line not JSON) gets
``esm_score`` null and ``esm_errors`` ``["invalid_row: <reason>"]``; their count is printed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from ttpa_ray.esm.scorer import CATEGORIES, COMPONENTS, DEFAULT_WEIGHTS, ESMWeights
from ttpa_ray.esm.stage import (
    DETAIL_COLUMN,
    REASON_COLUMN,
    STATUS_COLUMN,
    InvalidRecord,
    score_row,
    score_table,
)

FIELDS: Final[tuple[str, ...]] = ("candidate", "reference", "tools")
ALTERNATIVES_FIELD: Final = "reference_alternatives"
_JSONL_SUFFIXES: Final = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES: Final = {".parquet", ".pq"}

console = Console()


class _Summary:
    """Running totals for the printed table."""

    def __init__(self) -> None:
        self.rows = 0
        self.scored = 0
        self.score_sum = 0.0
        self.component_sums = dict.fromkeys(COMPONENTS, 0.0)
        self.categories: Counter[str] = Counter()
        self.invalid: Counter[str] = Counter()

    def add(self, score: float | None, components: dict[str, float] | None, errors: list[str]) -> None:
        self.rows += 1
        if score is None:
            self.invalid[errors[0].removeprefix("invalid_row: ") if errors else "unknown"] += 1
            return
        self.scored += 1
        self.score_sum += score
        for name in COMPONENTS:
            self.component_sums[name] += (components or {}).get(name, 0.0)
        self.categories.update(set(errors))

    def table(self, title: str) -> Table:
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        n = max(self.scored, 1)
        table.add_row("rows", str(self.rows))
        table.add_row("scored", str(self.scored))
        table.add_row("invalid rows", str(self.rows - self.scored))
        table.add_row("[bold]mean esm_score[/bold]", f"[bold]{self.score_sum / n:.4f}[/bold]")
        for name in COMPONENTS:
            table.add_row(f"mean {name}", f"{self.component_sums[name] / n:.4f}")
        for category in CATEGORIES:
            table.add_row(f"rate {category}", f"{self.categories[category] / n:.2%}")
        return table


def _weights(config: Path | None, weights: str | None) -> ESMWeights:
    if weights is not None:
        try:
            values = [float(v) for v in weights.replace("/", ",").split(",")]
            return ESMWeights(*values)
        except (TypeError, ValueError) as exc:
            raise typer.BadParameter(
                f"--weights wants five numbers name,required,key,value_type,value (e.g. 3,3,1,2,2): {exc}"
            ) from None
    if config is not None:
        from ttpa_ray.config import ConfigError, load_config

        try:
            return ESMWeights.from_config(load_config(config, []).esm.weights)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
    return DEFAULT_WEIGHTS


def _score_row(row: Any, alternatives: bool, weights: ESMWeights) -> dict[str, Any]:
    if not isinstance(row, dict):
        return {"_row": row, **_invalid("not_an_object")}
    missing = [f for f in FIELDS if f not in row]
    if missing:
        return {**row, **_invalid("missing_column")}
    try:
        result = score_row(
            row["candidate"],
            row["reference"],
            row["tools"],
            reference_alternatives=alternatives
            if row.get(ALTERNATIVES_FIELD) is None
            else row[ALTERNATIVES_FIELD],
            weights=weights,
        )
    except InvalidRecord as exc:
        return {**row, **_invalid(exc.reason)}
    return {
        **row,
        "esm_score": result.score,
        "esm_components": dict(result.components),
        "esm_errors": list(result.errors),
    }


def _invalid(reason: str) -> dict[str, Any]:
    return {"esm_score": None, "esm_components": None, "esm_errors": [f"invalid_row: {reason}"]}


def _score_jsonl(
    source: Path, target: Path, alternatives: bool, weights: ESMWeights, summary: _Summary
) -> None:
    with source.open(encoding="utf-8") as reader, target.open("w", encoding="utf-8") as writer:
        for line in reader:
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError:
                out = {"_raw_line": line.rstrip("\n"), **_invalid("invalid_json")}
            else:
                out = _score_row(row, alternatives, weights)
            summary.add(out["esm_score"], out["esm_components"], out["esm_errors"])
            writer.write(json.dumps(out, ensure_ascii=False) + "\n")


def _score_parquet(
    source: Path, target: Path, alternatives: bool, weights: ESMWeights, summary: _Summary
) -> None:
    table = pq.read_table(source)
    added_alternatives = ALTERNATIVES_FIELD not in table.column_names
    if added_alternatives:
        table = table.append_column(ALTERNATIVES_FIELD, pa.array([alternatives] * table.num_rows, pa.bool_()))
    elif pa.types.is_boolean(table.schema.field(ALTERNATIVES_FIELD).type):
        position = table.column_names.index(ALTERNATIVES_FIELD)
        filled = pc.fill_null(table.column(ALTERNATIVES_FIELD), alternatives)
        table = table.set_column(position, ALTERNATIVES_FIELD, filled)
    scored = score_table(table, weights=weights)
    reasons = scored.column(REASON_COLUMN).to_pylist()
    errors = scored.column("esm_errors").to_pylist()
    errors = [e if r is None else [f"invalid_row: {r}"] for e, r in zip(errors, reasons, strict=True)]
    drop = [STATUS_COLUMN, REASON_COLUMN, DETAIL_COLUMN, "esm_errors"]
    if added_alternatives:
        drop.append(ALTERNATIVES_FIELD)
    out = scored.drop_columns(drop).append_column("esm_errors", pa.array(errors, pa.list_(pa.string())))
    for score, components, row_errors in zip(
        out.column("esm_score").to_pylist(), out.column("esm_components").to_pylist(), errors, strict=True
    ):
        summary.add(score, dict(components) if components is not None else None, row_errors)
    pq.write_table(out, target)


def _format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    return None


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
    """Score every row of FILE with ESM; write them all to OUT and print mean score and error rates."""
    kind = _format(file)
    if kind is None:
        console.print(f"[red]{file}: unknown format; use .jsonl/.json/.ndjson or .parquet/.pq[/red]")
        raise typer.Exit(2)
    if not file.is_file():
        console.print(f"[red]{file}: no such file[/red]")
        raise typer.Exit(2)
    out_kind = _format(out)
    if out_kind is not None and out_kind != kind:
        console.print(f"[red]--out {out}: write the same format as the input ({kind})[/red]")
        raise typer.Exit(2)
    chosen = _weights(config, weights)
    summary = _Summary()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        if kind == "jsonl":
            _score_jsonl(file, partial, alternatives, chosen, summary)
        else:
            _score_parquet(file, partial, alternatives, chosen, summary)
    except (OSError, pa.ArrowInvalid) as exc:
        partial.unlink(missing_ok=True)
        console.print(f"[red]{file}: cannot be read as {kind} ({exc})[/red]")
        raise typer.Exit(2) from None
    partial.replace(out)
    console.print(summary.table(f"ESM of {file.name}"))
    invalid = summary.rows - summary.scored
    if invalid:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary.invalid.most_common())
        console.print(f"[yellow]{invalid} invalid rows written with esm_score null ({reasons})[/yellow]")
    console.print(f"{summary.rows} rows written to {out}")
