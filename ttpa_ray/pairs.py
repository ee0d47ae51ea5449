"""ESM-labelled preference pairs (docs/design.md section 5): scored candidates -> TRL pairs.

Pure core, per turn:

- :func:`score_candidates`: ESM of every candidate against the turn's reference call(s).
- :func:`pairs_for_turn`, the pair rule of the reference code: if the best candidate scores at least
  ``chosen_threshold`` (0.8), chosen = that candidate and rejected = every candidate scoring lower;
  otherwise chosen = the reference y* and rejected = every candidate scoring lower than y* (all of
  them, since y* scores 1). Each pair keeps the rejected side's branch position and diverging token,
  both ESM scores, the rejected call's error categories and the policy log-prob of both sides.
  A turn with no pair becomes a rejected row with the reason.

The output table is a TRL conversational preference dataset (``prompt``/``chosen``/``rejected`` message
lists, tool calls as messages, a per-row ``tools`` column) plus metadata columns: see
:class:`ttpa_ray.records.PreferencePair`. Invariant: turns in = turns with a pair + rejected turns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from ttpa_ray.codec import ToolCall
from ttpa_ray.config import ESMConfig, TTPAConfig
from ttpa_ray.esm.scorer import DEFAULT_WEIGHTS, ESMWeights, SchemaError, prepare_tools, score
from ttpa_ray.records import (
    Candidate,
    Message,
    PreferencePair,
    RejectedRow,
    ScoredCandidate,
    Turn,
    from_table,
    reject,
)
from ttpa_ray.tps import TurnSample

STAGE: Final = "pairs"


def _target(candidate: Candidate) -> Any:
    # Parsed calls when there are any; otherwise the text, which ESM reads as a parse failure.
    return list(candidate.calls) if candidate.calls and candidate.parse_error is None else candidate.raw_text


def score_candidates(
    turn: Turn, candidates: Sequence[Candidate], weights: ESMWeights = DEFAULT_WEIGHTS
) -> tuple[list[ScoredCandidate], float]:
    """ESM of each candidate against the turn's reference, and the reference's own score (normally 1).

    Raises :class:`~ttpa_ray.esm.scorer.SchemaError` for unusable tool schemas and ValueError for a
    reference that is not a call.
    """
    index = prepare_tools([t.to_openai() for t in turn.tools])
    reference = list(turn.reference_calls)
    scored = []
    for candidate in candidates:
        result = score(_target(candidate), reference, index, weights)
        scored.append(
            ScoredCandidate(
                candidate=candidate,
                esm_score=result.score,
                esm_components=dict(result.components),
                esm_errors=result.errors,
            )
        )
    reference_score = score(reference, reference, index, weights).score
    return scored, reference_score


def completion_message(candidate: Candidate) -> Message:
    """The assistant message of a candidate: its calls, or its raw text when it does not parse."""
    if candidate.calls and candidate.parse_error is None:
        return Message(role="assistant", tool_calls=candidate.calls)
    return Message(role="assistant", content=candidate.raw_text)


def pairs_for_turn(
    turn: Turn,
    scored: Sequence[ScoredCandidate],
    reference_score: float,
    *,
    chosen_threshold: float = 0.8,
) -> tuple[list[PreferencePair], RejectedRow | None]:
    """Pairs of one turn by the pair rule (module docstring), or a rejected row with the reason.

    The pairs' log-probs are the candidates' own: ``sequence_logprob`` of a candidate side,
    ``reference_logprob`` (the policy log-prob of y*, the same on every candidate of the turn) of a
    reference side.
    """
    if not scored:
        return [], reject(turn.turn_id, STAGE, "no_candidates", "the sampler produced no candidate", turn)
    # max() keeps the first of equal scores: the earliest branch, so runs are reproducible.
    best = max(scored, key=lambda s: s.esm_score)
    if best.esm_score >= chosen_threshold:
        chosen_message = completion_message(best.candidate)
        chosen_score = best.esm_score
        chosen_source = "candidate"
        chosen_logprob = best.candidate.sequence_logprob
    else:
        chosen_message = Message(role="assistant", tool_calls=turn.reference_calls)
        chosen_score = reference_score
        chosen_source = "reference"
        chosen_logprob = next(
            (s.candidate.reference_logprob for s in scored if s.candidate.reference_logprob is not None), None
        )
    pairs = []
    for item in scored:
        if item.esm_score >= chosen_score:
            continue
        candidate = item.candidate
        pairs.append(
            PreferencePair(
                pair_id=f"{candidate.candidate_id}/pair",
                turn_id=turn.turn_id,
                prompt=turn.context,
                chosen=(chosen_message,),
                rejected=(completion_message(candidate),),
                tools=turn.tools,
                chosen_score=chosen_score,
                rejected_score=item.esm_score,
                rejected_errors=item.esm_errors,
                branch_position=candidate.branch_position,
                branch_token=candidate.branch_token,
                chosen_source=chosen_source,
                chosen_logprob=chosen_logprob,
                rejected_logprob=candidate.sequence_logprob,
            )
        )
    if not pairs:
        detail = f"every candidate scores {chosen_score:.3f} like the chosen side ({chosen_source})"
        return [], reject(turn.turn_id, STAGE, "no_lower_candidate", detail, turn)
    return pairs, None


@dataclass
class PairsResult:
    """Pairs, scored candidates and rejected turns of a set of turns."""

    pairs: list[PreferencePair] = field(default_factory=list)
    scored: list[ScoredCandidate] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    turns_in: int = 0

    @property
    def turns_paired(self) -> int:
        """Turns with at least one pair."""
        return len({p.turn_id for p in self.pairs})

    @property
    def balanced(self) -> bool:
        """Every input turn is paired or rejected, never both."""
        rejected_ids = {r.input_id for r in self.rejected}
        paired_ids = {p.turn_id for p in self.pairs}
        return not (rejected_ids & paired_ids) and self.turns_in == len(paired_ids) + len(rejected_ids)


def label_turn(
    turn: Turn,
    candidates: Sequence[Candidate],
    esm: ESMConfig,
    *,
    labels: Mapping[str, ScoredCandidate] | None = None,
) -> tuple[list[PreferencePair], list[ScoredCandidate], RejectedRow | None]:
    """Score one turn's candidates and apply the pair rule; bad tools or reference reject the turn.

    ``labels`` (candidate_id -> ScoredCandidate, e.g. from the ESM Ray stage) replaces scoring here;
    the reference's own score is still computed here (one call per turn).
    """
    weights = ESMWeights.from_config(esm.weights)
    try:
        if labels is not None:
            scored = [labels[c.candidate_id] for c in candidates]
            reference = list(turn.reference_calls)
            tools = prepare_tools([t.to_openai() for t in turn.tools])
            reference_score = score(reference, reference, tools, weights).score
        else:
            scored, reference_score = score_candidates(turn, candidates, weights)
    except SchemaError as exc:
        return [], [], reject(turn.turn_id, STAGE, "invalid_tools", str(exc), turn)
    except ValueError as exc:
        return [], [], reject(turn.turn_id, STAGE, "invalid_reference", str(exc), turn)
    pairs, rejected = pairs_for_turn(turn, scored, reference_score, chosen_threshold=esm.chosen_threshold)
    return pairs, scored, rejected


def pairs_from_samples(samples: Iterable[TurnSample], esm: ESMConfig) -> PairsResult:
    """Pairs of sampler output (in memory); a turn the sampler rejected keeps the sampler's reason."""
    result = PairsResult()
    for sample in samples:
        result.turns_in += 1
        if sample.rejected is not None:
            result.rejected.append(sample.rejected)
            continue
        pairs, scored, rejected = label_turn(sample.turn, sample.candidates, esm)
        result.pairs.extend(pairs)
        result.scored.extend(scored)
        if rejected is not None:
            result.rejected.append(rejected)
    return result


def pairs_from_tables(
    turns: pa.Table,
    candidates: pa.Table,
    sampler_rejected: Sequence[RejectedRow],
    esm: ESMConfig,
    *,
    labels: Mapping[str, ScoredCandidate] | None = None,
    label_rejections: Mapping[str, RejectedRow] | None = None,
) -> PairsResult:
    """Pairs from the sample stage's files: Turn table, candidate table, rejected rows.

    A turn without candidates keeps the sampler's rejection reason when there is one. ``labels`` and
    ``label_rejections`` (by candidate_id) come from :func:`label_with_esm_stage`; without them the
    candidates are scored here with the pure scorer.
    """
    turn_records = from_table(Turn, turns, source="turns")
    cands = from_table(Candidate, candidates, source="candidates")
    by_turn: dict[str, list[Candidate]] = {}
    for candidate in cands:
        by_turn.setdefault(candidate.turn_id, []).append(candidate)
    earlier = {r.input_id: r for r in sampler_rejected}
    failed = label_rejections or {}
    result = PairsResult()
    for turn in turn_records:
        result.turns_in += 1
        mine = by_turn.get(turn.turn_id, [])
        if not mine and turn.turn_id in earlier:
            result.rejected.append(earlier[turn.turn_id])
            continue
        unscorable = [failed[c.candidate_id] for c in mine if c.candidate_id in failed]
        if unscorable:
            first = unscorable[0]
            result.rejected.append(reject(turn.turn_id, STAGE, first.reason, first.detail, turn))
            continue
        pairs, scored, rejected = label_turn(turn, mine, esm, labels=labels)
        result.pairs.extend(pairs)
        result.scored.extend(scored)
        if rejected is not None:
            result.rejected.append(rejected)
    return result


def esm_input_table(turns: pa.Table, candidates: pa.Table) -> pa.Table:
    """The ESM stage's input: candidate_id, candidate (calls JSON or raw text), reference, tools (JSON)."""
    by_turn = {t.turn_id: t for t in from_table(Turn, turns, source="turns")}
    rows = []
    for candidate in from_table(Candidate, candidates, source="candidates"):
        turn = by_turn[candidate.turn_id]
        target = _target(candidate)
        rows.append(
            {
                "candidate_id": candidate.candidate_id,
                "candidate": target if isinstance(target, str) else _dumps([c.to_dict() for c in target]),
                "reference": _dumps([c.to_dict() for c in turn.reference_calls]),
                "tools": _dumps([t.to_openai() for t in turn.tools]),
            }
        )
    schema = pa.schema([(name, pa.string()) for name in ("candidate_id", "candidate", "reference", "tools")])
    return pa.Table.from_pylist(rows, schema=schema)


def label_with_esm_stage(
    turns: pa.Table, candidates: pa.Table, esm: ESMConfig
) -> tuple[dict[str, ScoredCandidate], dict[str, RejectedRow]]:
    """ESM labels from the stateless scorer actors (:func:`ttpa_ray.esm.stage.score_dataset`).

    Returns candidate_id -> ScoredCandidate, and candidate_id -> the ESM stage's rejected row for
    candidates it could not score (bad tools or reference). Ray must be initialised.
    """
    import ray

    from ttpa_ray.esm.stage import score_dataset

    cands = {c.candidate_id: c for c in from_table(Candidate, candidates, source="candidates")}
    table = esm_input_table(turns, candidates)
    if table.num_rows == 0:
        return {}, {}
    scored, rejected = score_dataset(
        ray.data.from_arrow(table),
        id_column="candidate_id",
        weights=ESMWeights.from_config(esm.weights),
        scorers=esm.scorers,
    )
    labels: dict[str, ScoredCandidate] = {}
    for row in scored.iter_rows():
        labels[row["candidate_id"]] = ScoredCandidate(
            candidate=cands[row["candidate_id"]],
            esm_score=float(row["esm_score"]),
            esm_components={str(k): float(v) for k, v in _pairs_of(row["esm_components"])},
            esm_errors=tuple(row["esm_errors"]),
        )
    rejections = {row["input_id"]: RejectedRow.from_row(row) for row in rejected.iter_rows()}
    return labels, rejections


def _pairs_of(value: Any) -> list[tuple[Any, Any]]:
    # Arrow maps come back as a dict, a list of (key, value) tuples or of {"key", "value"} dicts.
    if isinstance(value, Mapping):
        return list(value.items())
    return [(p["key"], p["value"]) if isinstance(p, Mapping) else (p[0], p[1]) for p in value]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------ analysis


def differing_fields(chosen: Sequence[ToolCall], rejected: Sequence[ToolCall]) -> int | None:
    """How many fields two single-call turns differ in: the name, each key, each shared key's value.

    A renamed key counts once. None when either side is not exactly one parsed call.
    """
    if len(chosen) != 1 or len(rejected) != 1:
        return None
    a, b = chosen[0], rejected[0]
    count = int(a.name != b.name)
    missing = set(a.arguments) - set(b.arguments)
    extra = set(b.arguments) - set(a.arguments)
    count += max(len(missing), len(extra))
    count += sum(
        1
        for key in set(a.arguments) & set(b.arguments)
        if _canonical(a.arguments[key]) != _canonical(b.arguments[key])
    )
    return count


def _canonical(value: Any) -> Any:
    from ttpa_ray.codec import canonical

    return canonical(ToolCall("v", {"v": value}))


def single_field_share(pairs: Sequence[PreferencePair]) -> float:
    """Share of pairs whose chosen and rejected calls differ in exactly one field (name, key or value)."""
    if not pairs:
        return 0.0
    hits = sum(1 for p in pairs if differing_fields(p.chosen[-1].tool_calls, p.rejected[-1].tool_calls) == 1)
    return hits / len(pairs)


# ------------------------------------------------------------------------------------------ stage


@dataclass
class PairsReport:
    """What the pairs stage did: turns in, turns paired, pairs, rejected turns, where it wrote."""

    turns: int = 0
    turns_paired: int = 0
    pairs: int = 0
    rejected: int = 0  # rows of rejected.parquet: turns without a pair + dialogues without turns
    single_field_share: float = 0.0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def run_pairs_stage(config: TTPAConfig, sample_dir: str | Path, out_dir: str | Path) -> PairsReport:
    """Read the sample stage's files, label with the ESM Ray stage, apply the pair rule, write Parquet.

    Ray must be initialised (the scorer actors run there).

    Files: ``pairs.parquet`` (PreferencePair, a TRL conversational preference dataset),
    ``scored.parquet`` (ScoredCandidate), ``rejected.parquet`` (RejectedRow, every turn without a pair,
    the sampler's rejections included). Raises FileNotFoundError naming a missing input.
    """
    import time

    import pyarrow.parquet as pq

    from ttpa_ray.records import read_parquet, write_parquet

    start = time.perf_counter()
    source = Path(sample_dir)
    for name in ("turns", "candidates", "rejected"):
        if not (source / f"{name}.parquet").exists():
            raise FileNotFoundError(f"{source / f'{name}.parquet'} not found: run `ttpa sample` first")
    earlier = read_parquet(RejectedRow, source / "rejected.parquet")
    turns = pq.read_table(source / "turns.parquet")
    candidates = pq.read_table(source / "candidates.parquet")
    labels, label_rejections = label_with_esm_stage(turns, candidates, config.esm)
    result = pairs_from_tables(
        turns, candidates, earlier, config.esm, labels=labels, label_rejections=label_rejections
    )
    # Dialogues that never became turns stay rejected here too: nothing disappears between stages.
    turn_ids = set(turns.column("turn_id").to_pylist())
    rejected = [r for r in earlier if r.input_id not in turn_ids]
    out = Path(out_dir)
    paths = {
        "pairs": write_parquet(result.pairs, out / "pairs.parquet", PreferencePair),
        "scored": write_parquet(result.scored, out / "scored.parquet", ScoredCandidate),
        "rejected": write_parquet([*rejected, *result.rejected], out / "rejected.parquet", RejectedRow),
    }
    report = PairsReport(
        turns=result.turns_in,
        turns_paired=result.turns_paired,
        pairs=len(result.pairs),
        rejected=len(rejected) + len(result.rejected),
        single_field_share=single_field_share(result.pairs),
        seconds=time.perf_counter() - start,
        outputs={k: str(v) for k, v in paths.items()},
    )
    for row in [*rejected, *result.rejected]:
        report.reasons[row.reason] = report.reasons.get(row.reason, 0) + 1
    return report
