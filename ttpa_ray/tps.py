"""Token-level preference sampling (TPS, docs/design.md section 3): dialogues -> turns -> candidates.

The pure core runs over an :class:`~ttpa_ray.engine.Engine` (tests drive it without Ray):

- :func:`turns_from_dialogues`: every assistant tool-call turn becomes a :class:`~ttpa_ray.records.Turn`
  (context before it, tools, reference calls y*); a dialogue without one is a rejected row.
- :class:`TokenLevelSampler`: one teacher-forced pass of prompt + y* through the POLICY with
  ``prompt_logprobs=top_k``; branch points are reference positions inside the name, key and value
  spans of the call (the codec's span map), ranked by the mass the policy puts off the reference
  token, at most ``max_branches`` above ``tau``; one continuation per (branch point, alternative
  token) is decoded from the branched prefix (prefix caching serves the shared context).
- :class:`SequenceSampler`: the reference code's baseline, ``num_samples`` full samples per turn.

Both return one :class:`TurnSample` per turn: its candidates (parsed, deduplicated by canonical form),
the policy log-prob of each whole candidate and of y*, the tokens generated, or the reason the turn
gave nothing. :class:`SamplerReplica` is the thin Ray Data shell (``map_batches`` over Turn rows).

Log-probs are sums over completion tokens (y* includes the end token), the policy's own numbers at
sampling time; each candidate carries its own (``sequence_logprob``) and its turn's reference's
(``reference_logprob``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from ttpa_ray import store
from ttpa_ray.codec import ParseResult, canonical_calls, parse_any, render_with_spans, token_spans
from ttpa_ray.config import TPSConfig, TTPAConfig, VLLMConfig
from ttpa_ray.records import (
    Candidate,
    Dialogue,
    Message,
    RejectedRow,
    Turn,
    batch_from_rows,
    conversation_problem,
    reject,
    rows_from_batch,
)

if TYPE_CHECKING:
    import ray.data

    from ttpa_ray.engine import Engine

STAGE: Final = "tps"
SPAN_KINDS: Final = frozenset({"name", "key", "value"})
# The sampler's own count beside the Candidate columns: tokens decoded for the row's candidate.
GENERATED_TOKENS: Final = pa.field("generated_tokens", pa.int64())
STATUS_COLUMN: Final = "_ttpa_status"
REASON_COLUMN: Final = "_ttpa_reason"
DETAIL_COLUMN: Final = "_ttpa_detail"
PAYLOAD_COLUMN: Final = "_ttpa_payload"
SAMPLE_SCHEMA: Final = pa.schema(
    [
        *Candidate.SCHEMA,
        GENERATED_TOKENS,
        pa.field(STATUS_COLUMN, pa.string()),
        pa.field(REASON_COLUMN, pa.string()),
        pa.field(DETAIL_COLUMN, pa.string()),
        pa.field(PAYLOAD_COLUMN, pa.string()),
    ],
    metadata=Candidate.SCHEMA.metadata,
)


# ------------------------------------------------------------------------------------------- turns


def turns_from_dialogue(dialogue: Dialogue) -> list[Turn]:
    """Every assistant message with tool calls becomes a Turn: context = the messages before it.

    ``turn_index`` counts tool-call turns from 0; ``turn_id`` is ``"<dialogue_id>/<turn_index>"``.
    """
    turns: list[Turn] = []
    for position, message in enumerate(dialogue.messages):
        if message.role != "assistant" or not message.tool_calls:
            continue
        index = len(turns)
        turns.append(
            Turn(
                turn_id=f"{dialogue.dialogue_id}/{index}",
                dialogue_id=dialogue.dialogue_id,
                turn_index=index,
                context=dialogue.messages[:position],
                tools=dialogue.tools,
                reference_calls=message.tool_calls,
            )
        )
    return turns


def turns_from_dialogues(dialogues: Iterable[Dialogue]) -> tuple[list[Turn], list[RejectedRow]]:
    """Turns of all dialogues; a dialogue that is not ``ok``, is not a valid conversation
    (:func:`~ttpa_ray.records.conversation_problem`) or has no tool-call turn is a rejected row."""
    turns: list[Turn] = []
    rejected: list[RejectedRow] = []
    for dialogue in dialogues:
        if dialogue.status != "ok":
            rejected.append(
                reject(
                    dialogue.dialogue_id, STAGE, "dialogue_not_ok", f"status {dialogue.status!r}", dialogue
                )
            )
            continue
        problem = conversation_problem(dialogue.messages)
        if problem is not None:
            rejected.append(reject(dialogue.dialogue_id, STAGE, "invalid_conversation", problem, dialogue))
            continue
        found = turns_from_dialogue(dialogue)
        if not found:
            rejected.append(
                reject(dialogue.dialogue_id, STAGE, "no_tool_call_turn", "no assistant tool calls", dialogue)
            )
        turns.extend(found)
    return turns, rejected


def bfcl_dialogues(
    category: str = "simple_python", limit: int | None = None, start: int = 0
) -> list[Dialogue]:
    """Dialogues from BFCL entries (first question turn + ground-truth calls), until reversed ones exist.

    Each is ``user question -> assistant tool calls`` with the entry's tools; a parallel entry gives one
    turn of several calls. Values are the first acceptable ground-truth value the schema admits.
    """
    from ttpa_ray.bfcl import load_entries
    from ttpa_ray.records import ToolSpec

    dialogues = []
    for entry in load_entries(category)[start : None if limit is None else start + limit]:
        index = entry.tool_index()
        messages = [Message.from_openai(m) for m in entry.question[0]]
        calls = tuple(entry.ground_truth_calls(index))
        dialogues.append(
            Dialogue(
                dialogue_id=f"bfcl/{entry.id}",
                seed_id=entry.id,
                messages=(*messages, Message(role="assistant", tool_calls=calls)),
                tools=tuple(ToolSpec.from_openai(t, source="bfcl") for t in entry.tools),
                provenance={"source": "bfcl", "category": category},
            )
        )
    return dialogues


# ---------------------------------------------------------------------------------- branch points


@dataclass(frozen=True)
class ReferenceTokens:
    """y* as the policy sees it: prompt ids, reference completion ids and the span positions in it."""

    prompt_ids: tuple[int, ...]
    reference_ids: tuple[int, ...]
    span_positions: tuple[int, ...]  # indices into reference_ids of tokens overlapping a name/key/value


@dataclass(frozen=True)
class BranchPoint:
    """A reference position where the policy would go elsewhere, with the alternatives to try."""

    position: int  # index into the reference completion ids
    reference_token_id: int
    reference_logprob: float
    off_mass: float  # 1 - p(reference token)
    alternatives: tuple[tuple[int, float], ...]  # (token id, log-prob), best first


class TurnError(ValueError):
    """A turn TPS cannot sample from; ``reason`` is the rejected row's reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _end_text(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "eos_token", None) or "<|im_end|>")


def reference_tokens(engine: Engine, turn: Turn) -> ReferenceTokens:
    """Prompt and reference ids of a turn; raises :class:`TurnError` when they do not tokenize as in chat.

    The reference completion is ``render_hermes(calls) + eos``; it must be exactly what the chat
    template renders after the generation prompt, or teacher forcing would score another text.
    """
    context = [m.to_openai() for m in turn.context]
    tools = [t.to_openai() for t in turn.tools]
    prompt = engine.render(context, tools)
    rendered = render_with_spans(turn.reference_calls, fmt="hermes")
    text = rendered.text + _end_text(engine.tokenizer)
    tokenizer: Any = engine.tokenizer  # a Hugging Face fast tokenizer: it gives char offsets
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    reference = list(encoded["input_ids"])
    full = engine.render(
        [*context, Message(role="assistant", tool_calls=turn.reference_calls).to_openai()],
        tools,
        add_generation_prompt=False,
    )
    if full[: len(prompt) + len(reference)] != prompt + reference:
        raise TurnError(
            "reference_tokenization_mismatch",
            "prompt + render_hermes(reference) does not tokenize as the chat template renders the turn "
            "(a chat template other than Qwen/Hermes tool calls?)",
        )
    per_span = token_spans(rendered.spans, encoded["offset_mapping"])
    positions = sorted(
        {
            t
            for span, toks in zip(rendered.spans, per_span, strict=True)
            if span.kind in SPAN_KINDS
            for t in toks
        }
    )
    return ReferenceTokens(tuple(prompt), tuple(reference), tuple(positions))


def choose_branch_points(
    position_logprobs: Sequence[Mapping[int, tuple[float, int]] | None],
    reference_ids: Sequence[int],
    span_positions: Iterable[int],
    *,
    top_k: int,
    max_branches: int,
    tau: float,
) -> list[BranchPoint]:
    """Branch points of one turn (pure): ranked by off-reference mass, at most ``max_branches`` above tau.

    ``position_logprobs[t]`` maps token id -> (log-prob, rank) at reference position ``t`` (vLLM's
    prompt log-probs: the actual token plus the top-k). Alternatives are the top-k tokens other than
    the reference token, best first; a position without any is skipped.
    """
    points = []
    for t in span_positions:
        dist = position_logprobs[t]
        if not dist:
            continue
        ref = int(reference_ids[t])
        ref_logprob = dist[ref][0] if ref in dist else -math.inf
        off_mass = 1.0 - math.exp(ref_logprob)
        if off_mass <= tau:
            continue
        alternatives = sorted(
            ((tok, lp) for tok, (lp, rank) in dist.items() if tok != ref and rank <= top_k),
            key=lambda item: -item[1],
        )
        if alternatives:
            points.append(BranchPoint(t, ref, ref_logprob, off_mass, tuple(alternatives)))
    # Ties keep text order so that runs are reproducible.
    points.sort(key=lambda p: (-p.off_mass, p.position))
    return sorted(points[:max_branches], key=lambda p: p.position)


# ---------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class TurnSample:
    """What a sampler made of one turn: candidates with policy log-probs, or the reason it made none."""

    turn: Turn
    candidates: tuple[Candidate, ...] = ()
    reference_logprob: float | None = None  # policy log-prob of y* (teacher-forced), TPS only
    generated_tokens: int = 0  # decoded by the engine for this turn (TPS: + 1 for the forced pass)
    candidate_tokens: tuple[int, ...] = ()  # generated tokens of each candidate (before dedupe)
    rejected: RejectedRow | None = None
    seconds: float = 0.0


@dataclass
class _Continuation:
    turn_index: int
    prompt: list[int]
    prefix: list[int]  # completion ids before the generated part
    base_logprob: float  # log-prob of prefix
    budget: int  # completion tokens allowed in all (prefix included)
    candidate: dict[str, Any] = field(default_factory=dict)  # Candidate fields known up front


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _generate(engine: Engine, prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> list[Any]:
    """Raw vLLM outputs (token ids, text, cumulative log-prob) for token-id prompts, in order."""
    from vllm.inputs import TokensPrompt

    if not prompts:
        return []
    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    with engine.alive():
        return list(engine.llm.generate(inputs, list(params), use_tqdm=False))


def _completion_text(engine: Engine, ids: Sequence[int]) -> str:
    eos = engine.tokenizer.eos_token_id
    ids = list(ids)
    if ids and ids[-1] == eos:
        ids = ids[:-1]  # the end token closes the turn; it is not part of the call text
    return str(engine.tokenizer.decode(ids, skip_special_tokens=False))


def _dedupe_key(parsed: ParseResult, text: str) -> str:
    return canonical_calls(parsed.calls) if parsed.ok else "unparsed:" + text


def _group_by_turn(continuations: Sequence[_Continuation]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for k, cont in enumerate(continuations):
        groups.setdefault(cont.turn_index, []).append(k)
    return groups


class _BaseSampler:
    name = "tps"

    def __init__(self, engine: Engine, config: TPSConfig, *, seed: int = 0) -> None:
        self.engine = engine
        self.config = config
        self.seed = seed
        self.max_model_len = engine.max_model_len

    def _finish(
        self,
        turn: Turn,
        continuations: Sequence[_Continuation],
        outputs: Sequence[Any],
        *,
        reference_logprob: float | None,
        extra_tokens: int,
        seconds: float,
    ) -> TurnSample:
        """Candidates of one turn from its decoded continuations: parse, dedupe, keep log-probs."""
        candidates: list[Candidate] = []
        per_candidate_tokens: list[int] = []
        seen: set[str] = set()
        generated = extra_tokens
        for cont, out in zip(continuations, outputs, strict=True):
            completion = out.outputs[0]
            new_ids = list(completion.token_ids)
            generated += len(new_ids)
            per_candidate_tokens.append(len(new_ids))
            ids = cont.prefix + new_ids
            text = _completion_text(self.engine, ids)
            parsed = parse_any(text)
            key = _dedupe_key(parsed, text)
            if key in seen:
                continue
            seen.add(key)
            cumulative = completion.cumulative_logprob
            logprob = cont.base_logprob + float(cumulative) if cumulative is not None else math.nan
            candidates.append(
                Candidate(
                    turn_id=turn.turn_id,
                    calls=parsed.calls if parsed.ok else (),
                    raw_text=text,
                    parse_error=parsed.error,
                    sampler=self.name,
                    completion_token_ids=tuple(ids),
                    sequence_logprob=None if math.isnan(logprob) else logprob,
                    reference_logprob=reference_logprob,
                    **cont.candidate,
                )
            )
        rejected = None
        if not candidates:
            rejected = reject(turn.turn_id, STAGE, "no_branch_point", self._no_candidate_detail(), turn)
        return TurnSample(
            turn=turn,
            candidates=tuple(candidates),
            reference_logprob=reference_logprob,
            generated_tokens=generated,
            candidate_tokens=tuple(per_candidate_tokens),
            rejected=rejected,
            seconds=seconds,
        )

    def _no_candidate_detail(self) -> str:
        tau = self.config.tau
        return f"no reference position inside a name/key/value span has off-reference mass > tau={tau}"

    def _continuation_params(self, seed: int, max_tokens: int) -> Any:
        sampled = self.config.continuation == "sampled" or self.name == "sequence"
        return self.engine.sampling_params(
            max_tokens=max(1, max_tokens),
            temperature=self.config.temperature if sampled else 0.0,
            seed=seed if sampled else None,
            logprobs=0,  # 0: the chosen token's log-prob only, for the candidate's sequence log-prob
        )


class TokenLevelSampler(_BaseSampler):
    """TPS over an engine serving the POLICY (see the module docstring)."""

    name = "tps"

    def sample(self, turns: Sequence[Turn]) -> list[TurnSample]:
        """Sample candidates for a batch of turns: one forced pass each, then all continuations at once."""
        start = time.perf_counter()
        cfg = self.config
        prepared: list[ReferenceTokens | TurnError] = []
        for turn in turns:
            try:
                ref = reference_tokens(self.engine, turn)
                if len(ref.prompt_ids) + cfg.max_tokens + 1 > self.max_model_len:
                    raise TurnError(
                        "prompt_too_long",
                        f"{len(ref.prompt_ids)} prompt tokens + max_tokens {cfg.max_tokens} exceed "
                        f"vllm.max_model_len {self.max_model_len}",
                    )
                prepared.append(ref)
            except TurnError as exc:
                prepared.append(exc)
        ok = [(i, r) for i, r in enumerate(prepared) if isinstance(r, ReferenceTokens)]
        forced_params = self.engine.sampling_params(max_tokens=1, prompt_logprobs=cfg.top_k)
        forced = _generate(
            self.engine,
            [list(r.prompt_ids) + list(r.reference_ids) for _, r in ok],
            [forced_params] * len(ok),
        )
        continuations: list[_Continuation] = []
        reference_logprobs: dict[int, float] = {}
        for (i, ref), out in zip(ok, forced, strict=True):
            n_prompt = len(ref.prompt_ids)
            dists: list[dict[int, tuple[float, int]] | None] = [
                None if d is None else {int(tok): (float(lp.logprob), int(lp.rank)) for tok, lp in d.items()}
                for d in out.prompt_logprobs[n_prompt:]
            ]
            token_logprobs = [
                (d[tok][0] if d is not None and tok in d else math.nan)
                for d, tok in zip(dists, ref.reference_ids, strict=True)
            ]
            reference_logprobs[i] = float(sum(token_logprobs))
            points = choose_branch_points(
                dists,
                ref.reference_ids,
                ref.span_positions,
                top_k=cfg.top_k,
                max_branches=cfg.max_branches,
                tau=cfg.tau,
            )
            turn = turns[i]
            for point in points:
                prefix_logprob = float(sum(token_logprobs[: point.position]))
                for token, logprob in point.alternatives:
                    prefix = [*ref.reference_ids[: point.position], token]
                    continuations.append(
                        _Continuation(
                            turn_index=i,
                            prompt=[*ref.prompt_ids, *prefix],
                            prefix=prefix,
                            base_logprob=prefix_logprob + logprob,
                            budget=max(cfg.max_tokens, len(ref.reference_ids)),
                            candidate={
                                "candidate_id": f"{turn.turn_id}/tps/{point.position}/{token}",
                                "branch_position": point.position,
                                "branch_token": self.engine.tokenizer.decode(
                                    [token], skip_special_tokens=False
                                ),
                                "branch_token_id": token,
                                "reference_token": self.engine.tokenizer.decode(
                                    [point.reference_token_id], skip_special_tokens=False
                                ),
                                "logprob": logprob,
                            },
                        )
                    )
        # A candidate is a completion of at most max_tokens tokens, as in the sequence sampler, but
        # never shorter than y* itself (a long reference must still be able to close its call).
        params = [
            self._continuation_params(_seed(self.seed, c.candidate["candidate_id"]), c.budget - len(c.prefix))
            for c in continuations
        ]
        outputs = _generate(self.engine, [c.prompt for c in continuations], params)
        by_turn = _group_by_turn(continuations)
        seconds = (time.perf_counter() - start) / max(1, len(turns))
        samples = []
        for i, turn in enumerate(turns):
            item = prepared[i]
            if isinstance(item, TurnError):
                rejected = reject(turn.turn_id, STAGE, item.reason, item.detail, turn)
                samples.append(TurnSample(turn=turn, rejected=rejected, seconds=seconds))
                continue
            mine = by_turn.get(i, [])
            samples.append(
                self._finish(
                    turn,
                    [continuations[k] for k in mine],
                    [outputs[k] for k in mine],
                    reference_logprob=reference_logprobs[i],
                    extra_tokens=1,  # the forced pass decodes one token
                    seconds=seconds,
                )
            )
        return samples


class SequenceSampler(_BaseSampler):
    """The baseline: ``num_samples`` full completions per turn at ``temperature``, from the prompt."""

    name = "sequence"

    def sample(self, turns: Sequence[Turn], num_samples: Sequence[int] | None = None) -> list[TurnSample]:
        """Sample each turn ``num_samples[i]`` times (default ``config.num_samples``), seeded per sample."""
        start = time.perf_counter()
        counts = list(num_samples) if num_samples is not None else [self.config.num_samples] * len(turns)
        continuations: list[_Continuation] = []
        errors: dict[int, TurnError] = {}
        for i, turn in enumerate(turns):
            prompt = self.engine.render(
                [m.to_openai() for m in turn.context], [t.to_openai() for t in turn.tools]
            )
            if len(prompt) + self.config.max_tokens + 1 > self.max_model_len:
                errors[i] = TurnError("prompt_too_long", f"{len(prompt)} prompt tokens + max_tokens exceed")
                continue
            for k in range(counts[i]):
                continuations.append(
                    _Continuation(
                        turn_index=i,
                        prompt=prompt,
                        prefix=[],
                        base_logprob=0.0,
                        budget=self.config.max_tokens,
                        candidate={"candidate_id": f"{turn.turn_id}/sequence/{k}"},
                    )
                )
        params = [
            self._continuation_params(_seed(self.seed, c.candidate["candidate_id"]), self.config.max_tokens)
            for c in continuations
        ]
        outputs = _generate(self.engine, [c.prompt for c in continuations], params)
        by_turn = _group_by_turn(continuations)
        seconds = (time.perf_counter() - start) / max(1, len(turns))
        samples = []
        for i, turn in enumerate(turns):
            if i in errors:
                rejected = reject(turn.turn_id, STAGE, errors[i].reason, errors[i].detail, turn)
                samples.append(TurnSample(turn=turn, rejected=rejected, seconds=seconds))
                continue
            mine = by_turn.get(i, [])
            samples.append(
                self._finish(
                    turn,
                    [continuations[k] for k in mine],
                    [outputs[k] for k in mine],
                    reference_logprob=None,
                    extra_tokens=0,
                    seconds=seconds,
                )
            )
        return samples

    def _no_candidate_detail(self) -> str:
        return "num_samples is 0 for this turn"


def make_sampler(engine: Engine, config: TPSConfig, *, seed: int = 0) -> TokenLevelSampler | SequenceSampler:
    """The sampler ``config.sampler`` names ("tps" or "sequence") over ``engine``."""
    if config.sampler == "sequence":
        return SequenceSampler(engine, config, seed=seed)
    return TokenLevelSampler(engine, config, seed=seed)


# ------------------------------------------------------------------------------------ Arrow rows


def sample_rows(samples: Iterable[TurnSample]) -> list[dict[str, Any]]:
    """Rows of :data:`SAMPLE_SCHEMA`: one per candidate (status ok) and one per rejected turn."""
    rows: list[dict[str, Any]] = []
    for sample in samples:
        if sample.rejected is not None:
            placeholder = Candidate(candidate_id=sample.turn.turn_id, turn_id=sample.turn.turn_id).to_row()
            rows.append(
                {
                    **placeholder,
                    "generated_tokens": sample.generated_tokens,
                    STATUS_COLUMN: "rejected",
                    REASON_COLUMN: sample.rejected.reason,
                    DETAIL_COLUMN: sample.rejected.detail,
                    PAYLOAD_COLUMN: sample.rejected.payload,
                }
            )
            continue
        for candidate in sample.candidates:
            rows.append(
                {
                    **candidate.to_row(),
                    "generated_tokens": len(candidate.completion_token_ids)
                    - (candidate.branch_position or 0)
                    - (1 if candidate.branch_position is not None else 0),
                    STATUS_COLUMN: "ok",
                    REASON_COLUMN: None,
                    DETAIL_COLUMN: None,
                    PAYLOAD_COLUMN: None,
                }
            )
    return rows


def sample_table(samples: Iterable[TurnSample]) -> pa.Table:
    """Arrow table of :func:`sample_rows` (what :class:`SamplerReplica` returns per batch)."""
    return batch_from_rows(sample_rows(samples), SAMPLE_SCHEMA)


def split_sample_table(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(candidates, rejected): Candidate columns (+ generated_tokens), and a RejectedRow table."""
    status = table.column(STATUS_COLUMN).to_pylist()
    keep = pa.array([s == "ok" for s in status])
    candidates = table.filter(keep).drop_columns(
        [STATUS_COLUMN, REASON_COLUMN, DETAIL_COLUMN, PAYLOAD_COLUMN]
    )
    rejected_rows = [
        RejectedRow(
            input_id=row["turn_id"],
            stage=STAGE,
            reason=row[REASON_COLUMN],
            detail=row[DETAIL_COLUMN] or "",
            payload=row[PAYLOAD_COLUMN] or "{}",
        ).to_row()
        for row in table.filter(pc.invert(keep)).to_pylist()
    ]
    return candidates, batch_from_rows(rejected_rows, RejectedRow.SCHEMA)


# --------------------------------------------------------------------------------------- Ray shell


class SamplerReplica:
    """One policy engine per Ray actor; a batch of Turn rows -> rows of :data:`SAMPLE_SCHEMA`."""

    def __init__(
        self,
        model: str,
        vllm_config: dict[str, Any],
        tps_config: dict[str, Any],
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        from ttpa_ray.engine import Engine

        engine = Engine(model, VLLMConfig.model_validate(vllm_config), dtype=dtype, seed=seed)
        self.sampler = make_sampler(engine, TPSConfig.model_validate(tps_config), seed=seed)

    def __call__(self, batch: Any) -> pa.Table:
        turns = [Turn.from_row(row) for row in rows_from_batch(batch)]
        return sample_table(self.sampler.sample(turns))


def sample_dataset(ds: ray.data.Dataset, model: str, config: TTPAConfig) -> ray.data.Dataset:
    """Map a dataset of Turn rows through policy replicas into :data:`SAMPLE_SCHEMA` rows.

    Split the (materialised) result with :func:`split_sample_table` or by the status column.
    """
    from ttpa_ray.replica import replica_pool
    from ttpa_ray.store import shared

    vllm = config.vllm
    return ds.map_batches(
        SamplerReplica,
        fn_constructor_kwargs={
            "model": shared(model),
            "vllm_config": vllm.model_dump(),
            "tps_config": config.tps.model_dump(),
            "dtype": config.model.dtype,
            "seed": config.run.seed,
        },
        batch_format="pyarrow",
        batch_size=vllm.batch_size,
        **replica_pool(vllm),
    )


# ------------------------------------------------------------------------------------------ stage


@dataclass
class SampleReport:
    """What the sample stage did: counts in and out, where it wrote, and how fast."""

    dialogues: int = 0
    turns: int = 0
    without_turns: int = 0  # dialogues rejected before they became turns
    turns_sampled: int = 0  # turns with at least one candidate
    candidates: int = 0
    rejected: int = 0  # dialogues without turns + turns without candidates
    generated_tokens: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """Dialogues from a Parquet file or a folder (its ``*.dialogues.parquet`` files, else ``*.parquet``)."""
    from ttpa_ray.records import read_parquet

    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.dialogues.parquet")) or sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no dialogue Parquet files under {path}: run `ttpa reverse` first")
        return [d for f in files for d in read_parquet(Dialogue, f)]
    if not path.exists():
        raise FileNotFoundError(f"dialogues {path} not found: run `ttpa reverse` first or pass --dialogues")
    return read_parquet(Dialogue, path)


def write_turns(dialogues: ray.data.Dataset, out_dir: Path) -> tuple[int, int]:
    """The turns of a dataset of dialogues, extracted and written by the cluster (Ray Data):
    ``turns.parquet`` (Turn rows) and ``rejected.parquet`` (the dialogues without a tool-call turn,
    :func:`turns_from_dialogues`), both folders. Returns (turns, dialogues rejected)."""
    from ttpa_ray.records import to_table

    def turns_of(batch: pa.Table) -> pa.Table:
        return to_table(turns_from_dialogues(Dialogue.from_row(r) for r in rows_from_batch(batch))[0], Turn)

    def without_turns(batch: pa.Table) -> pa.Table:
        rejected = turns_from_dialogues(Dialogue.from_row(r) for r in rows_from_batch(batch))[1]
        return to_table(rejected, RejectedRow)

    turns = store.write_folder(
        dialogues.map_batches(turns_of, batch_format="pyarrow"), out_dir / "turns.parquet", to_table([], Turn)
    )
    rejected = store.write_folder(
        dialogues.map_batches(without_turns, batch_format="pyarrow"),
        out_dir / "rejected.parquet",
        to_table([], RejectedRow),
    )
    return turns, rejected


def run_sample_stage(
    config: TTPAConfig,
    model: str,
    dialogues: ray.data.Dataset | Sequence[Dialogue],
    out_dir: str | Path,
    progress: Callable[[SampleReport], None] | None = None,
) -> SampleReport:
    """Dialogues -> turns -> candidates with policy replicas (Ray Data); writes Parquet to ``out_dir``.

    ``turns.parquet`` (Turn rows, a folder the cluster writes: the turns are extracted in Ray Data),
    ``candidates.parquet`` (Candidate + log-prob columns) and ``rejected.parquet`` (RejectedRow: the
    dialogues without a tool-call turn, a folder, and the turns without candidates, a file in it).
    The driver writes each sampled batch as it comes and keeps counts only. ``progress`` is called
    after every sampled batch (``report.turns`` is known by then). Ray must be initialised.
    """
    import pyarrow.parquet as pq
    import ray

    from ttpa_ray.records import to_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not isinstance(dialogues, ray.data.Dataset):
        dialogues = ray.data.from_arrow(to_table(list(dialogues), Dialogue))
    report = SampleReport(dialogues=dialogues.count())
    report.turns, report.without_turns = write_turns(dialogues, out)
    report.rejected = report.without_turns
    rejected_dir = out / "rejected.parquet"
    reasons: Counter[str] = Counter(store.reasons(rejected_dir))
    schema = pa.schema([*Candidate.SCHEMA, GENERATED_TOKENS], metadata=Candidate.SCHEMA.metadata)
    with (
        pq.ParquetWriter(out / "candidates.parquet", schema) as candidates_out,
        pq.ParquetWriter(
            rejected_dir / "turns-without-candidates.parquet", RejectedRow.SCHEMA
        ) as rejected_out,
    ):
        if report.turns:
            turns = store.dataset(out / "turns.parquet").repartition(
                max(1, math.ceil(report.turns / config.vllm.batch_size))
            )
            for batch in sample_dataset(turns, model, config).iter_batches(
                batch_format="pyarrow", batch_size=None
            ):
                candidates, rejected = split_sample_table(batch)
                candidates_out.write_table(candidates.select(schema.names).cast(schema))
                rejected_out.write_table(rejected.cast(RejectedRow.SCHEMA))
                report.candidates += candidates.num_rows
                report.turns_sampled += len(set(candidates.column("turn_id").to_pylist()))
                report.generated_tokens += sum(candidates.column("generated_tokens").to_pylist())
                report.rejected += rejected.num_rows
                reasons.update(rejected.column("reason").to_pylist())
                report.seconds = time.perf_counter() - start
                if progress is not None:
                    progress(report)
    report.reasons = dict(reasons)
    report.seconds = time.perf_counter() - start
    report.outputs = {name: str(out / f"{name}.parquet") for name in ("turns", "candidates", "rejected")}
    return report
