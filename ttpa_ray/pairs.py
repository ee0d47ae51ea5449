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

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from ttpa_ray import store
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
    pack,
    reject,
    to_table,
    unpack,
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
) -> tuple[list[PreferencePair], list[ScoredCandidate], RejectedRow | None]:
    """Score one turn's candidates and apply the pair rule; bad tools or reference reject the turn."""
    try:
        scored, reference_score = score_candidates(turn, candidates, ESMWeights.from_config(esm.weights))
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
    """What the pairs stage did: turns in, turns paired, pairs, rejected rows, where it wrote."""

    turns: int = 0
    without_turns: int = 0  # dialogues the sample stage rejected before they became turns
    turns_paired: int = 0
    pairs: int = 0
    rejected: int = 0  # rows of rejected.parquet: turns without a pair + dialogues without turns
    single_field_share: float = 0.0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def _unpacked(table: pa.Table, kind: str, cls: type) -> list[Any]:
    return from_table(cls, unpack(table, kind, cls.SCHEMA), source=kind)  # type: ignore[attr-defined]


_INPUTS: Final = {"turn": Turn.SCHEMA, "candidate": Candidate.SCHEMA}
_OUTPUTS: Final = {
    "pair": PreferencePair.SCHEMA,
    "scored": ScoredCandidate.SCHEMA,
    "rejected": RejectedRow.SCHEMA,
}


class LabelTurns:
    """A stateless ESM scorer actor: one turn's row and its candidates' rows in (a group of the
    stage's dataset), its pairs, scored candidates or rejected row out (:func:`label_turn`)."""

    def __init__(self, esm: ESMConfig) -> None:
        self.esm = esm

    def __call__(self, group: pa.Table) -> pa.Table:
        turns = _unpacked(group, "turn", Turn)
        candidates = _unpacked(group, "candidate", Candidate)
        if len(turns) != 1:
            raise ValueError(
                f"turn {group.column('turn_id')[0]}: {len(turns)} rows in turns.parquet for "
                f"{len(candidates)} candidates (one expected)"
            )
        pairs: list[PreferencePair] = []
        scored: list[ScoredCandidate] = []
        rejected: RejectedRow | None = None
        if candidates:  # else the sample stage wrote this turn's rejection
            pairs, scored, rejected = label_turn(turns[0], candidates, self.esm)
        lost = [rejected] if rejected else []
        out = pack(
            {
                "pair": to_table(pairs, PreferencePair),
                "scored": to_table(scored, ScoredCandidate),
                "rejected": to_table(lost, RejectedRow).append_column(
                    "turn_id", pa.array([turns[0].turn_id] * len(lost), pa.string())
                ),
            },
            _OUTPUTS,
            key="turn_id",
        )
        # Per pair: whether it differs in one field, and whether it is its turn's first (summed later).
        others = [0] * (out.num_rows - len(pairs))
        single = [int(single_field_share([p]) == 1.0) for p in pairs]
        first = [int(i == 0) for i in range(len(pairs))]
        return out.append_column("single_field", pa.array(single + others, pa.int64())).append_column(
            "first_pair", pa.array(first + others, pa.int64())
        )


def run_pairs_stage(config: TTPAConfig, sample_dir: str | Path, out_dir: str | Path) -> PairsReport:
    """The sample stage's files -> pairs, in Ray Data: turns and candidates are grouped by turn and
    each group is labelled by :class:`LabelTurns` actors (``esm.scorers``: min, max); the driver
    gets counts only. Ray must be initialised.

    Folders: ``pairs.parquet`` (PreferencePair, a TRL conversational preference dataset),
    ``scored.parquet`` (ScoredCandidate), ``rejected.parquet`` (RejectedRow: every turn without a pair
    and the sample stage's rejections). Raises FileNotFoundError naming a missing input and
    ValueError when the turns do not add up (turns = paired + rejected).
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray.data
    from ray.data.expressions import col

    start = time.perf_counter()
    source, out = Path(sample_dir), Path(out_dir)
    for name in ("turns", "candidates", "rejected"):
        if not (source / f"{name}.parquet").exists():
            raise FileNotFoundError(f"{source / f'{name}.parquet'} not found: run `ttpa sample` first")
    without_candidates = source / "rejected.parquet" / "turns-without-candidates.parquet"
    earlier_turns = pq.ParquetFile(without_candidates).metadata.num_rows if without_candidates.exists() else 0
    report = PairsReport(turns=int(pads.dataset(source / "turns.parquet", format="parquet").count_rows()))
    earlier = store.dataset(source / "rejected.parquet")
    report.without_turns = earlier.count() - earlier_turns

    def packing(kind: str) -> Callable[[pa.Table], pa.Table]:
        return lambda batch: pack({kind: batch}, _INPUTS, key="turn_id")

    turns, candidates = (
        store.dataset(source / f"{name}.parquet").map_batches(packing(kind), batch_format="pyarrow")
        for name, kind in (("turns", "turn"), ("candidates", "candidate"))
    )
    low, high = config.esm.scorers
    labelled = (
        turns.union(candidates)
        .groupby(
            "turn_id",
            num_partitions=store.partitions(source / "turns.parquet", source / "candidates.parquet"),
        )
        .map_groups(
            LabelTurns,
            fn_constructor_kwargs={"esm": config.esm},
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            batch_format="pyarrow",
            num_cpus=1,
        )
        .materialize()  # labelled once; each output reads it
        if report.turns
        else None
    )

    labelled_rows = labelled.count() if labelled is not None else 0

    def only(kind: str, cls: type) -> ray.data.Dataset:
        def records(batch: pa.Table) -> pa.Table:
            return unpack(batch, kind, cls.SCHEMA)  # type: ignore[attr-defined]

        if labelled is None or not labelled_rows:
            return ray.data.from_arrow(to_table([], cls))
        return labelled.filter(expr=col(kind).is_not_null()).map_batches(records, batch_format="pyarrow")

    paths = {name: out / f"{name}.parquet" for name in ("pairs", "scored", "rejected")}
    report.pairs = store.write_folder(
        only("pair", PreferencePair), paths["pairs"], to_table([], PreferencePair)
    )
    store.write_folder(only("scored", ScoredCandidate), paths["scored"], to_table([], ScoredCandidate))
    report.rejected = store.write_folder(
        only("rejected", RejectedRow).union(earlier.select_columns(RejectedRow.SCHEMA.names)),
        paths["rejected"],
        to_table([], RejectedRow),
    )
    rejected_here = report.rejected - report.without_turns - earlier_turns
    if report.pairs and labelled is not None:
        # summed as they stream by (an aggregation would start shuffle actors for two numbers)
        for batch in labelled.select_columns(["first_pair", "single_field"]).iter_batches(
            batch_format="pyarrow"
        ):
            report.turns_paired += pc.sum(batch.column("first_pair")).as_py() or 0
            single = pc.sum(batch.column("single_field")).as_py() or 0
            report.single_field_share += single / report.pairs
    if report.turns != report.turns_paired + rejected_here + earlier_turns:
        raise ValueError(
            f"{source}: {report.turns} turns, but {report.turns_paired} paired + {rejected_here} "
            f"rejected here + {earlier_turns} rejected by the sample stage"
        )
    if report.rejected:
        report.reasons = store.reasons(paths["rejected"])
    report.seconds = time.perf_counter() - start
    report.outputs = {k: str(v) for k, v in paths.items()}
    return report
