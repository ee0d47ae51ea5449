"""Text gates of reversed construction: what a dialogue's words must be before anyone trains on them.

The structural filters of :mod:`ttpa_ray.reverse` (a call succeeded, two tools, no restart, no tool
named) say nothing of the text, and a small teacher writes text that passes them and is not language:
a question that repeats one fragment ("The answer is: The answer is: ..."), an answer that echoes the
builder's own nudges ("finish with answer soon. 1 call left"), an argument of digits and spaces, an
answer with values no tool returned. Each check here is pure and cheap (regular expressions and
counts over one dialogue's strings) and names the reason the dialogue is rejected with; the
thresholds come from ``reverse.quality`` and their defaults pass fluent text (tests/test_quality.py
holds both kinds). Near-duplicate questions are found across the whole run by :func:`question_key`,
a normalised-text hash the reverse stage groups by in Ray Data (README, "What is guaranteed").
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# Rejection reasons of the text gates (a subset of the reverse stage's reasons), and the reasons
# counted as "degenerate" in the data-quality summary.
REPETITIVE = ("repetitive_scenario", "repetitive_question", "repetitive_answer", "repetitive_argument")
UNREADABLE = ("unreadable_scenario", "unreadable_question", "unreadable_answer")
MISMATCHED = "question_misses_call"
DEGENERATE = (
    *REPETITIVE,
    *UNREADABLE,
    "question_length",
    "answer_length",
    "question_copies_text",
    "prompt_leak",
)
DUPLICATE = "duplicate_question"

_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")  # underscores split words: "returned_to_user_returned_to_user"
_WORD = re.compile(r"[a-z]+")
# Labels of the builder's prompts ("Scenario: ...", "Final answer: ..."): text that carries one copied
# the prompt, not a person.
_LABEL = re.compile(r"\b(scenario|tool calls made|final answer)\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?|\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_QUOTED = re.compile(r"\"([^\"]{2,80})\"|“([^”]{2,80})”|(?:(?<=\s)|^)'([^']{2,60})'(?=[\s.,;:!?)]|$)")


@dataclass(frozen=True)
class Verdict:
    """A failed gate: the rejection reason and a one-line detail."""

    reason: str
    detail: str


def tokens(text: str) -> list[str]:
    """Words and punctuation marks, lower case: "10.010.7" is five tokens, so digit salad repeats too;
    "a_b_c" is three words."""
    return _TOKEN.findall(text.lower())


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the text's token n-grams that occur twice or more (0 for texts under ``n + 3`` tokens).

    Fluent text repeats few 3-grams; "The answer is 0.92% of the answer is 0.92% of ..." repeats most.
    """
    toks = tokens(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if len(grams) < 4:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def unreadable_word(text: str, max_chars: int = 40) -> str | None:
    """A chunk of the text that is no word of prose: an identifier of three or more joined words
    ("no_calls_left_now_returned_to_user"), or a run of ``max_chars`` characters without a space that is
    not a link. None for prose."""
    for chunk in text.split():
        if chunk.startswith(("http://", "https://")):
            continue
        if chunk.count("_") >= 2 or len(chunk) >= max_chars:
            return chunk
    return None


def repeated_line_share(text: str) -> float:
    """Share of the non-empty lines that occur more than once (0 for fewer than three lines)."""
    lines = [line.strip().lower() for line in text.splitlines() if line.strip()]
    if len(lines) < 3:
        return 0.0
    counts = Counter(lines)
    return sum(c for c in counts.values() if c > 1) / len(lines)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class PromptLeaks:
    """The builder's own prompt texts, to find them again in what the teacher wrote.

    A text leaks when it holds a word n-gram of a prompt (letters only, so "1 call(s) left: finish
    with `answer` soon" and "finish with answer soon. 1 call left" match), or a prompt's field label.
    Short prompts (nudges) are matched by 4-grams, long ones by 5-grams, so a fluent sentence that
    shares a common phrase with an instruction ("the results of the") does not match.
    """

    def __init__(self, short: Iterable[str], long: Iterable[str]) -> None:
        self.grams: set[tuple[str, ...]] = set()
        for texts, n in ((short, 4), (long, 5)):
            for text in texts:
                words = _words(text)
                self.grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    def find(self, text: str) -> str | None:
        """The leaked phrase or label, if any."""
        label = _LABEL.search(text)
        if label:
            return label.group(0)
        words = _words(text)
        for n in (4, 5):
            for i in range(len(words) - n + 1):
                if tuple(words[i : i + n]) in self.grams:
                    return " ".join(words[i : i + n])
        return None


def _number_values(text: str) -> set[float]:
    return {float(m) for m in _NUMBER.findall(_THOUSANDS.sub("", text))}


def _sources_text(sources: Sequence[Any]) -> str:
    return "\n".join(s if isinstance(s, str) else json.dumps(s, ensure_ascii=False) for s in sources)


def ungrounded_values(answer: str, sources: Sequence[Any]) -> list[str]:
    """The answer's numbers and quoted values that appear in none of ``sources`` (tool results, call
    arguments, the scenario and its information: what the dialogue knows). A number counts when a
    source number rounds to it at the answer's precision (12.35 shown as 12.3 or 12)."""
    text = _sources_text(sources)
    known = _number_values(text)
    missing = []
    for written in _NUMBER.findall(_THOUSANDS.sub("", answer)):
        value = float(written)
        places = len(written.split(".")[1]) if "." in written else 0
        if not any(abs(round(k, places) - value) < 1e-9 or k == value for k in known):
            missing.append(written)
    lowered = text.lower()
    for groups in _QUOTED.findall(answer):
        quoted = next(g for g in groups if g).strip()
        if quoted and quoted.lower() not in lowered:
            missing.append(repr(quoted))
    return missing


def _similar(a: str, b: str) -> float:
    x, y = " ".join(_words(a)), " ".join(_words(b))
    if not x or not y:
        return 0.0
    if min(len(x), len(y)) >= 20 and (x in y or y in x):
        return 1.0
    return difflib.SequenceMatcher(None, x, y, autojunk=False).ratio()


@dataclass(frozen=True)
class Gates:
    """The text gates with their thresholds (``reverse.quality``; see ttpa_ray/config.py)."""

    max_repeated_ngram_share: float = 0.3
    max_repeated_line_share: float = 0.3
    ngram: int = 3
    question_chars: tuple[int, int] = (15, 400)
    answer_chars: tuple[int, int] = (8, 1000)
    max_copy_similarity: float = 0.8
    strict_grounding: bool = True
    call_values_in_question: bool = False
    leaks: PromptLeaks | None = None

    def _repetitive(self, text: str) -> str | None:
        share = repeated_ngram_share(text, self.ngram)
        if share > self.max_repeated_ngram_share:
            return f"{share:.0%} of its {self.ngram}-grams repeat"
        lines = repeated_line_share(text)
        if lines > self.max_repeated_line_share:
            return f"{lines:.0%} of its lines repeat"
        return None

    def _leak(self, text: str) -> str | None:
        return self.leaks.find(text) if self.leaks is not None else None

    def _not_prose(self, text: str, what: str) -> Verdict | None:
        """Repetition, a chunk that is no word, the builder's own text: ``repetitive_<what>``,
        ``unreadable_<what>``, ``prompt_leak``."""
        why = self._repetitive(text)
        if why:
            return Verdict(f"repetitive_{what}", f"{why}: {text[:160]!r}")
        word = unreadable_word(text)
        if word:
            return Verdict(f"unreadable_{what}", f"{word[:60]!r} is no word: {text[:160]!r}")
        leak = self._leak(text)
        if leak:
            return Verdict("prompt_leak", f"the {what} holds {leak!r}: {text[:160]!r}")
        return None

    def scenario(self, scenario: str) -> Verdict | None:
        """The scene's statement, checked before any call is made (a looping scene makes no dialogue)."""
        return self._not_prose(scenario, "scenario")

    def arguments(self, calls: Iterable[Any]) -> Verdict | None:
        """Every string argument of the calls: no repetition, no prompt text."""
        for call in calls:
            for key, value in _strings(call.arguments):
                why = self._repetitive(value)
                if why:
                    return Verdict("repetitive_argument", f"{call.name}.{key}: {why}: {value[:120]!r}")
                leak = self._leak(value)
                if leak:
                    return Verdict("prompt_leak", f"{call.name}.{key} holds {leak!r}: {value[:120]!r}")
        return None

    def answer(self, answer: str, sources: Sequence[Any]) -> Verdict | None:
        """The final answer: length, repetition, prompt text, and (strict) every value grounded."""
        low, high = self.answer_chars
        if not low <= len(answer.strip()) <= high:
            return Verdict("answer_length", f"{len(answer.strip())} characters, not in [{low}, {high}]")
        verdict = self._not_prose(answer, "answer")
        if verdict is not None:
            return verdict
        if self.strict_grounding:
            missing = ungrounded_values(answer, sources)
            if missing:
                return Verdict(
                    "answer_ungrounded",
                    f"no call or scenario gave {', '.join(missing[:5])}: {answer[:160]!r}",
                )
        return None

    def question(
        self, question: str, answer: str, scenario: str, calls: Sequence[Any] = ()
    ) -> Verdict | None:
        """The user's question: length, repetition, prompt text, not a copy of the answer or scenario,
        and (``call_values_in_question``) a value of every call."""
        verdict = self._not_prose(question, "question")
        if verdict is not None:
            return verdict
        low, high = self.question_chars
        if not low <= len(question.strip()) <= high or len(_words(question)) < 4:
            return Verdict("question_length", f"{len(question.strip())} characters: {question[:120]!r}")
        for what, text in (("answer", answer), ("scenario", scenario)):
            similarity = _similar(question, text)
            if similarity >= self.max_copy_similarity:
                return Verdict(
                    "question_copies_text", f"the question is {similarity:.0%} the {what}: {question[:120]!r}"
                )
        missed = missed_call(question, calls) if self.call_values_in_question else None
        if missed is not None:
            shown = json.dumps(missed.arguments, ensure_ascii=False)[:120]
            return Verdict(
                MISMATCHED, f"the question names no value of {missed.name}({shown}): {question[:120]!r}"
            )
        return None


def _scalars(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, list):
        for item in value:
            yield from _scalars(item)
    elif isinstance(value, str) and len(value.strip()) >= 2:
        yield value.strip()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield f"{value:g}"


def missed_call(question: str, calls: Iterable[Any]) -> Any:
    """The first call none of whose argument values (strings of two characters or more, numbers) the
    question shows, or None. docs/design.md section 1: the question holds every value the calls
    needed; this asks one per call, so a question about something else entirely ("the top 5 hotels"
    over an exchange-rate call) is caught and a paraphrased date is not held against it."""
    lowered = question.lower()
    known = _number_values(question)
    for call in calls:
        values = list(_scalars(call.arguments))
        if not values:
            continue
        if not any(v.lower() in lowered or (_NUMBER.fullmatch(v) and float(v) in known) for v in values):
            return call
    return None


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


_STOP = frozenset(
    {"a", "an", "the", "please", "can", "could", "would", "you", "i", "me", "my", "we", "our", "to", "for"}
    | {"of", "is", "are", "what", "which", "tell", "know", "want", "need"}
)


def question_key(question: str) -> str:
    """A near-duplicate key: the question's words and numbers, lower case, without filler words, hashed.

    "Can you tell me the weather in Paris?" and "the weather in paris, please" share a key; "flights from
    Paris to Lyon" and "from Lyon to Paris" do not (word order is kept).
    """
    words = [w for w in re.findall(r"[a-z0-9]+", question.lower()) if w not in _STOP]
    return hashlib.sha1(" ".join(words).encode()).hexdigest()[:16]


def question_bigrams(question: str) -> list[str]:
    """The question's word 2-grams (for the run's distinct-2 figure)."""
    words = re.findall(r"[a-z0-9]+", question.lower())
    return [f"{a} {b}" for a, b in itertools.pairwise(words)]


# Keys that belong to a JSON Schema, not to an answer: a writer that restates the tool's schema fills its
# response with them ({"query": {"type": ["string", "description"]}}).
SCHEMA_KEYS = frozenset(
    {"type", "properties", "required", "items", "additionalProperties", "$schema", "enum"}
)
_JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "array", "object", "null"})


def restates_schema(response: Any, schema: Any = None, path: str = "") -> str | None:
    """Where a response is a schema instead of an answer: an object with a schema keyword its response
    schema does not declare there, whose value looks like a schema's (a JSON type name, a list of
    them, an object of properties). None when the response answers."""
    if isinstance(response, list):
        items = schema.get("items") if isinstance(schema, dict) else None
        for i, item in enumerate(response):
            found = restates_schema(item, items, f"{path}[{i}]")
            if found:
                return found
        return None
    if not isinstance(response, dict):
        return None
    declared = (schema or {}).get("properties", {}) if isinstance(schema, dict) else {}
    for key, value in response.items():
        if key in SCHEMA_KEYS and key not in declared and _schema_like(key, value):
            return f"{path}.{key}" if path else key
        found = restates_schema(value, declared.get(key), f"{path}.{key}" if path else key)
        if found:
            return found
    return None


def _schema_like(key: str, value: Any) -> bool:
    if key == "type":
        values = value if isinstance(value, list) else [value]
        return any(isinstance(v, str) and v.lower() in _JSON_TYPES for v in values)
    return key != "enum" or isinstance(value, list)
